"""Image and data-set loading for FOD Inspector (no Streamlit, no torch).

Everything a quality engineer can throw at the app goes through here: single images
(paths, bytes or uploaded-file objects), plain folders of good images and MVTec-style
evaluation folders. Every problem is reported as an :class:`ImageLoadError` or
:class:`DatasetError` whose message names the file and says what to do about it.

Conventions chosen here (documented because they change what the model sees):

* Transparent pixels (RGBA, LA, palette images with transparency) are composited on
  **black**, so a transparent background looks the same in every image.
* 16-bit and 32-bit grayscale images (modes ``I;16*``, ``I``, ``F``) are scaled to 8 bits by
  **each image's own value range** (min -> 0, max -> 255), like an image viewer's
  auto-contrast, so 10/12/14-bit camera data is not clipped and does not come out black.
* Only the **first frame** of animated GIFs and multi-page TIFFs is used.
* EXIF orientation is applied, so photos appear the way the camera held them.
* Images are resized to an exact square (aspect ratio not kept), as in the official FOD code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import struct
import threading
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MIN_IMAGE_SIDE",
    "MIN_TRAIN_IMAGES",
    "DatasetError",
    "ImageLoadError",
    "LoadReport",
    "MVTecDataset",
    "TestItem",
    "check_enough_images",
    "check_mask_sizes",
    "dataset_fingerprint",
    "is_mvtec_layout",
    "list_images",
    "load_image",
    "load_images",
    "load_mask",
    "load_mvtec_layout",
    "names_for",
    "prepare_image",
    "resolve_training_images",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)
"""File extensions treated as images (compared case-insensitively)."""

MAX_PIXELS = 80_000_000
"""Largest image accepted (width x height), checked from the file header before decoding."""

MIN_IMAGE_SIDE = 16
"""Smallest accepted width/height in pixels; smaller pictures carry no usable detail."""

MIN_TRAIN_IMAGES = 10
"""Fewest good images the app will train on."""

RECOMMENDED_TRAIN_IMAGES = 50

_FORMATS_TEXT = "PNG, JPEG, BMP, TIFF or WEBP"
_HASH_CHUNK = 1 << 20
_truncation_lock = threading.Lock()


class ImageLoadError(ValueError):
    """An image file could not be turned into a usable RGB picture."""


class DatasetError(ValueError):
    """A folder or data set does not have the expected content or layout."""


# --------------------------------------------------------------------------- single images


def _display_name(name: str) -> str:
    """``name`` made printable: undecodable bytes in file names become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _source_name(source: Any, name: str | None) -> str:
    if name:
        return _display_name(name)
    if isinstance(source, (str, Path)):
        return _display_name(Path(source).name or str(source))
    return _display_name(str(getattr(source, "name", None) or "uploaded image"))


def _read_source(source: str | Path | bytes | BinaryIO, label: str) -> bytes:
    """Return the raw bytes of ``source`` or raise ImageLoadError naming ``label``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(f"{label}: file not found ({path}).")
        if path.is_dir():
            raise ImageLoadError(f"{label}: this is a folder, not an image file ({path}).")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageLoadError(f"{label}: the file cannot be read ({exc.strerror or exc}).") from exc
        if size == 0:
            raise ImageLoadError(f"{label}: the file is empty (0 bytes). Re-export or re-copy it.")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ImageLoadError(f"{label}: the file cannot be read ({exc.strerror or exc}).") from exc
    if hasattr(source, "getvalue"):
        return bytes(source.getvalue())
    if hasattr(source, "read"):
        return bytes(source.read())
    raise ImageLoadError(f"{label}: unsupported input type {type(source).__name__}.")


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Stretch a numeric array's own min..max range to 0..255 (no clipping)."""
    arr = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo = float(arr[finite].min())
    hi = float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite_on_black(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB using the conventions in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _scale_to_uint8(np.asarray(img))
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        return _composite_on_black(img)
    if mode == "P":
        if "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA"):
            return _composite_on_black(img)
        return img.convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageLoadError(
            f"{label}: unsupported colour mode '{mode}'. Save the image as an ordinary RGB or "
            f"grayscale {_FORMATS_TEXT} file."
        ) from exc


