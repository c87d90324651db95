"""Training: cache frozen backbone features once, fit FOD with a fixed epoch budget, calibrate.

No test labels influence anything here: the epoch budget is fixed and the threshold comes from held-out
good images only.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbone import create_feature_extractor
from .calibration import Calibration, holdout_count
from .config import FODConfig
from .data import check_enough_images
from .inference import Detector, autocast_context, device_label, resolve_device
from .losses import level_loss
from .model import create_model, to_tokens


class TrainingCancelled(Exception):
    """Raised inside ``train`` when the cancel token is set; nothing is saved."""


class CancelToken:
    """Thread-safe cancel flag shared between a UI and a training worker."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Progress:
    """A training progress report, sent to the progress callback.

    phase: 'features' | 'reference' | 'training' | 'calibration' | 'done'.
    """

    phase: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    fraction: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    message: str = ""


ProgressCallback = Callable[[Progress], None]


def split_holdout(n_images: int, config: FODConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of image indices into (train, calibration hold-out)."""
    check_enough_images(n_images)  # DatasetError (a ValueError) with the user-facing message
    order = np.random.default_rng(config.seed).permutation(n_images)
    n_hold = holdout_count(n_images, config.holdout_fraction, config.min_holdout)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


@torch.inference_mode()
def extract_features(
    backbone: torch.nn.Module,
    images: list[np.ndarray],
    device: torch.device,
    batch_size: int = 16,
    cancel: CancelToken | None = None,
    report: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Frozen backbone features for all images: per level (N, C, H, W) on ``device``."""
    parts: list[list[torch.Tensor]] = []
    for start in range(0, len(images), batch_size):
        if cancel is not None and cancel.cancelled:
            raise TrainingCancelled()
        batch = torch.as_tensor(
            np.stack(images[start : start + batch_size]),
            dtype=torch.float32,
            device=device,
        )
        parts.append([f.float() for f in backbone(batch)])
        if report is not None:
            report(min(start + batch_size, len(images)))
    return [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))]


