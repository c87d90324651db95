"""Heat-map colouring and overlays on a fixed scale (threshold units, see ``calibration``).

The same value gets the same colour on every image: 0 -> dark blue, 1.0 (threshold) -> yellow-orange,
``MAP_DISPLAY_MAX`` and above -> dark red.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .calibration import MAP_DISPLAY_MAX

# Anchor colours (position in [0, 1] of the display range, RGB); 0.5 is the threshold (1.0 units).
_ANCHORS = np.array(
    [
        (0.00, 20, 30, 90),
        (0.20, 30, 90, 190),
        (0.35, 40, 170, 200),
        (0.45, 120, 210, 120),
        (0.50, 250, 220, 40),
        (0.70, 245, 130, 20),
        (1.00, 150, 0, 20),
    ],
    dtype=np.float64,
)
#: Plotly colourscale with the same anchors, for charts that must match the overlays.
PLOTLY_COLORSCALE = [[float(p), f"rgb({int(r)},{int(g)},{int(b)})"] for p, r, g, b in _ANCHORS]


def colorize(map_units: np.ndarray, vmax: float = MAP_DISPLAY_MAX) -> np.ndarray:
    """(H, W) map in threshold units -> (H, W, 3) uint8 colours on the fixed scale [0, vmax]."""
    t = np.clip(np.nan_to_num(map_units / vmax), 0.0, 1.0)
    channels = [np.interp(t, _ANCHORS[:, 0], _ANCHORS[:, i]) for i in (1, 2, 3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def overlay(
    image: np.ndarray, map_units: np.ndarray, opacity: float = 0.5, vmax: float = MAP_DISPLAY_MAX
) -> np.ndarray:
    """Blend the coloured map over an image.

    image: (3, S, S) float in [0, 1] or (S, S, 3) uint8; map_units: (S, S) -> (S, S, 3) uint8.
    """
    base = image_to_uint8(image).astype(np.float32)
    colours = colorize(map_units, vmax).astype(np.float32)
    return np.clip((1.0 - opacity) * base + opacity * colours, 0, 255).astype(np.uint8)


def image_to_uint8(image: np.ndarray) -> np.ndarray:
    """(3, S, S) float [0, 1] or (S, S, 3) uint8 -> (S, S, 3) uint8."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_pil(array: np.ndarray) -> Image.Image:
    """(H, W, 3) uint8 -> PIL image."""
    return Image.fromarray(array)
