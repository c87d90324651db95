"""Each photo's exposure: how it is evened out before the backbone, and when the good photos say it should be.

A line whose lighting drifts photographs the same good part brighter or darker, with more or less contrast. With
``exposure="even"`` every photo's grey level (the channel mean) is moved to one mean and spread before the backbone
(:func:`even_exposure`; in training, the self-check, inspection and the exported ONNX graph alike), so such drift
does not change the features. With ``"auto"`` training turns it on when the good photos' own light spreads by more
than :data:`LIGHTING_SPREAD` from photo to photo (:func:`choose_exposure`; good images only, no labels).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import median_abs_deviation
from torch import Tensor

__all__ = [
    "EVEN_GREY_MEAN",
    "EVEN_GREY_SD",
    "LIGHTING_SPREAD",
    "choose_exposure",
    "describe",
    "even_exposure",
    "light_varies",
    "lighting_spread",
    "relative_spread",
]

#: :func:`even_exposure`'s target for each photo's grey level: mid grey, and a spread that leaves room before 0 and 1.
EVEN_GREY_MEAN = 0.5
EVEN_GREY_SD = 0.2

LIGHTING_SPREAD = 0.05
"""Relative spread (:func:`relative_spread`) of the good photos' brightness or contrast above which their light is
said to vary. Measured on good training images only (the larger of the two spreads; benchmark runs of
BENCHMARKS.md "Thirty-fifth session"): MVTec bottle photos (controlled light) 0.5-1.4 %, magnetic-tile crops 22-45 %,
ELPV cells 9.5-22 %, the bundled cells 13 %; 5 % lies well between."""


def even_exposure(images: Tensor) -> Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> the same with each photo's grey level (the channel mean) moved to mean
    :data:`EVEN_GREY_MEAN` and standard deviation :data:`EVEN_GREY_SD`, clipped to [0, 1].

    One gain and one offset per photo for all channels, so colours keep their ratios; a flat photo (grey sd below
    1e-3) is not amplified beyond a gain of 200. Written with plain reductions so that it exports to ONNX.
    """
    grey = images.mean(dim=1, keepdim=True)  # [B, 1, H, W]
    mean = grey.mean(dim=(2, 3), keepdim=True)  # [B, 1, 1, 1]
    sd = (grey - mean).square().mean(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-3)
    return ((images - mean) * (EVEN_GREY_SD / sd) + EVEN_GREY_MEAN).clamp(0.0, 1.0)


def relative_spread(values: np.ndarray) -> float:
    """Scaled MAD / median of ``values`` (N,): a coefficient of variation that a few odd photos do not sway (the MAD
    scaled by 1.4826 estimates the sd of normal data)."""
    return float(median_abs_deviation(values, scale="normal")) / max(float(np.median(values)), 1e-6)


def lighting_spread(images: list[np.ndarray]) -> dict[str, float]:
    """Relative spread of the photos' ``brightness`` (grey mean) and ``contrast`` (grey sd); ``images`` are
    (3, S, S) arrays, uint8 or float in [0, 1] (the scale cancels)."""
    grey = [np.asarray(image, np.float32).mean(axis=0) for image in images]
    return {"brightness": relative_spread(np.array([g.mean() for g in grey])),
            "contrast": relative_spread(np.array([g.std() for g in grey]))}


def light_varies(spread: dict[str, float]) -> bool:
    """Whether the photos' brightness or contrast spreads (:func:`lighting_spread`) by more than
    :data:`LIGHTING_SPREAD`: the one rule behind ``exposure="auto"`` and the health check's note."""
    return max(spread.values()) > LIGHTING_SPREAD


def choose_exposure(images: list[np.ndarray]) -> tuple[str, dict[str, float]]:
    """``("even" | "as_taken", lighting_spread(images))``: even when the good photos' light varies
    (:func:`light_varies`)."""
    spread = lighting_spread(images)
    return ("even" if light_varies(spread) else "as_taken"), spread


def describe(choice: dict | None) -> str:
    """What a model does to each photo's exposure, as a phrase; ``choice`` is the bundle's ``training["exposure"]``
    record (None for models saved before the switch existed: photos as taken)."""
    choice = choice or {"requested": "as_taken", "used": "as_taken"}
    what = ("each photo's brightness and contrast evened out before the network"
            if choice.get("used") == "even" else "photos used as taken")
    spread = choice.get("lighting_spread")
    if choice.get("requested") != "auto" or not spread:
        return what
    return (f"{what} (chosen automatically: the good photos' brightness spreads {100 * spread['brightness']:.0f} % "
            f"and contrast {100 * spread['contrast']:.0f} % from photo to photo; evened out above "
            f"{100 * LIGHTING_SPREAD:.0f} %)")
