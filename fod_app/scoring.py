"""Anomaly scoring (paper Eq. 12, spec §7): per-patch branch values, their combination, maps, image score.

Each level gives per-token branch values: the reconstruction error, the intra divergence, the inter divergence
and, when the model keeps a bank of good tokens (``fod_app.memory_bank``; not part of FOD), the distance to the
nearest good token. A ``ScoreSpec`` (stored in the bundle) says how they become the score:

- ``product``: the variant's paper/official formula (``fod_app.variants``), e.g. ``rec * (1 - p)``;
- ``standardized``: each branch's *evidence* (``rec``, ``-Div_intra``, ``Div_inter``, ``nearest``; the intra direction
  is reversed, see ``fod_app.variants``) is z-scored with the mean/std of held-out good tokens of that
  level, and the z-scores are averaged with weights. Every branch then counts on the same scale.

Levels are upsampled and averaged, the map is smoothed, the image score is its max. Raw maps are in model
units; ``calibration`` turns them into the display unit (1.0 = threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from .config import FODConfig
from .correlation import symmetric_kl_consuming, target_correlation
from .model import BranchState, LevelOutput, reconstruction_error

#: Branch names, in display order, and the sign that turns each into "higher = more anomalous" evidence.
BRANCHES = ("reconstruction", "intra", "inter", "nearest")
#: The branch that training does not change: the distance to the nearest good patch of the memory bank.
UNTRAINED_BRANCH = "nearest"
EVIDENCE_SIGN = {"reconstruction": 1.0, "intra": -1.0, "inter": 1.0, "nearest": 1.0}
#: Branches whose evidence is >= 0 with 0 at a perfect patch (an error, a divergence, a distance).
NON_NEGATIVE_EVIDENCE = ("reconstruction", "inter", "nearest")
#: Smallest image score handed to calibration (standardised scores are z-values; they are positive in practice).
MIN_IMAGE_SCORE = 1e-6


#: Query rows per chunk when computing divergences for scoring. Measured on 2 CPU cores, one 32x32 level: 54 ms
#: unchunked vs 33 ms in chunks of 64 rows (the (rows, L) temporaries then stay in cache).
DIVERGENCE_CHUNK = 64


def branch_divergence(states: list[BranchState], grid: tuple[int, int], eps: float) -> torch.Tensor | None:
    """Layer-mean symmetric KL between correlation and target, head-averaged: -> (B, L); None if absent."""
    if not states:
        return None
    total = None
    for state in states:
        corr, sigma = state.correlation, state.sigma
        n_rows = corr.shape[2]
        index = state.rows if state.rows is not None else torch.arange(n_rows, device=corr.device)
        div = torch.empty(corr.shape[:3], dtype=torch.float32, device=corr.device)
        for start in range(0, n_rows, DIVERGENCE_CHUNK):
            part = slice(start, start + DIVERGENCE_CHUNK)
            target = target_correlation(sigma[:, :, part], grid, index[part])
            div[:, :, part] = symmetric_kl_consuming(corr[:, :, part], target, eps)  # target is ours
        total = div.mean(1) if total is None else total + div.mean(1)
    return total / len(states)


def divergence_weight(divergence: torch.Tensor, mode: str) -> torch.Tensor:
    """Weight from ``p = softmax(-Div)`` over the image's tokens: ``max(p) - p`` or ``1 - p``. (B, L)."""
    p = torch.softmax(-divergence, dim=-1)
    if mode == "max_minus_p":
        return p.max(dim=-1, keepdim=True).values - p
    return 1.0 - p