def train(
    images: list[np.ndarray],
    config: FODConfig,
    *,
    device: str = "auto",
    weights: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    metadata: dict[str, Any] | None = None,
) -> Detector:
    """Train a FOD detector on good images ((3, S, S) float arrays in [0, 1]) and calibrate it.

    Returns a ``Detector`` whose ``metadata`` holds timings, counts and versions for the bundle.
    Raises ``TrainingCancelled`` when ``cancel`` is set, ``ValueError`` for too few images.
    """
    started = time.perf_counter()
    report = progress or (lambda _p: None)
    dev = resolve_device(device)
    train_idx, hold_idx = split_holdout(len(images), config)
    torch.manual_seed(config.seed)

    report(Progress("features", message="Loading backbone"))
    backbone = create_feature_extractor(config.backbone, weights=weights, device=dev)
    n_total = len(images)
    all_features = extract_features(
        backbone,
        images,
        dev,
        cancel=cancel,
        report=lambda done: report(
            Progress(
                "features",
                step=done,
                steps=n_total,
                fraction=done / n_total,
                elapsed_s=time.perf_counter() - started,
                message=f"Backbone features {done}/{n_total}",
            )
        ),
    )
    train_sel = torch.as_tensor(train_idx, device=dev)
    train_features = [f.index_select(0, train_sel) for f in all_features]
    hold_features = [f.index_select(0, torch.as_tensor(hold_idx, device=dev)) for f in all_features]
    t_features = time.perf_counter() - started

    report(Progress("reference", message="Reference features (per-position mean)"))
    model = create_model(config, backbone.channels, backbone.strides).to(dev)
    model.set_reference_features(
        [to_tokens(f).mean(0) for f in train_features],
        [channel_statistics(f) for f in train_features] if config.normalize_features else None,
    )

    _fit(model, train_features, config, dev, report, cancel, started)
    t_train = time.perf_counter() - started - t_features

    report(
        Progress(
            "calibration",
            fraction=1.0,
            elapsed_s=time.perf_counter() - started,
            message="Calibrating on held-out good images",
        )
    )
    detector = Detector(backbone, model, None, device=dev)
    hold_scores = [
        detector.score_features([f[start : start + 8] for f in hold_features]).image_score.float().cpu()
        for start in range(0, len(hold_idx), 8)
    ]
    detector.calibration = Calibration.from_scores(torch.cat(hold_scores).numpy(), config.threshold_quantile)
    elapsed = time.perf_counter() - started
    detector.metadata = {
        **(metadata or {}),
        "training": {
            "n_images": n_total,
            "n_train": len(train_idx),
            "n_calibration": len(hold_idx),
            "seconds_total": round(elapsed, 2),
            "seconds_features": round(t_features, 2),
            "seconds_fit": round(t_train, 2),
            "device": device_label(dev),
            "fod_inspector_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        },
        "backbone": {
            "name": config.backbone,
            "weights_sha256": backbone.weights_sha256,
            "channels": list(backbone.channels),
            "strides": list(backbone.strides),
        },
    }
    report(Progress("done", fraction=1.0, elapsed_s=elapsed, message="Done"))
    return detector


def _fit(
    model: torch.nn.Module,
    features: list[torch.Tensor],
    config: FODConfig,
    device: torch.device,
    report: ProgressCallback,
    cancel: CancelToken | None,
    started: float,
) -> None:
    """The optimisation loop: Adam, fixed epochs, shuffled mini-batches of cached features."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    n = features[0].shape[0]
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    generator = torch.Generator().manual_seed(config.seed)
    fit_start = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, config.batch_size):
            if cancel is not None and cancel.cancelled:
                raise TrainingCancelled()
            idx = order[start : start + config.batch_size]
            terms = _train_step(
                model,
                [f.index_select(0, idx) for f in features],
                config,
                optimizer,
                device,
            )
            step += 1
            per_step = (time.perf_counter() - fit_start) / step
            report(
                Progress(
                    "training",
                    epoch=epoch + 1,
                    epochs=config.epochs,
                    step=step,
                    steps=total_steps,
                    fraction=step / total_steps,
                    elapsed_s=time.perf_counter() - started,
                    eta_s=per_step * (total_steps - step),
                    losses=terms,
                    message=f"Epoch {epoch + 1}/{config.epochs}",
                )
            )


def _train_step(
    model: torch.nn.Module,
    features: list[torch.Tensor],
    config: FODConfig,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> dict[str, float]:
    """One optimisation step over all levels; returns loss terms averaged over levels.

    Backward runs per level, which frees that level's (L, L) maps before the next level's forward. With
    ``zero_grad_quirk`` (official torch-1.13 behaviour) gradients are zeroed, not freed, and Adam steps after
    every level, so each parameter gets two Adam steps per batch.
    """
    terms: dict[str, float] = {}
    quirk = config.zero_grad_quirk
    optimizer.zero_grad(set_to_none=not quirk)
    for level, feat, grid in zip(model.levels, features, model.grids):
        if quirk:
            optimizer.zero_grad(set_to_none=False)
        with autocast_context(device):
            output = level(to_tokens(feat), sample_rows(grid, config, device), config.use_intra, config.use_inter)
        loss, level_terms = level_loss(output, grid, config)
        loss.backward()
        if quirk:
            optimizer.step()
        _accumulate(terms, level_terms, len(features))
    if not quirk:
        optimizer.step()
    return terms


def channel_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over images and positions: (N, C, H, W) -> two (C,)."""
    flat = features.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.std(1)


def sample_rows(grid: tuple[int, int], config: FODConfig, device: torch.device) -> torch.Tensor | None:
    """Random query rows (sorted) for the correlation losses, or None for all rows."""
    n_tokens = grid[0] * grid[1]
    if config.correlation_rows <= 0 or config.correlation_rows >= n_tokens:
        return None
    return torch.randperm(n_tokens, device=device)[: config.correlation_rows].sort().values


def _accumulate(terms: dict[str, float], new: dict[str, float], n_levels: int) -> None:
    for key, value in new.items():
        terms[key] = terms.get(key, 0.0) + value / n_levels
