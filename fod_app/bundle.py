"""Model bundles on disk: ``models/<name>/model.safetensors`` + ``bundle.json``. The one bundle format.

Written atomically (temporary folder + rename), validated completely on load, never pickled.
``FOD_MODELS_DIR`` overrides the location.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .calibration import Calibration
from .config import FODConfig
from .familiarity import reference_from_metadata
from .ignore_regions import IgnoreRegions
from .inference import Detector, resolve_device
from .memory_bank import MAX_PLACE_ROWS
from .model import create_model
from .scoring import ScoreSpec

FORMAT = "fod-inspector-bundle"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "bundle.json"
MAX_METADATA_BYTES = 16 * 1024 * 1024
MAX_WEIGHTS_BYTES = 2 * 1024**3
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: The inspection history lives in ``<models folder>/history`` (see fod_app.history); never a model name.
HISTORY_FOLDER = "history"
#: Leftover ``.tmp-*`` / ``.trash-*`` folders (a save or delete killed mid-way) older than this are removed.
STALE_AFTER_S = 3600

log = logging.getLogger(__name__)


class BundleError(ValueError):
    """A bundle is missing, malformed, tampered with or incompatible; the message says which."""


def models_dir() -> Path:
    """Where bundles live: ``$FOD_MODELS_DIR`` or ``<repo>/models``."""
    root = os.environ.get("FOD_MODELS_DIR")
    return Path(root) if root else Path(__file__).resolve().parents[1] / "models"


def validate_name(name: str) -> str:
    """Model names: 1-64 characters, letters, digits, '_', '-', '.', not starting with a dot; not 'history'."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name.endswith("."):
        raise BundleError(
            f"Invalid model name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit."
        )
    if name == HISTORY_FOLDER:
        raise BundleError(f"The model name {name!r} is reserved (the inspection history's folder); choose another.")
    return name


def model_version(meta: dict[str, Any]) -> str:
    """The version of a bundle: its weights hash prefix, plus ``-c<n>`` after the n-th recalibration and
    ``-i<hash>`` while it has ignore regions (they change its scores, so results are not comparable across them)."""
    revision = int(meta.get("calibration_revision") or 0)
    version = str(meta["weights"]["sha256"])[:12] + (f"-c{revision}" if revision else "")
    regions = meta.get("ignore_regions")
    if regions:
        digest = hashlib.sha256(json.dumps(regions, sort_keys=True).encode()).hexdigest()[:6]
        version += f"-i{digest}"
    return version


def recalibrate_bundle(
    name: str, calibration: Calibration, reason: dict[str, Any], root: Path | None = None
) -> tuple[str, dict[str, Any]]:
    """Give bundle ``name`` a new calibration as a new model version, keeping the old one.

    The current bundle is first copied to ``<name>.previous-<UTC time>`` (a normal, loadable model); then
    ``name``'s metadata gets ``calibration``, ``calibration_revision`` + 1, a new ``model_version`` and the
    ``reason`` appended to ``calibration_history``. Weights are untouched. Returns (kept name, new metadata).
    """
    folder = _resolve(name, root)
    meta = read_metadata(folder)
    kept = _version_name(folder.parent, name, folder)
    tmp = folder.parent / f".tmp-{kept}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(folder, tmp)
        _set_metadata_name(tmp, kept)
        os.rename(tmp, folder.parent / kept)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleError(f"Could not keep the old version of model {name!r}: {err}. Nothing was changed.") from err
    revision = int(meta.get("calibration_revision") or 0) + 1
    updates = {
        "calibration": calibration.to_dict(),
        "calibration_revision": revision,
        "calibration_history": [*meta.get("calibration_history", []), {**reason, "previous_model": kept}],
    }
    updates["model_version"] = model_version({**meta, **updates})
    return kept, update_metadata(name, updates, root)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_models_dir(root: Path | None = None, writable: bool = False) -> Path:
    """Check that the models folder is (or can become) a folder, and optionally writable; returns it.

    Called before any work (the CLI at start, the app before training starts), so that ``FOD_MODELS_DIR``
    pointing at a file or at a read-only place is reported at once, not after a whole training run.
    """
    root = Path(root) if root else models_dir()
    where = f"The models folder {root} (FOD_MODELS_DIR)" if os.environ.get("FOD_MODELS_DIR") else (
        f"The models folder {root}"
    )
    probe = root
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent  # the nearest existing folder it would be created in
    if not probe.is_dir():
        what = "is a file" if probe == root else f"cannot be created: {probe} is a file"
        raise BundleError(f"{where} {what}, not a folder. Point FOD_MODELS_DIR at a folder.")
    if writable and not os.access(probe, os.W_OK | os.X_OK):
        raise BundleError(f"{where} cannot be written (no permission on {probe}). Point FOD_MODELS_DIR elsewhere.")
    return root