@dataclass
class ScoreSpec:
    """How branch values become the score. ``statistics[level][branch] = (mean, std)`` of the branch's
    evidence over held-out good tokens; ``weights[branch]`` >= 0 (standardized mode only)."""

    mode: str = "product"
    weights: dict[str, float] = field(default_factory=dict)
    statistics: list[dict[str, tuple[float, float]]] = field(default_factory=list)

    @property
    def trained_only(self) -> bool:
        """Whether the score is FOD's trained branches alone: the paper's product, or weights on the reconstruction
        error and the correlations only — none on the nearest-good-patch distance, whose bank is fixed before
        training and which, mixed in, dominates such a score's self-check AUROC."""
        if self.mode == "product":
            return True
        return self.weights.get(UNTRAINED_BRANCH, 0.0) <= 0 and any(w > 0 for w in self.weights.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "weights": dict(self.weights),
            "statistics": [{k: [float(v[0]), float(v[1])] for k, v in level.items()} for level in self.statistics],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ScoreSpec:
        """Parse and check a bundle's ``score`` record (absent in older bundles: the product score)."""
        if not data:
            return cls()
        mode = data.get("mode")
        if mode not in ("product", "standardized"):
            raise ValueError(f"score mode must be 'product' or 'standardized', got {mode!r}")
        weights = {str(k): float(v) for k, v in (data.get("weights") or {}).items()}
        statistics = [
            {str(k): (float(v[0]), float(v[1])) for k, v in level.items()} for level in data.get("statistics") or []
        ]
        spec = cls(mode, weights, statistics)
        if mode == "standardized":
            if not weights or any(k not in BRANCHES or not (v >= 0) for k, v in weights.items()):
                raise ValueError("standardized score needs non-negative weights for known branches")
            if sum(weights.values()) <= 0:
                raise ValueError("standardized score needs at least one positive weight")
            for branch, weight in weights.items():  # a branch may live on some levels only, but on one at least
                found = [level[branch] for level in statistics if branch in level]
                if weight > 0 and (not found or not all(std > 0 for _, std in found)):
                    raise ValueError(f"standardized score lacks good-image statistics for {branch!r}")
        return spec

    def score_origin(self) -> float:
        """The raw score of a patch with no evidence at all: where the score's natural zero lies (<= 0).

        Product scores are errors and weights, zero at a perfect patch: 0. Standardized scores are z-scores, whose
        zero is the good images' mean, not "no evidence": a perfect patch (zero reconstruction error, inter
        divergence and nearest distance) scores ``-sum_b w_b * mean_levels(mu_b / sigma_b)`` over those branches
        (intra evidence is a negated divergence, with no zero to anchor; it adds nothing). Calibration fits its
        log-normal model to ``score - origin`` (``fod_app.calibration``): a scale model needs the natural zero.
        """
        if self.mode != "standardized":
            return 0.0
        total = sum(w for w in self.weights.values() if w > 0)
        origin = 0.0
        for branch, weight in self.weights.items():
            levels = [level[branch] for level in self.statistics if branch in level]
            if weight > 0 and branch in NON_NEGATIVE_EVIDENCE and levels:
                origin -= weight / total * sum(mean / std for mean, std in levels) / len(levels)
        return min(origin, 0.0)

    def describe(self) -> str:
        """E.g. 'standardized: reconstruction 1, intra 1, inter 1' or 'product (paper Eq. 12)'."""
        if self.mode == "product":
            return "product (reconstruction error x correlation weight, paper Eq. 12)"
        return "standardized: " + ", ".join(f"{k} {v:g}" for k, v in self.weights.items() if v > 0)


@dataclass
class LevelScores:
    """Per-token values of one level, each (B, L): branch values, evidence z-scores, final score.

    ``contributions[branch]`` (B, L) are the terms that add up to ``score`` in standardized mode
    (``w_b * z_b / sum(w)``); in product mode they are empty.
    """

    reconstruction: torch.Tensor | None  # None when the transformer was skipped (a nearest-only score)
    intra_divergence: torch.Tensor | None
    inter_divergence: torch.Tensor | None
    product: torch.Tensor | None
    score: torch.Tensor
    contributions: dict[str, torch.Tensor] = field(default_factory=dict)
    nearest_distance: torch.Tensor | None = None

    def evidence(self, branch: str) -> torch.Tensor | None:
        """Branch value turned into 'higher = more anomalous' (intra divergence reversed)."""
        value = {"reconstruction": self.reconstruction, "intra": self.intra_divergence,
                 "inter": self.inter_divergence, "nearest": self.nearest_distance}[branch]
        return None if value is None else EVIDENCE_SIGN[branch] * value


def product_score(rec: torch.Tensor, intra: torch.Tensor | None, inter: torch.Tensor | None,
                  config: FODConfig) -> torch.Tensor:
    """The variant's paper/official score (see ``fod_app.variants``): (B, L)."""
    which = config.branches.product_divergence
    if which is None:
        return rec
    divergence = inter if which == "inter" else intra
    if divergence is None:
        raise ValueError(f"variant {config.variant!r} needs the correlations of its {which} branch to score")
    if which == "intra":  # trained away from the prior: small divergence = anomalous (official code)
        return rec * torch.softmax(-divergence, dim=-1)
    return rec * divergence_weight(divergence, config.score_weight)


def level_scores(
    output: LevelOutput, grid: tuple[int, int], config: FODConfig, spec: ScoreSpec, level: int = 0
) -> LevelScores:
    """Score the tokens of one level (its ``tokens`` against its reconstruction, when the transformer ran)."""
    rec = None
    if output.reconstruction is not None:
        rec = reconstruction_error(output.tokens.float(), output.reconstruction.float())
    elif spec.mode == "product":
        raise ValueError("the product score needs the reconstruction; the model was run without it")
    intra = branch_divergence(output.intra, grid, config.score_eps)
    inter = branch_divergence(output.inter, grid, config.score_eps)
    which = config.branches.product_divergence
    if rec is not None and (
        spec.mode == "product" or which is None or (intra if which == "intra" else inter) is not None
    ):
        product = product_score(rec, intra, inter, config)
    else:  # standardized scoring that does not need the product's branch: skip it
        product = None
    nearest = None if output.nearest is None else output.nearest.float()
    base = product if product is not None else rec  # the standardized sum below replaces it
    scores = LevelScores(rec, intra, inter, product, base if base is not None else nearest, nearest_distance=nearest)
    if spec.mode == "standardized":
        scores.contributions = standardized_terms(scores, spec, level)
        if scores.contributions:
            scores.score = torch.stack(list(scores.contributions.values())).sum(0)
        else:  # no scored branch lives on this level (e.g. a nearest-only score, bank on the finest level only)
            scores.score = output.tokens.new_zeros(output.tokens.shape[:2], dtype=torch.float32)
    return scores


def levels_with(spec: ScoreSpec, branch: str) -> int:
    """On how many levels the spec has good-image statistics for ``branch`` (all, unless a branch lives on some
    levels only: the "patchcore" bank is on the finest level)."""
    return sum(branch in level for level in spec.statistics)


def standardized_terms(scores: LevelScores, spec: ScoreSpec, level: int) -> dict[str, torch.Tensor]:
    """``w_b * z_b / sum(w)`` per branch with a positive weight that this level has: each (B, L); they sum to the
    level's score. A branch on n_b of the n levels is scaled by n / n_b, so that the level mean of the scores
    weighs each branch as its levels' mean z-score (``branch_maps`` averages the same way)."""
    total = sum(w for w in spec.weights.values() if w > 0)
    terms = {}
    for branch, weight in spec.weights.items():
        if weight <= 0 or branch not in spec.statistics[level]:
            continue
        evidence = scores.evidence(branch)
        if evidence is None:
            raise ValueError(f"the score uses the {branch} branch, which this model does not compute")
        mean, std = spec.statistics[level][branch]
        share = len(spec.statistics) / levels_with(spec, branch)
        terms[branch] = (weight / total * share) * (evidence - mean) / std
    return terms


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


def image_maps(token_values: list[torch.Tensor], grids: list[tuple[int, int]], config: FODConfig
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level token values (B, L_l) -> (smoothed level-mean map (B, S, S), image score (B,) = its max)."""
    size = config.image_size
    merged = torch.stack([upsample_tokens(v.float(), g, size) for v, g in zip(token_values, grids)]).mean(0)
    smoothed = gaussian_smooth(merged, config.smoothing_sigma)
    return smoothed, smoothed.flatten(1).max(dim=1).values


@dataclass
class ScoreMaps:
    """Image-level results of a batch, raw model units.

    anomaly_map: (B, S, S) smoothed score map; image_score: (B,) its max.
    branch_maps: name -> (B, S, S) unsmoothed level-averaged maps ("reconstruction", "intra_divergence",
    "inter_divergence", "nearest_distance", "score"; those the model computes).
    branch_image_scores: name -> (B,) image score of each branch on its own ("reconstruction", "intra", "inter",
    "nearest"; standardised with the spec's good statistics when it has them) and "combined" (the model's own score).
    """

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    branch_maps: dict[str, torch.Tensor]
    levels: list[LevelScores]
    branch_image_scores: dict[str, torch.Tensor] = field(default_factory=dict)


def score_maps(
    outputs: list[LevelOutput],
    grids: list[tuple[int, int]],
    config: FODConfig,
    spec: ScoreSpec | None = None,
    with_branches: bool = False,
) -> ScoreMaps:
    """Combine levels: upsample each level's token scores, average levels, smooth, take the max."""
    spec = spec or ScoreSpec()
    size = config.image_size
    per_level = [level_scores(out, grid, config, spec, i) for i, (out, grid) in enumerate(zip(outputs, grids))]
    smoothed, image_score = image_maps([s.score for s in per_level], grids, config)
    names = ("score", "reconstruction", "intra_divergence", "inter_divergence", "nearest_distance") \
        if with_branches else ("score",)
    branch_maps = {  # each value's mean over the levels that have it
        name: torch.stack([upsample_tokens(getattr(s, name), g, size)
                           for s, g in zip(per_level, grids) if getattr(s, name) is not None]).mean(0)
        for name in names
        if any(getattr(s, name) is not None for s in per_level)
    }
    result = ScoreMaps(smoothed, image_score.clamp_min(MIN_IMAGE_SCORE), branch_maps, per_level)
    if with_branches:
        result.branch_image_scores = branch_image_scores(per_level, grids, config, spec)
        result.branch_image_scores["combined"] = result.image_score
    return result


def branch_image_scores(
    per_level: list[LevelScores], grids: list[tuple[int, int]], config: FODConfig, spec: ScoreSpec
) -> dict[str, torch.Tensor]:
    """Image score of each branch alone (see ``branch_maps``): name -> (B,)."""
    maps = branch_maps(per_level, grids, config, spec.statistics)
    return {name: m.flatten(1).max(dim=1).values for name, m in maps.items()}


def branch_maps(
    per_level: list[LevelScores],
    grids: list[tuple[int, int]],
    config: FODConfig,
    statistics: list[dict[str, tuple[float, float]]],
) -> dict[str, torch.Tensor]:
    """Smoothed level-mean map of each branch's evidence alone, standardised per level when ``statistics`` are
    given (so levels weigh equally), through the same upsample/average/smooth as the score: name -> (B, S, S)."""
    result = {}
    for branch in BRANCHES:
        present = [i for i, s in enumerate(per_level) if s.evidence(branch) is not None]  # levels that have it
        if not present:
            continue
        values = [per_level[i].evidence(branch) for i in present]
        if statistics:
            values = [(v - statistics[i][branch][0]) / statistics[i][branch][1] for v, i in zip(values, present)]
        result[branch] = image_maps(values, [grids[i] for i in present], config)[0]
    return result


def needs_branches(config: FODConfig, spec: ScoreSpec | None, with_branches: bool
                   ) -> tuple[bool, bool, bool, bool]:
    """Which branch values scoring needs computed: (intra correlations, inter correlations, nearest distances,
    the transformer at all) — the ``FODModel.forward`` flags. A score of the nearest distance alone skips the
    transformer (batch-1 latencies per score kind: BENCHMARKS.md, ``bench/score_latency.py``)."""
    variant = config.branches
    if with_branches:
        return variant.intra, variant.inter, True, True
    spec = spec or ScoreSpec()
    if spec.mode == "standardized":
        used = {b: spec.weights.get(b, 0) > 0 for b in BRANCHES}
        return used["intra"], used["inter"], used["nearest"], used["reconstruction"] or used["intra"] or used["inter"]
    return variant.product_divergence == "intra", variant.product_divergence == "inter", False, True


def good_statistics(per_level: list[list[LevelScores]]) -> list[dict[str, tuple[float, float]]]:
    """Mean/std of each branch's evidence over all tokens of good images, per level.

    per_level: for each batch of good images, its list of per-level ``LevelScores``.
    Returns [level] -> branch -> (mean, std), std floored so identical images still give finite z-scores.
    """
    n_levels = len(per_level[0])
    statistics: list[dict[str, tuple[float, float]]] = []
    for level in range(n_levels):
        stats = {}
        for branch in BRANCHES:
            parts = [batch[level].evidence(branch) for batch in per_level]
            if any(p is None for p in parts):
                continue
            values = torch.cat([p.flatten().float().cpu() for p in parts])
            mean, std = float(values.mean()), float(values.std())
            stats[branch] = (mean, max(std, 1e-6 * max(1.0, abs(mean)), 1e-12))
        statistics.append(stats)
    return statistics
