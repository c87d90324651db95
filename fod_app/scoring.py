"""Anomaly scoring (paper Eq. 12, spec §7): per-patch scores, maps, smoothing, image score.

Raw maps are in model units; ``calibration`` turns them into the fixed display unit (1.0 = threshold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .config import FODConfig
from .correlation import symmetric_kl, target_correlation
from .model import BranchState, LevelOutput, reconstruction_error


def branch_divergence(states: list[BranchState], grid: tuple[int, int], eps: float) -> torch.Tensor | None:
    """Layer-mean symmetric KL between correlation and target, head-averaged: -> (B, L); None if absent."""
    if not states:
        return None
    total = None
    for state in states:
        div = symmetric_kl(state.correlation, target_correlation(state.sigma, grid, state.rows), eps).mean(1)
        total = div if total is None else total + div
    return total / len(states)


def divergence_weight(divergence: torch.Tensor, mode: str) -> torch.Tensor:
    """Weight from ``p = softmax(-Div)`` over the image's tokens: ``max(p) - p`` or ``1 - p``. (B, L)."""
    p = torch.softmax(-divergence, dim=-1)
    if mode == "max_minus_p":
        return p.max(dim=-1, keepdim=True).values - p
    return 1.0 - p


@dataclass
class LevelScores:
    """Per-token scores of one level, each (B, L): reconstruction error, divergences, final score."""

    reconstruction: torch.Tensor
    intra_divergence: torch.Tensor | None
    inter_divergence: torch.Tensor | None
    score: torch.Tensor


def level_scores(output: LevelOutput, grid: tuple[int, int], config: FODConfig) -> LevelScores:
    """Score the tokens of one level (its ``tokens`` against its reconstruction)."""
    rec = reconstruction_error(output.tokens.float(), output.reconstruction.float())
    intra = branch_divergence(output.intra, grid, config.eps)
    inter = branch_divergence(output.inter, grid, config.eps)
    if config.variant == "reconstruction":
        score = rec
    else:
        # Full FOD scores with the inter divergence only (official code and Eq. 12).
        divergence = intra if config.variant == "intra" else inter
        if divergence is None:
            raise ValueError(f"variant {config.variant!r} needs the correlations of its branch")
        score = rec * divergence_weight(divergence, config.score_weight)
    return LevelScores(rec, intra, inter, score)


def upsample_tokens(values: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """(B, L) token values -> (B, size, size), bilinear with align_corners=True (official)."""
    maps = values.reshape(values.shape[0], 1, *grid)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur like ``scipy.ndimage.gaussian_filter(sigma, truncate=4, mode='reflect')``.

    maps: (B, H, W) -> (B, H, W).
    """
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps.unsqueeze(1)
    # scipy 'reflect' (half-sample symmetric) == torch 'replicate' for 1 px, 'reflect' excludes the
    # edge pixel; build it explicitly by flipping.
    x = torch.cat([x[..., :radius].flip(-1), x, x[..., -radius:].flip(-1)], dim=-1)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = torch.cat([x[..., :radius, :].flip(-2), x, x[..., -radius:, :].flip(-2)], dim=-2)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


@dataclass
class ScoreMaps:
    """Image-level results of a batch, raw model units.

    anomaly_map: (B, S, S) smoothed score map; image_score: (B,) its max.
    branch_maps: name -> (B, S, S) unsmoothed level-averaged maps ("reconstruction", "intra_divergence",
    "inter_divergence", "score").
    """

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    branch_maps: dict[str, torch.Tensor]
    levels: list[LevelScores]


def score_maps(
    outputs: list[LevelOutput],
    grids: list[tuple[int, int]],
    config: FODConfig,
    with_branches: bool = False,
) -> ScoreMaps:
    """Combine levels: upsample each level's token scores, average levels, smooth, take the max."""
    size = config.image_size
    per_level = [level_scores(out, grid, config) for out, grid in zip(outputs, grids)]
    names = ("score", "reconstruction", "intra_divergence", "inter_divergence") if with_branches else ("score",)
    branch_maps = {
        name: torch.stack([upsample_tokens(getattr(s, name), g, size) for s, g in zip(per_level, grids)]).mean(0)
        for name in names
        if all(getattr(s, name) is not None for s in per_level)
    }
    smoothed = gaussian_smooth(branch_maps["score"], config.smoothing_sigma)
    return ScoreMaps(smoothed, smoothed.flatten(1).max(dim=1).values, branch_maps, per_level)


def needs_branches(config: FODConfig, with_branches: bool) -> tuple[bool, bool]:
    """Which branches' correlations scoring needs: (intra, inter)."""
    if with_branches:
        return True, True
    return config.variant == "intra", config.variant in ("full", "inter")
