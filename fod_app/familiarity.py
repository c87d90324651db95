"""Wrong-part check: does an image look like the parts a model was trained on?

FOD scores *local* deviations from good parts; an image of a different part (solar cells fed to a bottle model)
scores high everywhere and would be called "NG" with a confident heat map. This module gives each image one
global **appearance descriptor** — the backbone feature maps mean-pooled over all positions, per level,
concatenated: (B, C_1 + C_2) — and compares it with the training images' descriptors:

* ``distance``: root-mean-square z-score of the descriptor against the training descriptors' per-channel mean
  and spread (the spread floored at a fraction of its median, so near-constant channels cannot explode it).
  Good training images sit around 1.
* ``limit``: ``MARGIN`` times the largest distance among the **held-out** good images (never used to fit the
  reference), and at least ``MARGIN`` times the 99th percentile of the training images' own distances.
* An image is **unfamiliar** when ``distance / limit >= 1`` ("familiarity units", 1.0 = the limit).

A defect is local, so it barely moves a mean-pooled descriptor; a different part, background, camera or
lighting moves it far. Stored in the bundle metadata as plain JSON (``FamiliarityReference.to_dict``); models
trained before this check have none and simply skip it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: Allowed distance = MARGIN x the largest held-out good image's distance. Measured (rms, lite0): wrong parts sit 4-16x
#: beyond that largest distance, good test images within 1.6x, gross defects (broken bottles) 1-6x.
MARGIN = 3.0
#: Smallest allowed distance limit (distances are in per-channel spreads), for sets of identical photos.
MIN_LIMIT = 1e-3
#: Per-channel spreads are floored at this fraction of the median spread.
SPREAD_FLOOR = 0.1
METHOD = "rms z-score of mean-pooled backbone features (per level, concatenated) vs. training images"
MESSAGE = "These images do not look like the parts this model was trained on"


def descriptors(features: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features per level (B, C_l, H_l, W_l) -> appearance descriptors (B, sum C_l), float32."""
    return torch.cat([f.float().mean(dim=(2, 3)) for f in features], dim=1)


@dataclass
class FamiliarityReference:
    """Per-channel mean/spread (D,) of training descriptors and the allowed distance ``limit``."""

    mean: np.ndarray
    spread: np.ndarray
    limit: float
    holdout_distances: list[float]
    n_train: int

    def distances(self, descriptor: torch.Tensor | np.ndarray) -> np.ndarray:
        """Descriptors (B, D) -> distances (B,) (RMS z-score; about 1 for training images)."""
        values = descriptor.detach().float().cpu().numpy() if isinstance(descriptor, torch.Tensor) else descriptor
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != self.mean.shape[0]:
            raise ValueError(f"descriptor shape {values.shape} does not match the reference ({self.mean.shape[0]},)")
        return np.sqrt(np.mean(((values - self.mean) / self.spread) ** 2, axis=1))

    def units(self, descriptor: torch.Tensor | np.ndarray) -> np.ndarray:
        """Descriptors (B, D) -> distances in familiarity units (B,): 1.0 = the limit; >= 1 = unfamiliar."""
        return self.distances(descriptor) / self.limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "margin": MARGIN,
            "mean": [float(v) for v in self.mean],
            "spread": [float(v) for v in self.spread],
            "limit": float(self.limit),
            "holdout_distances": [round(float(v), 4) for v in self.holdout_distances],
            "n_train": int(self.n_train),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamiliarityReference:
        """Parse and check bundle metadata; ValueError when malformed."""
        if not isinstance(data, dict):
            raise ValueError("familiarity reference must be an object")
        mean = np.asarray(data["mean"], dtype=np.float64)
        spread = np.asarray(data["spread"], dtype=np.float64)
        limit = float(data["limit"])
        if mean.ndim != 1 or mean.shape != spread.shape or mean.size == 0:
            raise ValueError("familiarity mean/spread must be equal-length non-empty lists")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(spread)) and np.all(spread > 0)):
            raise ValueError("familiarity mean/spread must be finite, spread positive")
        if not np.isfinite(limit) or limit <= 0:
            raise ValueError("familiarity limit must be a positive number")
        holdout = [float(v) for v in data.get("holdout_distances", [])]
        return cls(mean, spread, limit, holdout, int(data.get("n_train", 0)))


def fit_reference(train_descriptors: torch.Tensor, holdout_descriptors: torch.Tensor) -> FamiliarityReference:
    """Reference from training descriptors (N, D) and the limit from held-out good descriptors (M, D)."""
    train = train_descriptors.detach().double().cpu().numpy()
    if train.shape[0] < 2:
        raise ValueError("the familiarity reference needs at least 2 training images")
    mean = train.mean(axis=0)
    spread = train.std(axis=0, ddof=1)
    floor = max(float(np.median(spread)) * SPREAD_FLOOR, 1e-6)
    spread = np.maximum(spread, floor)
    reference = FamiliarityReference(mean, spread, 1.0, [], train.shape[0])
    own = reference.distances(train)
    held = reference.distances(holdout_descriptors) if holdout_descriptors.shape[0] else np.zeros(0)
    base = max(float(held.max()) if held.size else 0.0, float(np.quantile(own, 0.99)))
    # identical training photos give distance 0 everywhere: keep a positive limit (the same photo stays familiar)
    reference.limit = max(MARGIN * base, MIN_LIMIT)
    reference.holdout_distances = [float(v) for v in held]
    return reference


def reference_from_metadata(meta: dict[str, Any] | None) -> FamiliarityReference | None:
    """The bundle's reference, or None for models trained before the check (or without metadata)."""
    data = (meta or {}).get("familiarity")
    return None if data is None else FamiliarityReference.from_dict(data)


def is_unfamiliar(units: float) -> bool:
    """The wrong-part rule: a distance at or beyond the limit (``units`` = distance / limit >= 1.0)."""
    return units >= 1.0


def summary(flags: list[bool]) -> str | None:
    """'These images do not look like … (3 of 5 images).' for a batch, or None when none is flagged."""
    n = sum(bool(f) for f in flags)
    if not n:
        return None
    plural = "s" if len(flags) != 1 else ""
    return (
        f"{MESSAGE} ({n} of {len(flags)} image{plural}): a different part, camera, lighting or framing? "
        "Their scores and verdicts are not meaningful."
    )
