"""The workstation's remembered active model: ``<models dir>/active_model.json``, written atomically.

A browser session keeps its own choice while it lives; a new session (a reload, a new tab, a restart) starts from
the model last chosen on this workstation, so the active model never silently becomes the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .bundle import models_dir

ACTIVE_FILE = "active_model.json"

log = logging.getLogger(__name__)


def active_file(root: Path | None = None) -> Path:
    return (Path(root) if root else models_dir()) / ACTIVE_FILE


def read_active_choice(root: Path | None = None) -> dict[str, Any] | None:
    """``{"name": ..., "chosen_at": ISO time, "by": ...}`` or None (never chosen, unreadable file: logged)."""
    path = active_file(root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable %s: %s", path, err)
        return None
    return data if isinstance(data, dict) and isinstance(data.get("name"), str) else None


def read_active_model(root: Path | None = None) -> str | None:
    """The remembered active model's name (it may no longer exist: the caller checks)."""
    choice = read_active_choice(root)
    return choice["name"] if choice else None


def write_active_model(name: str | None, by: str = "", root: Path | None = None) -> bool:
    """Remember ``name`` (None forgets the choice) atomically (temp file + rename); False when it cannot be written.

    Failing to remember is not fatal: the session keeps its choice; the reason is logged.
    """
    path = active_file(root)
    try:
        if name is None:
            path.unlink(missing_ok=True)
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{ACTIVE_FILE}.{uuid.uuid4().hex[:8]}.tmp")
        payload = {"name": name, "chosen_at": datetime.now(UTC).isoformat(timespec="seconds"), "by": by}
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return True
    except OSError as err:
        log.warning("could not remember the active model in %s: %s", path, err)
        try:
            tmp.unlink(missing_ok=True)  # type: ignore[possibly-undefined]
        except (OSError, NameError):
            pass
        return False