def _hidden_name(folder_name: str) -> tuple[str, str] | None:
    """``(prefix, model name)`` of a ``.tmp-<name>-<8 hex>`` / ``.trash-<name>-<8 hex>`` / ``.deleted-...`` folder."""
    prefix = next((p for p in (".tmp-", ".trash-", ".deleted-") if folder_name.startswith(p)), None)
    if prefix is None or len(folder_name) <= len(prefix) + 9:
        return None
    return prefix, folder_name[len(prefix) : -9]  # strip the prefix and the "-<8 hex>" suffix


def remove_stale_temporaries(root: Path, max_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove ``.tmp-<name>-*`` / ``.trash-<name>-*`` folders left by a killed save or delete; returns their names.

    They are never listed as models. Only folders older than ``max_age_s`` go (a younger one may belong to a save
    still running in another process), and only once a bundle ``<name>`` exists again: a save killed between its
    two renames leaves the old model in ``.trash-<name>-*`` and the new one in ``.tmp-<name>-*``, and those may be
    the only copies (:func:`recover_interrupted_saves` puts them back). Leftover ``.tmp-import-*`` folders (a copy
    of an upload) and ``.deleted-*`` folders (a delete killed mid-way) always go once stale.
    """
    removed = []
    now = time.time()
    for folder in Path(root).glob(".*"):
        parsed = _hidden_name(folder.name)
        if parsed is None or folder.is_symlink() or not folder.is_dir():
            continue
        prefix, name = parsed
        always = prefix == ".deleted-" or folder.name.startswith(".tmp-import-")
        if not always and not (Path(root) / name).is_dir():
            continue
        try:
            if now - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder)
                removed.append(folder.name)
        except OSError:
            continue
    return removed


def _is_complete(folder: Path, name: str) -> bool:
    """``folder`` holds a complete bundle saved as ``name``: its metadata reads, its weights match size and checksum."""
    try:
        meta = read_metadata(folder)
        weights = folder / WEIGHTS_FILE
        return (
            meta.get("name") == name
            and weights.is_file()
            and weights.stat().st_size == meta["weights"].get("bytes")
            and _sha256_file(weights) == meta["weights"].get("sha256")
        )
    except (BundleError, OSError):
        return False


def _set_metadata_name(folder: Path, name: str) -> None:
    meta_path = folder / METADATA_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["name"] = name
    tmp_meta = folder / f".{METADATA_FILE}.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp_meta, meta_path)


def _version_name(root: Path, name: str, folder: Path) -> str:
    """``<name>.previous-<UTC time of its save>`` (a valid model name, unique in ``root``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime((folder / METADATA_FILE).stat().st_mtime))
    suffix = f".previous-{stamp}"
    base = name[: 64 - len(suffix) - 3]
    candidate, n = base + suffix, 2
    while (root / candidate).exists() or (root / candidate).is_symlink():
        candidate, n = f"{base}{suffix}-{n}", n + 1
    return validate_name(candidate)


def recover_interrupted_saves(root: Path | None = None) -> list[str]:
    """Put back models left hidden by a save killed between its two renames; returns one message per model.

    A replacing save moves the old model to ``.trash-<name>-*`` and then the new one from ``.tmp-<name>-*`` to
    ``<name>``; ``kill -9`` between the two leaves a ``.trash-<name>-*`` and no ``<name>``. Exactly then (a
    first save still being written elsewhere has no ``.trash-*``, so it is never taken over), of the hidden
    folders of that name the ones holding a *complete* bundle (metadata readable and naming ``<name>``, weights
    matching their recorded size and checksum) are used: the newest (by the time its metadata was written; the
    new copy on a tie) becomes ``<name>`` again and every other one is kept as the model
    ``<name>.previous-<UTC time>``. Incomplete folders (a save killed while writing) are left for
    :func:`remove_stale_temporaries`. Runs at the start of every CLI command, on every listing and before every
    save; safe to run from several processes at once.
    """
    root = Path(root) if root else models_dir()
    try:
        entries = sorted(root.glob(".*")) if root.is_dir() else []
    except OSError:
        return []
    groups: dict[str, list[Path]] = {}
    for folder in entries:
        parsed = _hidden_name(folder.name)
        # .deleted-* is a model being deleted; .tmp-import-* an upload not yet fully validated: never restored
        if parsed is None or parsed[0] == ".deleted-" or folder.name.startswith(".tmp-import-"):
            continue
        name = parsed[1]
        if folder.is_symlink() or not folder.is_dir() or not NAME_PATTERN.match(name) or name.endswith("."):
            continue
        if (root / name).exists() or (root / name).is_symlink():
            continue
        groups.setdefault(name, []).append(folder)
    messages = []
    for name, folders in sorted(groups.items()):
        if not any(folder.name.startswith(".trash-") for folder in folders):
            continue  # not the window between the two renames of a replacing save
        complete = [folder for folder in folders if _is_complete(folder, name)]
        if not complete:
            continue
        try:
            complete.sort(
                key=lambda f: ((f / METADATA_FILE).stat().st_mtime, f.name.startswith(".tmp-")), reverse=True
            )
            winner, kept = complete[0], []
            os.rename(winner, root / name)  # the model first: a crash after this loses at most an older copy
            for other in complete[1:]:
                version = _version_name(root, name, other)
                _set_metadata_name(other, version)
                os.rename(other, root / version)
                kept.append(version)
            _fsync_dir(root)
        except (OSError, BundleError, ValueError):
            continue  # another process recovered it first, or the folder is read-only
        message = f"Model {name!r} was restored after a save was interrupted (its newest complete copy)"
        if kept:
            message += "; the other copy is kept as model " + ", ".join(repr(v) for v in kept)
        messages.append(message + ".")
        log.info(messages[-1])
    return messages


def save_bundle(
    detector: Detector,
    name: str,
    root: Path | None = None,
    extra: dict[str, Any] | None = None,
    replace: bool = True,
) -> Path:
    """Write ``detector`` as bundle ``name``; returns its folder.

    An existing bundle of that name is replaced atomically when ``replace`` is true (the app asks first), else
    a :class:`BundleError` is raised and nothing is written (the CLI without ``--replace``).
    """
    validate_name(name)
    if detector.calibration is None:
        raise BundleError("Cannot save an uncalibrated model.")
    root = Path(root) if root else models_dir()
    check_models_dir(root)
    root.mkdir(parents=True, exist_ok=True)
    recover_interrupted_saves(root)
    remove_stale_temporaries(root)
    if not replace and (root / name).exists():
        raise BundleError(f"A model named {name!r} already exists in {root}; it was not replaced.")
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    target = root / name
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in detector.model.state_dict().items()}
    try:
        tmp.mkdir()
        weights_path = tmp / WEIGHTS_FILE
        save_file(tensors, str(weights_path), metadata={"format": FORMAT})
        meta = {
            **detector.metadata,
            **(extra or {}),
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "created": detector.metadata.get("created") or datetime.now(UTC).isoformat(timespec="seconds"),
            "config": detector.config.to_dict(),
            "calibration": detector.calibration.to_dict(),
            "score": detector.score_spec.to_dict(),
            "ignore_regions": None if detector.ignore_regions is None else detector.ignore_regions.to_dict(),
            "weights": {
                "file": WEIGHTS_FILE,
                "sha256": _sha256_file(weights_path),
                "bytes": weights_path.stat().st_size,
                "tensors": {k: list(v.shape) for k, v in tensors.items()},
            },
            "library_versions": {"fod_inspector": __version__, "torch": torch.__version__},
        }
        meta["model_version"] = model_version(meta)
        with open(tmp / METADATA_FILE, "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        with open(weights_path, "rb+") as handle:
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        _replace_dir(tmp, target, replace)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if _is_disk_full(err) else str(err).splitlines()[0] if str(err) else repr(err)
        raise BundleError(f"Could not save model {name!r}: {reason}. Existing models are unchanged.") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    detector.metadata = meta
    return target


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when safetensors reports it as text (``IoError(Os { code: 28, ...``)."""
    if getattr(err, "errno", None) in (28, 122):
        return True
    text = str(err)
    return any(k in text for k in ("No space left on device", "code: 28,", "StorageFull", "Disk quota exceeded"))


def _replace_dir(new: Path, target: Path, replace: bool = True) -> None:
    """Move ``new`` to ``target``; an existing target is swapped out first and removed after.

    ``kill -9`` between the two renames leaves no ``target``: :func:`recover_interrupted_saves` puts it back.
    """
    if target.exists() and not replace:
        raise BundleError(f"A model named {target.name!r} already exists in {target.parent}; it was not replaced.")
    if target.exists():
        trash = target.parent / f".trash-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, trash)
        try:
            os.rename(new, target)
        except FileNotFoundError:
            if not target.is_dir():
                raise
            # another process's recover_interrupted_saves() finished this very replace in between
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(new, target)
    _fsync_dir(target.parent)


def _resolve(name_or_path: str | Path, root: Path | None) -> Path:
    """A bundle name (looked up in the models folder only) or an explicit ``Path`` to a bundle folder."""
    if isinstance(name_or_path, Path):  # an explicit folder (import validation, tests)
        return name_or_path
    validate_name(name_or_path)
    folder = (Path(root) if root else models_dir()) / str(name_or_path)
    if not folder.is_dir():
        recover_interrupted_saves(folder.parent)
    if not folder.is_dir():
        raise BundleError(
            f"No model named {name_or_path!r} in {folder.parent}. Run `python -m fod_app models` to list them."
        )
    return folder


def read_metadata(name_or_path: str | Path, root: Path | None = None) -> dict[str, Any]:
    """Read and check a bundle's JSON metadata (format, version, required fields, config, calibration)."""
    folder = _resolve(name_or_path, root)
    meta_path = folder / METADATA_FILE
    if not meta_path.is_file():
        raise BundleError(f"Model {folder.name!r} has no {METADATA_FILE}; it is incomplete or not a model.")
    if meta_path.stat().st_size > MAX_METADATA_BYTES:
        raise BundleError(f"Model {folder.name!r}: {METADATA_FILE} is implausibly large; refusing to read it.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"Model {folder.name!r}: {METADATA_FILE} is not valid JSON ({err}).") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"Model {folder.name!r}: {METADATA_FILE} is not an FOD Inspector bundle.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"Model {folder.name!r} has bundle format version {meta.get('format_version')!r}; "
            f"this FOD Inspector reads version {FORMAT_VERSION}."
        )
    for key in ("config", "calibration", "weights", "backbone"):
        if not isinstance(meta.get(key), dict):
            raise BundleError(f"Model {folder.name!r}: metadata field {key!r} is missing or malformed.")
    try:
        FODConfig.from_dict(meta["config"])
        Calibration.from_dict(meta["calibration"])
        ScoreSpec.from_dict(meta.get("score"))
        IgnoreRegions.from_dict(meta.get("ignore_regions"))
        reference_from_metadata(meta)  # wrong-part reference: optional (older models), checked when present
    except (TypeError, ValueError, KeyError) as err:
        raise BundleError(f"Model {folder.name!r}: invalid settings in {METADATA_FILE}: {err}") from err
    return meta


def load_bundle(name_or_path: str | Path, root: Path | None = None, device: str = "auto") -> Detector:
    """Load and fully validate a bundle: metadata, weights hash, backbone, tensor names and shapes."""
    from .backbone import BackboneWeightsError, create_feature_extractor

    folder = _resolve(name_or_path, root)
    meta = read_metadata(folder)
    config = FODConfig.from_dict(meta["config"])
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"Model {folder.name!r}: {WEIGHTS_FILE} is missing.")
    size = weights_path.stat().st_size
    if size > MAX_WEIGHTS_BYTES or size != meta["weights"].get("bytes"):
        raise BundleError(f"Model {folder.name!r}: {WEIGHTS_FILE} has the wrong size (truncated or replaced).")
    if _sha256_file(weights_path) != meta["weights"].get("sha256"):
        raise BundleError(
            f"Model {folder.name!r}: {WEIGHTS_FILE} does not match its recorded checksum (modified or corrupt)."
        )
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"Model {folder.name!r}: {WEIGHTS_FILE} is not a valid safetensors file ({err}).") from err
    backbone_meta = meta["backbone"]
    if backbone_meta.get("name") != config.backbone:
        raise BundleError(
            f"Model {folder.name!r}: backbone in metadata ({backbone_meta.get('name')!r}) differs from its config."
        )
    dev = resolve_device(device)
    try:
        backbone = create_feature_extractor(
            config.backbone, weights=backbone_meta.get("weights_path"), device=dev, exposure=config.exposure
        )
    except BackboneWeightsError as err:
        raise BundleError(f"Model {folder.name!r} needs backbone {config.backbone!r}: {err}") from err
    if backbone.weights_sha256 != backbone_meta.get("weights_sha256"):
        raise BundleError(
            f"Model {folder.name!r} was trained with different {config.backbone} weights than the ones installed "
            "(weights checksum mismatch); retrain it here."
        )
    if list(backbone.channels) != list(backbone_meta.get("channels", [])):
        raise BundleError(f"Model {folder.name!r}: backbone channels do not match the installed backbone.")
    model = create_model(config, backbone.channels, backbone.strides)
    bank_rows = [int(tensors[f"levels.{i}.patch_bank"].shape[0]) if f"levels.{i}.patch_bank" in tensors else 0
                 for i in range(len(model.levels))]
    if max(bank_rows) > config.patch_bank_size:
        raise BundleError(f"Model {folder.name!r}: its patch bank is larger than its config allows (tampered?).")
    model.resize_patch_banks(bank_rows)  # the bank's rows vary per model; channels are checked below
    place_shapes = [tuple(tensors[f"levels.{i}.place_bank"].shape[:2]) if f"levels.{i}.place_bank" in tensors
                    else (0, 0) for i in range(len(model.levels))]
    try:
        if any(len(s) != 2 or s[1] > MAX_PLACE_ROWS for s in place_shapes):
            raise ValueError(f"more than {MAX_PLACE_ROWS} rows per position")
        model.resize_place_banks(place_shapes)  # ValueError unless one row of the bank per grid position
    except ValueError as error:
        raise BundleError(
            f"Model {folder.name!r}: its per-position bank does not fit the model (tampered?).") from error
    expected = model.state_dict()
    for i, level in enumerate(model.levels):  # bundles from before the banks have none: empty banks
        tensors.setdefault(f"levels.{i}.patch_bank", level.patch_bank.clone())
        tensors.setdefault(f"levels.{i}.place_bank", level.place_bank.clone())
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BundleError(
            f"Model {folder.name!r}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise BundleError(
                f"Model {folder.name!r}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                f"expected {tuple(value.shape)}."
            )
        if not torch.isfinite(tensors[key]).all():
            raise BundleError(f"Model {folder.name!r}: tensor {key} contains NaN or infinite values.")
    model.load_state_dict(tensors, strict=True)
    model.to(dev).eval()
    spec = ScoreSpec.from_dict(meta.get("score"))
    if spec.mode == "standardized" and len(spec.statistics) != len(model.levels):
        raise BundleError(f"Model {folder.name!r}: score statistics do not match the model's levels.")
    if spec.mode == "standardized" and spec.weights.get("nearest", 0) > 0 and any(
            "nearest" in level and not lv.has_bank for level, lv in zip(spec.statistics, model.levels)):
        raise BundleError(f"Model {folder.name!r}: its score uses the nearest-good-patch branch, but its weights hold "
                          "no patch bank.")
    regions = IgnoreRegions.from_dict(meta.get("ignore_regions"))
    return Detector(backbone, model, Calibration.from_dict(meta["calibration"]), meta, dev, spec, regions)


@dataclass
class BundleInfo:
    """A listed bundle: its name, folder and metadata (or the reason it cannot be read)."""

    name: str
    path: Path
    metadata: dict[str, Any] | None
    error: str | None = None


def list_bundles(root: Path | None = None) -> list[BundleInfo]:
    """All bundles in the models folder, newest first; unreadable ones carry an ``error``.

    Temporary and partially written folders (names starting with '.') are never listed.
    """
    root = Path(root) if root else models_dir()
    if not root.is_dir():
        return []
    recover_interrupted_saves(root)
    infos = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        if folder.name == HISTORY_FOLDER and not (folder / METADATA_FILE).exists():
            continue  # the inspection history (fod_app.history), not a model
        try:
            infos.append(BundleInfo(folder.name, folder, read_metadata(folder)))
        except BundleError as err:
            infos.append(BundleInfo(folder.name, folder, None, str(err)))
    infos.sort(key=lambda i: (i.metadata or {}).get("created", ""), reverse=True)
    return infos


def delete_bundle(name: str, root: Path | None = None) -> None:
    """Remove a bundle (renamed away first, so it disappears from listings atomically).

    The hidden folder is ``.deleted-*`` (not ``.trash-*`` as in a replacing save), so a delete killed mid-way is
    never mistaken for an interrupted save and restored.
    """
    folder = _resolve(name, root)
    trash = folder.parent / f".deleted-{folder.name}-{uuid.uuid4().hex[:8]}"
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def rename_bundle(old: str, new: str, root: Path | None = None) -> Path:
    """Rename a bundle (its metadata 'name' follows). Refuses to overwrite an existing one."""
    folder = _resolve(old, root)
    validate_name(new)
    target = folder.parent / new
    if target.exists():
        raise BundleError(f"A model named {new!r} already exists.")
    _set_metadata_name(folder, new)
    os.rename(folder, target)
    return target


def update_metadata(name: str, updates: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    """Merge ``updates`` (e.g. {'metrics': ...}) into a bundle's metadata, atomically."""
    folder = _resolve(name, root)
    meta = read_metadata(folder)
    meta.update(updates)
    tmp_meta = folder / f".{METADATA_FILE}.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp_meta, folder / METADATA_FILE)
    return meta


def set_ignore_regions(name: str, regions: IgnoreRegions | None, root: Path | None = None) -> dict[str, Any]:
    """Set (or clear, with None) a saved model's ignore regions. The threshold is kept from training.

    Ignoring pixels can only lower a good image's score, so the kept threshold rejects no more good parts than
    before (it is conservative); the regions are marked ``calibrated: False`` until the model is retrained with them.
    """
    if regions is not None:
        regions = IgnoreRegions(regions.rectangles, regions.mask, calibrated=False)
    meta = read_metadata(name, root)
    updates: dict[str, Any] = {"ignore_regions": None if regions is None else regions.to_dict()}
    updates["model_version"] = model_version({**meta, **updates})
    return update_metadata(name, updates, root)


def export_bundle_zip(name: str, root: Path | None = None) -> bytes:
    """A bundle as zip bytes (``<name>/bundle.json``, ``<name>/model.safetensors``)."""
    folder = _resolve(name, root)
    read_metadata(folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for filename in (METADATA_FILE, WEIGHTS_FILE):
            archive.write(folder / filename, f"{folder.name}/{filename}")
    return buffer.getvalue()


def import_bundle_zip(data: bytes, name: str | None = None, root: Path | None = None, device: str = "cpu") -> str:
    """Validate an uploaded bundle zip completely (as ``load_bundle``) before adding it; returns its name."""
    root = Path(root) if root else models_dir()
    root.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as err:
        raise BundleError("The uploaded file is not a zip of an FOD Inspector model.") from err
    wanted = {}
    for info in archive.infolist():
        base = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
        if base in (METADATA_FILE, WEIGHTS_FILE) and not info.is_dir():
            if info.file_size > MAX_WEIGHTS_BYTES or base in wanted:
                raise BundleError(f"The uploaded zip has an unexpected or oversized {base}.")
            if info.flag_bits & 0x1:
                raise BundleError("The uploaded zip is encrypted; export the model again without a password.")
            wanted[base] = info
    if set(wanted) != {METADATA_FILE, WEIGHTS_FILE}:
        raise BundleError(f"The uploaded zip must contain {METADATA_FILE} and {WEIGHTS_FILE}.")
    tmp = root / f".tmp-import-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for base, info in wanted.items():
            with archive.open(info) as src, open(tmp / base, "wb") as dst:
                copied = 0
                for block in iter(lambda: src.read(1 << 20), b""):
                    copied += len(block)
                    if copied > MAX_WEIGHTS_BYTES:
                        raise BundleError("The uploaded zip expands beyond the size limit.")
                    dst.write(block)
        meta = read_metadata(tmp)
        final_name = validate_name(name or str(meta.get("name", "")))
        load_bundle(tmp, device=device)  # full validation, never pickle
        if (root / final_name).exists():
            raise BundleError(f"A model named {final_name!r} already exists; rename or delete it first.")
        meta["name"] = final_name
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
        os.rename(tmp, root / final_name)
        return final_name
    except (zipfile.BadZipFile, OSError) as err:
        raise BundleError(f"The uploaded model zip could not be read: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