def _open_checked(data: bytes, label: str) -> Image.Image:
    """Open ``data``, check its header size, decode frame 0 fully; raise ImageLoadError."""
    if not data:
        raise ImageLoadError(f"{label}: the file is empty (0 bytes). Re-export or re-copy it.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ImageLoadError(
                    f"{label}: the image is too large ({width} x {height} = "
                    f"{width * height / 1e6:.0f} megapixels; the limit is {MAX_PIXELS / 1e6:.0f}). "
                    "Downscale it before uploading."
                )
            with _truncation_lock:
                previous = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = previous
            return img
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"(\d+) pixels", str(exc))
        size_text = f"{int(found.group(1)) / 1e6:.0f} megapixels; " if found else ""
        raise ImageLoadError(
            f"{label}: the image is too large ({size_text}the limit is "
            f"{MAX_PIXELS / 1e6:.0f} megapixels). Downscale it before uploading."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(
            f"{label}: not a readable image. The file content is not {_FORMATS_TEXT} "
            "(it may be another kind of file renamed, or damaged)."
        ) from exc
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        IndexError,
        struct.error,
    ) as exc:
        text = str(exc)
        if "truncated" in text.lower() or isinstance(exc, EOFError):
            reason = "the file is incomplete (truncated), probably from an interrupted copy or upload"
        else:
            reason = f"the image data is damaged and cannot be decoded ({text or type(exc).__name__})"
        raise ImageLoadError(f"{label}: {reason}. Re-export or re-copy the file.") from exc
    except MemoryError as exc:
        raise ImageLoadError(f"{label}: not enough memory to open this image. Downscale it.") from exc


def load_image(source: str | Path | bytes | BinaryIO, name: str | None = None) -> Image.Image:
    """Load one image as an 8-bit RGB ``PIL.Image``, or raise :class:`ImageLoadError`.

    ``source`` is a path, raw bytes or a file-like object (e.g. a Streamlit upload); ``name``
    is used in error messages (defaults to the file name). The returned image keeps its
    original size; its ``info["fod_source_mode"]`` records the file's original colour mode.
    """
    label = _source_name(source, name)
    data = _read_source(source, label)
    img = _open_checked(data, label)
    source_mode = img.mode
    # A broken EXIF block must not reject an otherwise good picture.
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, SyntaxError, struct.error):
        img = ImageOps.exif_transpose(img) or img
    rgb = _to_rgb(img, label)
    width, height = rgb.size
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise ImageLoadError(
            f"{label}: the image is too small ({width} x {height} pixels; at least "
            f"{MIN_IMAGE_SIDE} x {MIN_IMAGE_SIDE} is needed). Use the full-resolution photo."
        )
    rgb.info["fod_source_mode"] = source_mode
    return rgb


