"""Ignore regions: parts of the image (fixtures, labels, edges) that never count toward a verdict.

A model's ignore regions are rectangles (fractions of the image width and height, so they fit any photo size:
images are resized to the model's square input without keeping the aspect ratio, and so are the regions) and/or
a mask image (white = ignore). Inside them the anomaly map is 0 (shown as normal), and the image score is the
largest value of the map *outside* them; calibration, inspection, evaluation and export all score through
``apply`` so they agree. Stored in bundle.json under ``"ignore_regions"``::

    {"rectangles": [[x0, y0, x1, y1], ...],   # fractions in [0, 1], x0 < x1, y0 < y1
     "mask_png": str | null,                   # base64 PNG of the uploaded mask at the model's input size
     "calibrated": bool}                       # False: set after training, threshold not recomputed with them
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: A mask that ignores more than this fraction of the image is refused: nothing would be inspected.
MAX_IGNORED_FRACTION = 0.9
#: Largest accepted mask upload (bytes) and side (pixels).
MAX_MASK_BYTES = 20 * 1024 * 1024
MAX_MASK_SIDE = 8192


class IgnoreRegionsError(ValueError):
    """Unusable ignore regions; the message says why in one line."""


Rectangle = tuple[float, float, float, float]


@dataclass(frozen=True)
class IgnoreRegions:
    """What to ignore. ``mask``: (S, S) bool at the model's input size, True = ignore, or None."""

    rectangles: tuple[Rectangle, ...] = ()
    mask: np.ndarray | None = field(default=None, compare=False)
    calibrated: bool = True

    def __post_init__(self) -> None:
        for rect in self.rectangles:
            check_rectangle(rect)

    @property
    def empty(self) -> bool:
        return not self.rectangles and (self.mask is None or not self.mask.any())

    def ignored(self, size: int) -> np.ndarray:
        """(size, size) bool, True where the image is ignored. Computed once per size (every scored batch asks);
        the returned array is shared: do not modify it."""
        cache = self.__dict__.setdefault("_ignored_cache", {})  # frozen dataclass: not a field, not compared
        if size in cache:
            return cache[size]
        out = np.zeros((size, size), dtype=bool)
        centres = (np.arange(size) + 0.5) / size  # a pixel is ignored when its centre lies inside the rectangle
        for x0, y0, x1, y1 in self.rectangles:
            xs = (centres >= x0) & (centres < x1)
            ys = (centres >= y0) & (centres < y1)
            out |= ys[:, None] & xs[None, :]
        if self.mask is not None:
            mask = self.mask
            if mask.shape != (size, size):
                mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 0
            out |= mask
        out.flags.writeable = False
        cache[size] = out
        return out

    def ignored_fraction(self, size: int) -> float:
        return float(self.ignored(size).mean())

    def to_dict(self) -> dict[str, Any]:
        mask_png = None
        if self.mask is not None:
            buffer = io.BytesIO()
            Image.fromarray(self.mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", optimize=True)
            mask_png = base64.b64encode(buffer.getvalue()).decode("ascii")
        return {"rectangles": [list(r) for r in self.rectangles], "mask_png": mask_png, "calibrated": self.calibrated}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> IgnoreRegions | None:
        """From bundle.json; None for no regions. Raises ``IgnoreRegionsError`` on malformed data."""
        if not data:
            return None
        if not isinstance(data, dict):
            raise IgnoreRegionsError("ignore_regions must be an object")
        try:
            rectangles = tuple(tuple(float(v) for v in r) for r in data.get("rectangles") or [])
        except (TypeError, ValueError) as err:
            raise IgnoreRegionsError(f"ignore_regions rectangles are malformed: {err}") from None
        mask = None
        if data.get("mask_png"):
            try:
                mask = read_mask_image(base64.b64decode(data["mask_png"], validate=True))
            except (ValueError, TypeError) as err:
                raise IgnoreRegionsError(f"ignore_regions mask is malformed: {err}") from None
        regions = cls(rectangles, mask, bool(data.get("calibrated", True)))  # type: ignore[arg-type]
        return None if regions.empty else regions


def check_rectangle(rect: Any) -> Rectangle:
    """A rectangle (x0, y0, x1, y1) of fractions in [0, 1] with x0 < x1 and y0 < y1, else IgnoreRegionsError."""
    try:
        x0, y0, x1, y1 = (float(v) for v in rect)
    except (TypeError, ValueError):
        raise IgnoreRegionsError(f"a rectangle is four numbers x0,y0,x1,y1; got {rect!r}") from None
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x0 >= x1 or y0 >= y1:
        raise IgnoreRegionsError(
            f"rectangle {rect!r}: use fractions of the image width/height in [0, 1] with x0 < x1 and y0 < y1"
        )
    return x0, y0, x1, y1


def parse_rectangles(text: str) -> tuple[Rectangle, ...]:
    """'x0,y0,x1,y1; x0,y0,x1,y1' (fractions; ';' or newlines between rectangles) -> rectangles."""
    parts = [p.strip() for p in text.replace("\n", ";").split(";") if p.strip()]
    return tuple(check_rectangle(p.replace(" ", "").split(",")) for p in parts)


def read_mask_image(data: bytes, size: int | None = None) -> np.ndarray:
    """Mask image bytes (any size; white/non-zero = ignore) -> (size, size) bool, or its own size if None."""
    if len(data) > MAX_MASK_BYTES:
        raise IgnoreRegionsError(f"the mask image is larger than {MAX_MASK_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if max(img.size) > MAX_MASK_SIDE:
                raise IgnoreRegionsError(f"the mask image is larger than {MAX_MASK_SIDE} pixels on a side")
            gray = img.convert("L")
            if size is not None:
                gray = gray.resize((size, size), Image.NEAREST)
            return np.asarray(gray) > 127
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise IgnoreRegionsError(f"the mask is not a readable image ({type(err).__name__})") from None


def create_ignore_regions(
    rectangles: str | tuple[Rectangle, ...] = (), mask_image: bytes | None = None, size: int = 256,
    calibrated: bool = True,
) -> IgnoreRegions | None:
    """Rectangles (text or tuples) and/or a mask image -> ``IgnoreRegions`` (None when nothing is ignored)."""
    rects = parse_rectangles(rectangles) if isinstance(rectangles, str) else tuple(map(check_rectangle, rectangles))
    mask = read_mask_image(mask_image, size) if mask_image else None
    regions = IgnoreRegions(rects, mask, calibrated)
    if regions.empty:
        return None
    if regions.ignored_fraction(size) > MAX_IGNORED_FRACTION:
        raise IgnoreRegionsError(
            f"the ignore regions cover {regions.ignored_fraction(size):.0%} of the image; "
            f"at most {MAX_IGNORED_FRACTION:.0%} can be ignored"
        )
    return regions


def apply(anomaly_map: torch.Tensor, ignored: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch of maps. anomaly_map (B, S, S), ignored (S, S) bool -> (map with 0 where ignored,
    image score (B,) = largest value outside the ignored pixels, at least ``floor``).

    Written with ``masked_fill`` only, so the ONNX export (``fod_app.export``) traces the very same operations.
    """
    masked = anomaly_map.masked_fill(ignored, 0.0)
    score = anomaly_map.masked_fill(ignored, float("-inf")).flatten(1).max(dim=1).values.clamp_min(floor)
    return masked, score


def preview(regions: IgnoreRegions | None, size: int, photo: np.ndarray | None = None) -> np.ndarray:
    """(size, size, 3) uint8 picture of what is ignored: a photo ((3, size, size) in [0, 1]) or grey, with the
    ignored pixels tinted magenta."""
    base = np.full((size, size, 3), 0.55, dtype=np.float32) if photo is None else np.transpose(photo, (1, 2, 0))
    out = base.copy()
    if regions is not None:
        ignored = regions.ignored(size)
        out[ignored] = 0.45 * out[ignored] + 0.55 * np.array([0.85, 0.1, 0.75], dtype=np.float32)
    return (np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)
