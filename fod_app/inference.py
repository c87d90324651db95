"""The ``Detector``: backbone + FOD model + calibration, scoring images end to end.

Pages and the CLI call this; nothing here knows about Streamlit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import ignore_regions
from .calibration import Calibration, verdict
from .config import FODConfig
from .data import stack_unit_float
from .familiarity import FamiliarityReference, descriptors, is_unfamiliar, reference_from_metadata
from .ignore_regions import IgnoreRegions
from .model import FODModel, LevelOutput
from .scoring import MIN_IMAGE_SCORE, ScoreMaps, ScoreSpec, needs_branches, score_maps


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU. 'cuda' without a GPU raises a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def device_label(device: torch.device) -> str:
    """Human-readable device name, e.g. 'CPU (2 threads)' or 'GPU: NVIDIA H100'."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads)"


def autocast_context(device: torch.device) -> Any:
    """bf16 autocast on CUDA (AMP), a no-op on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@dataclass
class InspectionResult:
    """One inspected image. ``score`` and ``anomaly_map`` (S, S) are in threshold units (1.0 = threshold)."""

    name: str
    score: float
    verdict: str
    anomaly_map: np.ndarray
    raw_score: float
    #: Wrong-part check (``fod_app.familiarity``): True when the image does not look like the training parts.
    unfamiliar: bool = False
    #: Global appearance distance in familiarity units (1.0 = the limit); None for models without the check.
    familiarity: float | None = None


@dataclass
class Detector:
    """A trained FOD model ready to score images. Images are (3, S, S) float arrays in [0, 1]."""

    backbone: torch.nn.Module
    model: FODModel
    calibration: Calibration | None
    metadata: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    score_spec: ScoreSpec = field(default_factory=ScoreSpec)  # how branches combine (chosen at training)
    ignore_regions: IgnoreRegions | None = None  # image parts that never count (``fod_app.ignore_regions``)

    @property
    def config(self) -> FODConfig:
        return self.model.config

    def to_batch(self, images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """List of (3, S, S) arrays (float in [0, 1], or uint8: ``data.stack_unit_float``) -> (B, 3, S, S) tensor
        on the detector's device."""
        return torch.as_tensor(stack_unit_float(images), dtype=torch.float32, device=self.device)

    @torch.inference_mode()
    def forward(
        self, batch: torch.Tensor, with_intra: bool = True, with_inter: bool = True, with_nearest: bool = True
    ) -> tuple[list[torch.Tensor], list[LevelOutput]]:
        """(B, 3, S, S) -> (backbone features per level (B, C, H, W), FOD outputs per level)."""
        features = self.backbone(batch)
        return features, self._model_outputs(features, with_intra, with_inter, with_nearest)

    def _model_outputs(
        self, features: list[torch.Tensor], with_intra: bool, with_inter: bool, with_nearest: bool = True,
        with_reconstruction: bool = True,
    ) -> list[LevelOutput]:
        self.model.eval()
        with autocast_context(self.device):
            return self.model(features, with_intra, with_inter, with_nearest, with_reconstruction)

    @torch.inference_mode()
    def score_features(self, features: list[torch.Tensor], with_branches: bool = False) -> ScoreMaps:
        """Backbone features (per level (B, C, H, W)) -> raw ``ScoreMaps``."""
        outputs = self._model_outputs(features, *needs_branches(self.config, self.score_spec, with_branches))
        maps = score_maps(outputs, self.model.grids, self.config, self.score_spec, with_branches)
        if self.ignore_regions is not None:
            ignored = self._ignored_mask(maps.anomaly_map.device)
            maps.anomaly_map, maps.image_score = ignore_regions.apply(maps.anomaly_map, ignored, MIN_IMAGE_SCORE)
            if "combined" in maps.branch_image_scores:
                maps.branch_image_scores["combined"] = maps.image_score
        return maps

    def _ignored_mask(self, device: torch.device) -> torch.Tensor:
        """(S, S) bool tensor of ``ignore_regions`` on ``device``, built once per regions object and device."""
        regions, cached = self.__dict__.get("_ignored_tensor", (None, None))
        if regions is not self.ignore_regions or cached.device != device:
            ignored = np.array(self.ignore_regions.ignored(self.config.image_size))  # a writable copy for torch
            cached = torch.as_tensor(ignored, device=device)
            self.__dict__["_ignored_tensor"] = (self.ignore_regions, cached)
        return cached

    @torch.inference_mode()
    def score_batch(self, batch: torch.Tensor, with_branches: bool = False) -> ScoreMaps:
        """(B, 3, S, S) -> raw ``ScoreMaps``."""
        return self.score_features(self.backbone(batch), with_branches)

    def raw_scores(self, images: Iterable[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """Raw image scores (N,) for a stream of (3, S, S) arrays (used for calibration)."""
        scores = [self.score_batch(self.to_batch(chunk)).image_score.cpu() for chunk in _chunks(images, batch_size)]
        return torch.cat(scores).numpy() if scores else np.zeros(0)

    def inspect(
        self,
        named_images: Iterable[tuple[str, np.ndarray]],
        batch_size: int = 8,
        threshold_units: float = 1.0,
    ) -> Iterator[InspectionResult]:
        """Score named (3, S, S) images lazily, in batches; yields results in threshold units."""
        if self.calibration is None:
            raise RuntimeError("this model has no calibration; train it again")
        review = self.calibration.review_threshold
        review_units = None if review is None else review / self.calibration.threshold
        appearance = self.familiarity_reference()
        for chunk in _chunks(named_images, batch_size):
            names = [name for name, _ in chunk]
            with torch.inference_mode():
                features = self.backbone(self.to_batch([img for _, img in chunk]))
            maps = self.score_features(features)
            familiar_units = None if appearance is None else appearance.units(descriptors(features))
            units_maps = (maps.anomaly_map / self.calibration.threshold).float().cpu().numpy()
            raw = maps.image_score.float().cpu().numpy()
            for i, name in enumerate(names):
                score = float(raw[i] / self.calibration.threshold)
                yield InspectionResult(
                    name,
                    score,
                    verdict(score, threshold_units, review_units),
                    units_maps[i],
                    float(raw[i]),
                    unfamiliar=bool(familiar_units is not None and is_unfamiliar(familiar_units[i])),
                    familiarity=None if familiar_units is None else float(familiar_units[i]),
                )

    def familiarity_reference(self) -> FamiliarityReference | None:
        """The wrong-part reference stored with the model (None for models trained before the check)."""
        return reference_from_metadata(self.metadata)


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