def prepare_image(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize to exactly ``image_size`` x ``image_size`` (LANCZOS, aspect not kept).

    Returns float32 ``(3, S, S)`` with values in [0, 1].
    """
    return to_unit_float(prepare_image_uint8(img, image_size))


def prepare_image_uint8(img: Image.Image, image_size: int) -> np.ndarray:
    """``prepare_image`` before the scaling to [0, 1]: uint8 ``(3, S, S)``, a quarter of the memory (762 training
    images at 256 px: 150 MB instead of 600 MB). ``to_unit_float`` gives exactly ``prepare_image``'s array."""
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if img.mode != "RGB":
        img = _to_rgb(img, "image")
    size = int(image_size)
    resized = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """A prepared image as float32 in [0, 1]: uint8 ones (``prepare_image_uint8``) divided by 255, others as they
    are."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    return image


def stack_unit_float(images: Iterable[np.ndarray]) -> np.ndarray:
    """(B, 3, S, S) float32 batch in [0, 1] of prepared images, float or uint8 (``to_unit_float``)."""
    return np.stack([to_unit_float(np.asarray(image)) for image in images])


def load_mask(path: str | Path | None, image_size: int) -> np.ndarray:
    """Load a ground-truth mask as bool ``(S, S)``: any value > 0 marks a defect pixel.

    Resized with NEAREST so that the mask stays binary. A missing mask raises DatasetError.
    """
    if path is None or not Path(path).is_file():
        raise DatasetError(
            f"Ground-truth mask not found: {path}. Every defective test image needs a mask "
            "(white = defect, black = good) at ground_truth/<defect type>/<image name>_mask.png."
        )
    path = Path(path)
    try:
        img = _open_checked(_read_source(path, path.name), f"mask {path.name}")
    except ImageLoadError as exc:
        raise DatasetError(f"Ground-truth mask cannot be read: {exc}") from exc
    arr = np.asarray(img)
    if img.mode in ("RGBA", "LA", "PA"):
        arr = arr[..., :-1]
    elif img.mode == "P":
        arr = np.asarray(img.convert("L"))
    binary = arr > 0
    if binary.ndim == 3:
        binary = binary.any(axis=2)
    size = int(image_size)
    small = Image.fromarray(binary.astype(np.uint8) * 255, mode="L").resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(small) > 0


# --------------------------------------------------------------------------- folders


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in ("__MACOSX", "Thumbs.db", "desktop.ini")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not _is_hidden(name)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (optionally sub-folders), sorted; hidden files ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"Folder not found: {folder}.")
    found: list[Path] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        for entry in current.iterdir():
            if _is_hidden(entry.name):
                continue
            if entry.is_dir():
                if recursive:
                    stack.append(entry)
            elif entry.is_file() and _is_image_name(entry.name):
                found.append(entry)
    return sorted(found)


@dataclass
class LoadReport:
    """Result of :func:`load_images`: prepared arrays plus the files that failed and why."""

    images: list[tuple[str, np.ndarray]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def _iter_named_sources(sources: Iterable[Any]) -> Iterable[tuple[str, Any]]:
    for index, src in enumerate(sources, start=1):
        if isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], str):
            yield src[0], src[1]
        elif isinstance(src, (str, Path)):
            yield Path(src).name, src
        elif isinstance(src, (bytes, bytearray, memoryview)):
            yield f"image #{index}", src
        else:
            yield getattr(src, "name", None) or f"image #{index}", src


def load_images(sources: Iterable[Any], image_size: int, *, compact: bool = False) -> LoadReport:
    """Load and prepare many images; a bad file is recorded, never fatal for the batch.

    Each source is a path, bytes, a ``(name, bytes_or_path)`` tuple or a file-like object
    with a ``name`` (e.g. a Streamlit ``UploadedFile``). ``compact``: uint8 arrays (``prepare_image_uint8``), as
    ``training.train`` takes them, instead of float32 ones.
    """
    prepare = prepare_image_uint8 if compact else prepare_image
    report = LoadReport()
    for raw_label, src in _iter_named_sources(sources):
        label = _display_name(str(raw_label))
        try:
            img = load_image(src, name=label)
            report.images.append((label, prepare(img, image_size)))
        except ImageLoadError as exc:
            prefix = f"{label}: "
            message = str(exc)
            report.failures.append((label, message.removeprefix(prefix)))
        except MemoryError:
            report.failures.append((label, "not enough memory to open this image"))
    return report


def check_enough_images(n: int, minimum: int = MIN_TRAIN_IMAGES) -> None:
    """Raise DatasetError if ``n`` is below the number of good images needed to train."""
    if n < minimum:
        raise DatasetError(
            f"Need at least {minimum} good images to train; got {n}. Add more photos of "
            f"defect-free parts taken the same way ({RECOMMENDED_TRAIN_IMAGES}+ recommended)."
        )


# --------------------------------------------------------------------------- MVTec layout


@dataclass
class TestItem:
    """One evaluation image: label 0 = good, 1 = defective (then ``mask_path`` is set)."""

    __test__ = False  # not a pytest test class

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


@dataclass
class MVTecDataset:
    """A data set in the MVTec AD layout (``train/good``, ``test/<type>``, ``ground_truth``)."""

    root: Path
    train_good: list[Path]
    test_items: list[TestItem]

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect type names present in the test set (excluding ``good``)."""
        return sorted({t.defect_type for t in self.test_items if t.label == 1})


def _child_dir(parent: Path, name: str) -> Path | None:
    """``parent/name`` matched case-insensitively (zips made on Windows vary in case)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    if not parent.is_dir():
        return None
    for entry in parent.iterdir():
        if entry.is_dir() and entry.name.lower() == name.lower():
            return entry
    return None


def is_mvtec_layout(root: str | Path) -> bool:
    """True if ``root`` has a ``train/good`` folder (the MVTec AD category layout)."""
    train = _child_dir(Path(root), "train")
    return train is not None and _child_dir(train, "good") is not None


def _find_mask(gt_dir: Path | None, stem: str) -> Path | None:
    if gt_dir is None:
        return None
    for candidate_stem in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for suffix in (ext, ext.upper()):
                path = gt_dir / f"{candidate_stem}{suffix}"
                if path.is_file():
                    return path
    return None


def load_mvtec_layout(root: str | Path) -> MVTecDataset:
    """Read an MVTec-style category folder; raise DatasetError describing what is wrong.

    ``train/good`` is required. ``test/<type>/`` is optional (empty ``test_items`` if absent);
    ``test/good`` images get label 0 and no mask, every other type label 1 and the mask
    ``ground_truth/<type>/<stem>_mask.png`` (all-zero masks are allowed).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Folder not found: {root}.")
    train = _child_dir(root, "train")
    train_good_dir = _child_dir(train, "good") if train is not None else None
    if train_good_dir is None:
        raise DatasetError(
            f"{root.name}: no train/good folder. An evaluation data set needs the layout "
            "train/good/ (defect-free images), test/<type>/ and ground_truth/<type>/."
        )
    train_good = list_images(train_good_dir)
    if not train_good:
        raise DatasetError(
            f"{root.name}: train/good contains no images ({_FORMATS_TEXT}). Put the defect-free training photos there."
        )
    test_items: list[TestItem] = []
    missing: list[str] = []
    test_dir = _child_dir(root, "test")
    gt_root = _child_dir(root, "ground_truth")
    if test_dir is not None:
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not _is_hidden(p.name)):
            defect_type = type_dir.name
            is_good = defect_type.lower() == "good"
            gt_dir = _child_dir(gt_root, defect_type) if gt_root is not None else None
            for path in list_images(type_dir):
                if is_good:
                    test_items.append(TestItem(path, 0, "good", None))
                    continue
                mask = _find_mask(gt_dir, path.stem)
                if mask is None:
                    missing.append(f"test/{defect_type}/{path.name}")
                else:
                    test_items.append(TestItem(path, 1, defect_type, mask))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(
            f"{root.name}: {len(missing)} defective test image(s) have no ground-truth mask: {shown}. "
            "Each needs ground_truth/<type>/<image name>_mask.png (white = defect; an all-black "
            "mask is fine if the defect cannot be outlined)."
        )
    return MVTecDataset(root=root, train_good=train_good, test_items=test_items)


