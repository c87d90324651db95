"""Safe extraction of uploaded zip files of images.

Zips come from users, so nothing in them is trusted: entry names are sanitised and can
never point outside the destination folder, symbolic links, encrypted entries, nested
zips and non-image files are skipped with a note, and "zip bombs" are refused both from
the sizes the zip declares and from the bytes actually decompressed.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import weakref
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fod_app.data import IMAGE_EXTENSIONS, is_mvtec_layout

__all__ = [
    "MAX_FILES",
    "MAX_RATIO",
    "MAX_TOTAL_BYTES",
    "ArchiveError",
    "ExtractReport",
    "extract_images_from_zip",
    "find_mvtec_root",
]

MAX_FILES = 5000
"""Most entries (files, not folders) a zip may contain."""

MAX_TOTAL_BYTES = 2 * 1024**3
"""Most bytes all extracted images together may occupy (2 GiB)."""

MAX_RATIO = 200
"""Largest accepted uncompressed/compressed size ratio of an entry (images barely compress)."""

RATIO_CHECK_MIN_BYTES = 1024**2
"""Entries smaller than this (1 MiB) are not ratio-checked: small files cannot do harm."""

_COPY_CHUNK = 1024**2
_MAX_NAME_BYTES = 180
_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {f"lpt{i}" for i in range(1, 10)}
)
_UNSAFE_CHARS = re.compile(r"[^\w\-. ()+,=@]")
_DRIVE = re.compile(r"^[A-Za-z]:")


class ArchiveError(ValueError):
    """The zip cannot be used at all (damaged, too large, a zip bomb, or no images)."""


@dataclass
class ExtractReport:
    """Files written by :func:`extract_images_from_zip` and entries skipped (name, reason)."""

    extracted: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def _safe_component(part: str) -> str:
    """One path component made safe on Windows, macOS and Linux."""
    part = unicodedata.normalize("NFC", part)
    part = _UNSAFE_CHARS.sub("_", part).strip(" .")
    if not part:
        part = "file"
    stem, dot, ext = part.rpartition(".")
    if not dot:
        stem, ext = part, ""
    if stem.lower() in _WINDOWS_RESERVED:
        part = f"_{part}"
    encoded = part.encode("utf-8")
    if len(encoded) > _MAX_NAME_BYTES:
        suffix = f".{ext}" if dot and len(ext) <= 10 else ""
        keep = _MAX_NAME_BYTES - len(suffix.encode("utf-8"))
        part = encoded[:keep].decode("utf-8", "ignore").rstrip(" .") + suffix
    return part


def _unsafe_reason(raw: str) -> str | None:
    """Why an entry name is dangerous, or None. Backslashes count as separators."""
    name = raw.replace("\\", "/")
    if "\x00" in name:
        return "unsafe file name (contains a NUL character); skipped"
    if name.startswith("/") or _DRIVE.match(name):
        return "unsafe absolute path (would be written outside the upload folder); skipped"
    if any(part == ".." for part in name.split("/")):
        return "unsafe path with '..' (would be written outside the upload folder); skipped"
    return None


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    """True for entries stored as Unix symbolic links (mode bits in ``external_attr``)."""
    return stat.S_ISLNK(info.external_attr >> 16)


def _open_zip(zip_source: str | Path | bytes | BinaryIO, label: str) -> zipfile.ZipFile:
    try:
        if isinstance(zip_source, (bytes, bytearray, memoryview)):
            if not zip_source:
                raise ArchiveError(f"{label}: the file is empty (0 bytes).")
            return zipfile.ZipFile(io.BytesIO(bytes(zip_source)))
        if isinstance(zip_source, (str, Path)):
            path = Path(zip_source)
            if not path.is_file():
                raise ArchiveError(f"{label}: file not found ({path}).")
            if path.stat().st_size == 0:
                raise ArchiveError(f"{label}: the file is empty (0 bytes).")
            return zipfile.ZipFile(path)
        return zipfile.ZipFile(zip_source)
    except ArchiveError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        ValueError,
        EOFError,
    ) as exc:
        raise ArchiveError(
            f"{label}: not a valid zip file, or the zip is damaged ({exc}). Create the zip "
            "again (e.g. right-click the folder > Compress / Send to > Compressed folder)."
        ) from exc


def _unique(relative: PurePosixPath, taken: set[str]) -> PurePosixPath:
    """``relative`` or ``name_2.ext``, ``name_3.ext``... not yet in ``taken`` (case-insensitive)."""
    candidate = relative
    counter = 2
    while str(candidate).lower() in taken:
        candidate = relative.with_name(f"{relative.stem}_{counter}{relative.suffix}")
        counter += 1
    taken.add(str(candidate).lower())
    return candidate


def _copy_capped(src: BinaryIO, target: Path, limit: int) -> int:
    """Stream ``src`` into a new file ``target``; stop once more than ``limit`` bytes arrive.

    Returns the number of bytes read. The new file is removed again if reading fails or
    the limit is exceeded; an existing file or link at ``target`` is never touched.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    written = 0
    fd = os.open(target, flags, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = src.read(_COPY_CHUNK)
                if not chunk:
                    return written
                written += len(chunk)
                if written > limit:
                    break
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    target.unlink(missing_ok=True)
    return written


def extract_images_from_zip(
    zip_source: str | Path | bytes | BinaryIO,
    dest: str | Path,
    *,
    max_files: int = MAX_FILES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
    keep_structure: bool = False,
    name: str | None = None,
) -> ExtractReport:
    """Extract the images of a zip into ``dest`` safely; raise :class:`ArchiveError` if unusable.

    With ``keep_structure=False`` all images land directly in ``dest`` (names made safe,
    clashes renamed ``x_2.png``); with ``keep_structure=True`` the (sanitised) folders are
    kept, e.g. for an MVTec-style ``train/good``, ``test/<type>``, ``ground_truth/`` upload.
    ``name`` is the zip's name used in messages. On ArchiveError nothing is left in ``dest``
    by this call.
    """
    if isinstance(zip_source, (str, Path)):
        label = name or Path(zip_source).name
    else:
        label = name or getattr(zip_source, "name", None) or "uploaded zip"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    report = ExtractReport()
    with _open_zip(zip_source, label) as archive:
        try:
            entries = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:  # pragma: no cover
            raise ArchiveError(f"{label}: the zip's table of contents is damaged ({exc}).") from exc
        files = [info for info in entries if not info.is_dir()]
        if len(files) > max_files:
            raise ArchiveError(
                f"{label}: the zip contains {len(files)} files; the limit is {max_files}. "
                "Split the images into several smaller zips."
            )
        planned: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        declared_total = 0
        for info in files:
            raw = info.filename
            path_text = raw.replace("\\", "/")
            parts = [p for p in path_text.split("/") if p not in ("", ".")]
            base = parts[-1] if parts else raw
            if any(p.startswith("._") or p == "__MACOSX" for p in parts) or base.lower() in _JUNK_NAMES:
                continue  # operating-system metadata, not user files
            reason = _unsafe_reason(raw)
            if reason is None and _is_symlink(info):
                reason = "symbolic link; skipped (links are never followed)"
            if reason is None and info.flag_bits & 0x1:
                reason = "password-protected (encrypted); skipped. Create the zip again without a password"
            suffix = PurePosixPath(base).suffix.lower()
            if reason is None and suffix == ".zip":
                reason = "a zip inside the zip is not opened; unzip it and upload its images directly"
            if reason is None and suffix not in IMAGE_EXTENSIONS:
                shown = suffix or "no extension"
                reason = f"not an image file ({shown}); skipped"
            if reason is None and base.startswith("."):
                reason = "hidden file; skipped"
            if reason is not None:
                report.skipped.append((raw, reason))
                continue
            if info.file_size >= RATIO_CHECK_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
                raise ArchiveError(
                    f"{label}: refused as a possible 'zip bomb': {raw} would expand from "
                    f"{_human(info.compress_size)} to {_human(info.file_size)} (more than "
                    f"{max_ratio:g} times). Real photos do not compress like that."
                )
            declared_total += info.file_size
            if declared_total > max_total_bytes:
                raise ArchiveError(
                    f"{label}: the images would take more than {_human(max_total_bytes)} once "
                    "unzipped. Upload fewer or smaller images."
                )
            safe_parts = [_safe_component(p) for p in parts] if keep_structure else [_safe_component(base)]
            planned.append((info, PurePosixPath(*safe_parts)))

        if not planned:
            detail = ""
            if report.skipped:
                examples = "; ".join(f"{n}: {r}" for n, r in report.skipped[:3])
                more = f" (and {len(report.skipped) - 3} more)" if len(report.skipped) > 3 else ""
                detail = f" Skipped {len(report.skipped)} entries, e.g. {examples}{more}."
            raise ArchiveError(f"{label}: the zip contains no images ({', '.join(IMAGE_EXTENSIONS)}).{detail}")

        taken = {str(p.relative_to(root).as_posix()).lower() for p in root.rglob("*")}
        written_total = 0
        try:
            for info, relative in planned:
                relative = _unique(relative, taken)
                target = root.joinpath(*relative.parts)
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    why = f"cannot create its folder ({exc.strerror or exc}); skipped"
                    report.skipped.append((info.filename, why))
                    continue
                if not target.parent.resolve().is_relative_to(root):
                    why = "unsafe path (would be written outside the upload folder); skipped"
                    report.skipped.append((info.filename, why))
                    continue
                budget = min(info.file_size, max_total_bytes - written_total)
                try:
                    with archive.open(info) as src:
                        written = _copy_capped(src, target, budget)
                except (
                    zipfile.BadZipFile,
                    zlib.error,
                    OSError,
                    EOFError,
                    ValueError,
                    RuntimeError,
                    NotImplementedError,
                ) as exc:
                    if isinstance(exc, NotImplementedError):
                        why = "uses a compression method that is not supported; skipped"
                    elif "password" in str(exc).lower() or "encrypt" in str(exc).lower():
                        why = "password-protected (encrypted); skipped"
                    else:
                        why = f"damaged inside the zip ({exc}); skipped"
                    report.skipped.append((info.filename, why))
                    continue
                if written > budget:
                    raise ArchiveError(
                        f"{label}: refused as a possible 'zip bomb': {info.filename} decompresses "
                        "to more data than the zip declares or than the size limit allows."
                    )
                written_total += written
                report.extracted.append(target)
        except BaseException:
            for path in report.extracted:
                path.unlink(missing_ok=True)
            _remove_empty_dirs(root)
            raise
    if not report.extracted:
        raise ArchiveError(
            f"{label}: the zip contains no readable images. " + "; ".join(f"{n}: {r}" for n, r in report.skipped[:3])
        )
    return report


def _remove_empty_dirs(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


class UnpackFolder:
    """A temporary folder for an unpacked upload that lives as long as this object: removed by ``remove()``, when the
    object is garbage-collected (a closed browser session's state is dropped) or when the process exits. Without
    it, every session that evaluated an uploaded zip left the zip's images in the temporary folder for good."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    def remove(self) -> None:
        """Delete the folder now (at most once)."""
        self._finalizer()


def find_mvtec_root(folder: str | Path, max_depth: int = 3) -> Path | None:
    """The folder at or below ``folder`` (up to ``max_depth`` levels) with a train/good layout.

    Zips often wrap everything in one top folder (``bottle/train/good/...``); this finds it.
    """
    current = [Path(folder)]
    for _ in range(max_depth + 1):
        for candidate in current:
            if is_mvtec_layout(candidate):
                return candidate
        current = sorted(
            child for parent in current for child in parent.iterdir() if child.is_dir() and not child.is_symlink()
        )
    return None
