"""Inspection results as history records: content hashes, the model-input image, heat map and map as PNG.

The anomaly map (S, S) in threshold units is stored losslessly enough as a 16-bit grayscale PNG of
``units * MAP_PNG_SCALE`` (0 .. 65.5 units, 0.001 resolution), so a reopened run shows the same heat maps.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .familiarity import is_unfamiliar
from .history import ImageRecord
from .inference import InspectionResult
from .visualize import image_to_uint8, overlay

MAP_PNG_SCALE = 1000.0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 or (3, S, S) float image -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image_to_uint8(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_map_png(map_units: np.ndarray) -> bytes:
    """(S, S) map in threshold units -> 16-bit grayscale PNG bytes."""
    values = np.clip(np.nan_to_num(np.asarray(map_units, dtype=np.float32)) * MAP_PNG_SCALE, 0, 65535)
    buffer = io.BytesIO()
    Image.fromarray(values.round().astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_map_png(source: bytes | str | Path) -> np.ndarray:
    """16-bit PNG (bytes or path) from :func:`encode_map_png` -> (S, S) float32 map in threshold units."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img, dtype=np.float32) / MAP_PNG_SCALE


def read_rgb(path: str | Path) -> np.ndarray:
    """A stored PNG as (H, W, 3) uint8."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def image_record(
    result: InspectionResult,
    image: np.ndarray,
    content_sha256: str,
    verdict: str | None = None,
    file_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> ImageRecord:
    """One result as an :class:`ImageRecord` with its input image (3, S, S), heat-map overlay and map as PNG."""
    amap = np.asarray(result.anomaly_map, dtype=np.float32)
    return ImageRecord(
        file_name=file_name or result.name,
        content_sha256=content_sha256,
        score=float(result.score),
        verdict=verdict or result.verdict,
        raw_score=float(result.raw_score),
        thumbnail_png=png_bytes(image),
        heatmap_png=png_bytes(overlay(image, amap, 0.5)),
        map_png=encode_map_png(amap),
        extra={
            **familiarity_extra(result.familiarity),  # the wrong-part check, when the model has one
            **(extra or {}),
        },
    )


def familiarity_extra(familiarity: float | None) -> dict[str, Any]:
    """The history's record of the wrong-part check: ``{"familiarity": f}`` (1.0 = the limit), plus
    ``"unfamiliar": True`` from the limit on; empty when the image was not checked."""
    if familiarity is None or not math.isfinite(familiarity):
        return {}
    return {"familiarity": float(familiarity), **({"unfamiliar": True} if is_unfamiliar(familiarity) else {})}


def model_identity(meta: dict[str, Any]) -> dict[str, str]:
    """``model_name``, ``model_version``, ``weights_sha256`` of a bundle's metadata (for ``record_run``)."""
    return {
        "model_name": str(meta.get("name", "?")),
        "model_version": str(meta.get("model_version", "?")),
        "weights_sha256": str((meta.get("weights") or {}).get("sha256", "")),
    }