def _header_size(path: Path, exif: bool) -> tuple[int, int] | None:
    """(width, height) from the file header (EXIF orientation applied when ``exif``); None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112) if exif else None
    except Exception:  # noqa: BLE001 - unreadable files are reported by the loader, with the reason
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _mvtec_name(path: Path) -> str:
    """``ground_truth/<type>/<file>`` or ``test/<type>/<file>``: how an MVTec file is named in messages."""
    return f"{path.parent.parent.name}/{path.parent.name}/{_display_name(path.name)}"


def check_mask_sizes(items: Sequence[TestItem], name: Callable[[Path], str] = _mvtec_name) -> None:
    """Refuse ground-truth masks whose size differs from their image's; the message names the files
    (``name(path)``, MVTec-style by default).

    A mask of another size would have to be stretched onto the image, which moves or distorts the defect
    outline and silently falsifies the pixel metrics. Read from the headers only (fast); files that cannot
    be read are left to the loader, which reports them.
    """
    wrong = []
    for item in items:
        if not item.label or item.mask_path is None:
            continue
        image_size = _header_size(item.path, exif=True)
        mask_size = _header_size(item.mask_path, exif=False)  # load_mask does not apply EXIF orientation
        if image_size is not None and mask_size is not None and image_size != mask_size:
            wrong.append(
                f"{name(item.mask_path)} is {mask_size[0]} x {mask_size[1]} but "
                f"{name(item.path)} is {image_size[0]} x {image_size[1]}"
            )
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise DatasetError(
            f"{len(wrong)} ground-truth mask(s) do not have the size of their image: {shown}. Masks are not "
            "stretched (that would move the defect outlines); save each mask at its image's exact size."
        )


def resolve_training_images(path: str | Path) -> list[Path]:
    """Good training images from a plain folder of images or an MVTec category (train/good)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"Folder not found: {path}.")
    if is_mvtec_layout(path):
        train = _child_dir(path, "train")
        assert train is not None
        good = _child_dir(train, "good")
        assert good is not None
        images = list_images(good)
        where = f"{path.name}/train/good"
    else:
        images = list_images(path)
        where = path.name
    if not images:
        raise DatasetError(
            f"{where}: no images found ({_FORMATS_TEXT}). Choose a folder that directly contains "
            "the good images, or an MVTec-style folder with train/good."
        )
    return images


# --------------------------------------------------------------------------- fingerprint


def _hash_bytes_or_file(item: str | Path | bytes) -> str:
    digest = hashlib.sha256()
    if isinstance(item, (bytes, bytearray, memoryview)):
        digest.update(item)
    else:
        with open(item, "rb") as fh:
            for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def dataset_fingerprint(
    paths_or_bytes: Iterable[str | Path | bytes | tuple[str, bytes]],
) -> str:
    """SHA-256 over the sorted (file name, content SHA-256) pairs; order-independent.

    Items are paths, raw bytes (name taken as empty) or ``(name, bytes)`` tuples. Moving the
    folder elsewhere keeps the fingerprint; changing, adding or renaming a file changes it.
    """
    pairs: list[tuple[str, str]] = []
    for item in paths_or_bytes:
        if isinstance(item, tuple):
            label, content = item
            pairs.append((_normalise_name(str(label)), _hash_bytes_or_file(content)))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            pairs.append(("", _hash_bytes_or_file(item)))
        else:
            pairs.append((_normalise_name(Path(item).name), _hash_bytes_or_file(item)))
    digest = hashlib.sha256()
    for label, content_hash in sorted(pairs):
        digest.update(label.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
        digest.update(content_hash.encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()


def _normalise_name(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def names_for(paths: Sequence[Path]) -> list[str]:
    """Short unique display names for paths (file name, or parent/name when names clash)."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.name] = counts.get(p.name, 0) + 1
    return [p.name if counts[p.name] == 1 else f"{p.parent.name}/{p.name}" for p in paths]
