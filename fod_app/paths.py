"""Server-side folders the app may read: the configured data roots. Nothing outside them is read."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample_data"


class PathNotAllowedError(ValueError):
    """A server path outside the configured data roots (or missing)."""


def data_roots() -> list[Path]:
    """Allowed roots: the bundled sample data plus ``$FOD_DATA_ROOTS`` (os.pathsep-separated)."""
    roots = [SAMPLE_DATA]
    for item in os.environ.get("FOD_DATA_ROOTS", "").split(os.pathsep):
        if item.strip():
            roots.append(Path(item.strip()).expanduser())
    return [r.resolve() for r in roots]


def resolve_data_path(path: str | Path) -> Path:
    """Resolve a user-typed server folder; refuse anything outside the data roots (symlinks resolved)."""
    raw = Path(str(path).strip()).expanduser()
    candidate = raw if raw.is_absolute() else REPO_ROOT / raw
    resolved = candidate.resolve()
    roots = data_roots()
    if not any(resolved == root or root in resolved.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise PathNotAllowedError(
            f"{path}: outside the allowed data folders ({allowed}). Ask an admin to add it to FOD_DATA_ROOTS."
        )
    if not resolved.is_dir():
        raise PathNotAllowedError(f"{path}: no such folder on the server.")
    return resolved
