"""Side-by-side patch comparison for teaching (paper Fig. 4): two patches, their correlations, and their score.

Works on an ``ImageExplanation`` (no model run). The score terms are in *threshold units* (1.0 = the
calibrated threshold, the unit of every verdict): a patch's terms are the means of ``term_maps`` over the
patch's pixels and add up to its patch score (the mean of the final score map over the same pixels); at the
hottest pixel of the image they add up to the image score the verdict uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .explain import ImageExplanation, PatchExplanation

#: Display names of the score terms (standardized scores: branches; product scores: levels).
TERM_LABELS = {
    "reconstruction": "Reconstruction",
    "intra": "Intra correlation (reversed)",
    "inter": "Inter correlation",
    "nearest": "Nearest good patch",
}


def term_label(name: str) -> str:
    return TERM_LABELS.get(name, name.capitalize())


def _pool(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean of an (S, S) map inside each patch of an (H, W) grid: -> (H, W)."""
    height, width = grid
    size_h, size_w = values.shape
    if size_h % height or size_w % width:
        rows = np.linspace(0, size_h, height + 1).astype(int)
        cols = np.linspace(0, size_w, width + 1).astype(int)
        return np.array([[values[rows[r]:rows[r + 1], cols[c]:cols[c + 1]].mean() for c in range(width)]
                         for r in range(height)])
    return values.reshape(height, size_h // height, width, size_w // width).mean(axis=(1, 3))


def _pooled(explanation: ImageExplanation, name: str, level: int) -> np.ndarray:
    """``_pool`` of ``maps['score']`` (name 'score') or of a term map, memoised on the explanation: (H, W)."""
    key = ("pooled", name, level)
    if key not in explanation.memo:
        values = explanation.maps["score"] if name == "score" else explanation.term_maps[name]
        explanation.memo[key] = _pool(values, explanation.grids[level])
    return explanation.memo[key]


def patch_scores(explanation: ImageExplanation, level: int) -> np.ndarray:
    """Mean final score (threshold units) inside each patch of a level's grid: (H, W)."""
    return _pooled(explanation, "score", level)


def patch_terms(explanation: ImageExplanation, level: int, row: int, col: int) -> dict[str, float]:
    """What patch (row, col)'s score is made of, in threshold units: term -> value; they add up to its score."""
    return {name: float(_pooled(explanation, name, level)[row, col]) for name in ordered_terms(explanation)}


def ordered_terms(explanation: ImageExplanation) -> list[str]:
    """Term names in display order: reconstruction, intra, inter (or level 1, level 2, ...)."""
    order = list(TERM_LABELS)
    return sorted(explanation.term_maps, key=lambda n: (order.index(n) if n in order else len(order), n))


def image_score_terms(explanation: ImageExplanation) -> tuple[dict[str, float], tuple[int, int]]:
    """The image score's terms (threshold units) at the hottest pixel of the final map, and that pixel (y, x)."""
    score = explanation.maps["score"]
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return {name: float(explanation.term_maps[name][y, x]) for name in ordered_terms(explanation)}, (int(y), int(x))


def most_anomalous_patch(explanation: ImageExplanation, level: int) -> tuple[int, int]:
    """(row, col) of the patch with the highest patch score at a level."""
    scores = patch_scores(explanation, level)
    row, col = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(row), int(col)


def typical_normal_patch(explanation: ImageExplanation, level: int, away_from: tuple[int, int] | None = None
                         ) -> tuple[int, int]:
    """(row, col) of a typical normal patch: score closest to the median patch score, away from the image border
    and (when given) at least a quarter of the grid away from ``away_from``; ties go to the farthest patch."""
    scores = patch_scores(explanation, level)
    height, width = scores.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    cost = np.abs(scores - np.median(scores))
    margin = max(1, min(height, width) // 8)
    inner = (rows >= margin) & (rows < height - margin) & (cols >= margin) & (cols < width - margin)
    far = np.ones_like(inner)
    distance = np.zeros(scores.shape)
    if away_from is not None:
        distance = np.hypot(rows - away_from[0], cols - away_from[1])
        far = distance >= max(height, width) / 4
    for allowed in (inner & far, far, np.ones_like(far)):
        if allowed.any():
            break
    # Lexicographic: closeness to the median first, then distance from the pinned patch.
    candidates = np.where(allowed, cost - 1e-9 * distance, np.inf)
    row, col = np.unravel_index(int(np.argmin(candidates)), scores.shape)
    return int(row), int(col)


@dataclass
class PatchView:
    """One patch of a comparison: its correlations (``patch``), patch score and score terms (threshold units)."""

    label: str
    patch: PatchExplanation
    score: float
    terms: dict[str, float]


@dataclass
class PatchComparison:
    """Two (or one) patches at the same level/layer/head on one colour scale ``colour_range`` (weights)."""

    views: list[PatchView]
    level: int
    layer: int
    head: int | None
    colour_range: tuple[float, float]
    log_colours: bool

    def agreement(self) -> dict[str, bool]:
        """Per term: does it give the first patch (the pinned, more anomalous one) the larger value?"""
        if len(self.views) < 2:
            return {}
        first, second = self.views[0].terms, self.views[1].terms
        return {name: first[name] > second[name] for name in first}


def compare_patches(
    explanation: ImageExplanation,
    level: int,
    layer: int,
    head: int | None,
    patches: list[tuple[str, tuple[int, int]]],
    log_colours: bool = False,
) -> PatchComparison:
    """Views of the given (label, (row, col)) patches and the colour range shared by all their 4 panels each.

    Linear colours: 0 .. the largest weight of any panel. Logarithmic: the model's scoring log floor
    (``PatchExplanation.log_floor``: smaller weights do not count in the KL) .. the largest weight.
    """
    scores = patch_scores(explanation, level)
    views = []
    for label, (row, col) in patches:
        patch = explanation.patch(level, layer, head, row, col)
        views.append(PatchView(label, patch, float(scores[row, col]), patch_terms(explanation, level, row, col)))
    top = max(float(np.max(p)) for v in views for p in panels(v.patch))
    low = views[0].patch.log_floor if log_colours else 0.0
    return PatchComparison(views, level, layer, head, (low, max(top, low * 10 if log_colours else 1e-9)), log_colours)


def panels(patch: PatchExplanation) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four (H, W) distributions of paper Fig. 4, in display order."""
    return patch.intra_correlation, patch.intra_target, patch.inter_correlation, patch.inter_target


def comparison_record(comparison: PatchComparison, explanation: ImageExplanation, image_name: str,
                      model_name: str, model_version: str, notes: list[str]) -> dict[str, Any]:
    """JSON-ready numbers of the current view (for slides and reports)."""
    image_terms, hottest = image_score_terms(explanation)

    def grid_list(values: np.ndarray) -> list[list[float]]:
        return np.round(np.asarray(values, dtype=float), 6).tolist()

    return {
        "image": image_name,
        "model": model_name,
        "model_version": model_version,
        "score_unit": "threshold units (1.0 = calibrated threshold)",
        "image_score": round(explanation.image_score, 6),
        "image_score_terms": {k: round(v, 6) for k, v in image_terms.items()},
        "image_score_pixel_yx": list(hottest),
        "level": comparison.level + 1,
        "grid": list(explanation.grids[comparison.level]),
        "layer": comparison.layer + 1,
        "head": "mean of all heads" if comparison.head is None else comparison.head + 1,
        "colour_scale": {"log10": comparison.log_colours, "min": comparison.colour_range[0],
                         "max": comparison.colour_range[1]},
        "patches": [
            {
                "label": v.label,
                "row": v.patch.row + 1,
                "column": v.patch.col + 1,
                "patch_score": round(v.score, 6),
                "score_terms": {k: round(t, 6) for k, t in v.terms.items()},
                "intra_kl": round(v.patch.intra_kl, 6),
                "inter_kl": round(v.patch.inter_kl, 6),
                "sigma_intra": [round(s, 6) for s in v.patch.sigma_intra],
                "sigma_inter": [round(s, 6) for s in v.patch.sigma_inter],
                "reconstruction_error": round(v.patch.reconstruction_error, 6),
                "intra_correlation": grid_list(v.patch.intra_correlation),
                "intra_target": grid_list(v.patch.intra_target),
                "inter_correlation": grid_list(v.patch.inter_correlation),
                "inter_target": grid_list(v.patch.inter_target),
            }
            for v in comparison.views
        ],
        "notes": notes,
    }
