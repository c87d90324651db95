"""Label-free self-check: how well the model separates synthetic defects from held-out good images.

A quality engineer has only good images. The self-check puts synthetic defects (``fod_app.synthetic``:
CutPaste patches and scars, DRAEM-style blended texture) on the good images held out of training and measures
the AUROC of "synthetic defect vs good". It never reads a test label. Training uses it to stop early and to
choose how the branches combine into the score (``choose``); the record below is stored in the bundle under
``"self_check"``::

    {
      "method": str,                      # how the synthetic defects are made (one sentence)
      "n_good": int, "n_synthetic": int,  # held-out good images and synthetic defects scored
      "auroc": float,                     # AUROC of the model's final image score: synthetic vs good
      "per_branch": {"reconstruction": float, "intra": float | None, "inter": float | None,
                     "nearest": float | None, "combined": float},
      "score": {"mode": str, "weights": {branch: float}, "name": str},
      "candidates": {name: auroc},        # every score combination tried at the chosen step ("weighted":
                                          #   weights from each branch's own AUROC, ``separation_weights``)
      "curve": [{"step": int, "auroc": float, "trained": float}, ...],   # during training: the AUROC of the score
                                          #   the check would keep, and of the best candidate of FOD's trained
                                          #   branches alone (``Evaluation.trained_auroc``: early stopping's)
      "best_step": int, "steps_run": int,
    }
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls
from scipy.stats import norm

from .bank_search import SearchChoice
from .config import FODConfig
from .inference import autocast_context
from .metrics import auroc_difference, image_auroc
from .model import FODModel
from .scoring import (
    BRANCHES,
    UNTRAINED_BRANCH,
    LevelScores,
    ScoreSpec,
    branch_maps,
    good_statistics,
    image_maps,
    level_scores,
)
from .synthetic import synthetic_defects

#: Below this self-check AUROC the model is flagged as unreliable.
POOR_AUROC = 0.8


#: A branch whose self-check AUROC is below this does not separate synthetic defects on its own.
WEAK_BRANCH_AUROC = 0.6


def branch_note(record: dict[str, Any] | None) -> str | None:
    """A model-quality note for the Explore page: which branches do not separate synthetic defects."""
    if not record:
        return None
    per_branch = record.get("per_branch") or {}
    weak = [k for k in BRANCHES if per_branch.get(k) is not None
            and per_branch[k] < WEAK_BRANCH_AUROC]
    figures = ", ".join(f"{k} {v:.2f}" for k, v in per_branch.items() if v is not None)
    if not figures:
        return None
    text = f"Self-check AUROC of each branch on its own on this model: {figures}."
    if weak:
        text += (
            f" The {' and '.join(weak)} branch{'es do' if len(weak) > 1 else ' does'} not separate synthetic defects "
            "from good parts on this model: its pictures may not point at defects, and the score "
            f"({(record.get('score') or {}).get('name', '?')}) relies on the other branches."
        )
    return text


def describe(record: dict[str, Any] | None) -> tuple[str, str | None]:
    """One sentence for the user and an optional warning, from a bundle's ``self_check`` record."""
    if not record or record.get("auroc") is None:
        return "No self-check was recorded for this model (trained with an older version).", None
    auroc = float(record["auroc"])
    message = (
        f"Self-check: the model separates synthetic defects from held-out good parts with AUROC {auroc:.2f} "
        f"({record.get('n_synthetic', '?')} synthetic defects on {record.get('n_good', '?')} good images)."
    )
    warning = None
    if auroc < POOR_AUROC:
        warning = (
            f"Self-check AUROC {auroc:.2f} is below {POOR_AUROC:.2f}: this model barely tells synthetic defects "
            "from good parts and is unlikely to be reliable. Add more (and more varied) good images, or check "
            "that they show the same part under the same conditions."
        )
    search = record.get("nearest_search")
    if isinstance(search, dict) and search.get("search") in ("global", "positional"):
        message += " " + SearchChoice.from_dict(search).describe()
    return message, warning


#: Synthetic defects: about ``MAX_SYNTHETIC`` in all, spread over the held-out good images (each self-check scores
#: them all, about 0.15 s per image on 2 CPU cores); kinds cycle patch, scar, blend.
MAX_SYNTHETIC = 40


def defects_per_image(n_good: int) -> int:
    """How many synthetic defects are made on each held-out good image: few images get more each."""
    return max(1, MAX_SYNTHETIC // max(1, n_good))


#: Early-stopping noise: an earlier training state must beat a later one by more than ``NOISE_SCALE /
#: sqrt(n_good)`` self-check AUROC (0.05 with 4 held-out good images, 0.018 with 30) to be kept. (Which score
#: combination is used is a paired test instead: ``choose``.)
NOISE_SCALE = 0.1


def tolerance(n_good: int) -> float:
    """AUROC differences between training states smaller than this are treated as self-check noise."""
    return NOISE_SCALE / max(1, n_good) ** 0.5


METHOD = (
    "synthetic defects on held-out good images: CutPaste patches and scars, DRAEM-style blended texture, "
    "all cut from held-out good images"
)


@dataclass
class SelfCheckSet:
    """Backbone features of the held-out good images and of synthetic defects made on them.

    good / synthetic: per level (N, C, H, W) on the training device.
    """

    good: list[torch.Tensor]
    synthetic: list[torch.Tensor]

    @property
    def n_good(self) -> int:
        return int(self.good[0].shape[0])

    @property
    def n_synthetic(self) -> int:
        return int(self.synthetic[0].shape[0])


def make_synthetic_images(held_out: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Synthetic defective versions of the held-out good images, cut from the held-out images themselves.

    Not from training images: their patches are in the nearest-good-patch bank, so a defect cut from one would be
    "seen" by that branch in a way no real defect is (BENCHMARKS.md "The self-check's choice as a paired test").
    """
    return synthetic_defects(held_out, held_out, defects_per_image(len(held_out)), seed)[0]


@dataclass
class Evaluation:
    """One self-check: AUROC of every candidate score, the chosen one, and each branch on its own."""

    candidates: dict[str, float]
    specs: dict[str, ScoreSpec]
    chosen: str
    per_branch: dict[str, float | None]

    @property
    def auroc(self) -> float:
        return self.candidates[self.chosen]

    @property
    def spec(self) -> ScoreSpec:
        return self.specs[self.chosen]

    @property
    def trained_auroc(self) -> float:
        """The highest AUROC of a candidate made of FOD's trained branches alone (``ScoreSpec.trained_only``): what
        early stopping follows. The score kept is often the nearest-good-patch distance, which training does not
        change: its curve is flat (and so, nearly, is that of any combination that includes it), and training
        stopped at the first checks while FOD's own branches still improved (BENCHMARKS.md "Twenty-third
        session")."""
        return max(auroc for name, auroc in self.candidates.items() if self.specs[name].trained_only)


def candidate_weights(config: FODConfig) -> dict[str, dict[str, float]]:
    """Standardized weightings to try, in order of preference: all branches the variant has first."""
    variant = config.branches
    has = {"reconstruction": True, "intra": variant.intra, "inter": variant.inter,
           "nearest": config.patch_bank_size > 0}
    available = [b for b in BRANCHES if has[b]]
    result = {}
    for size in range(len(available), 0, -1):
        for subset in combinations(available, size):
            result["+".join(subset)] = {b: (1.0 if b in subset else 0.0) for b in available}
    return result


#: Name of the candidate whose weights follow each branch's own self-check separation (``separation_weights``).
WEIGHTED = "weighted"
#: AUROC is capped here before it becomes a separation (a perfect branch would otherwise get infinite weight).
MAX_BRANCH_AUROC = 0.999


def separation_weights(per_branch: dict[str, float | None],
                       good_maps: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Non-negative weights for the branches' z-scores from the self-check, normalised to sum 1 (empty when no
    branch beats chance).

    Each branch's separation is d' = sqrt(2) * probit(its own self-check AUROC) (0 at or below chance). With
    ``good_maps`` (branch -> smoothed z-map (N, S, S) of held-out good images) the weights are Fisher's
    discriminant w ∝ R⁻¹ d' restricted to w >= 0, R the branches' correlation over good pixels: two branches that
    see the same thing (the reconstruction error and the nearest-patch distance often do) then do not both count
    in full, and the weaker of them adds little. Without ``good_maps``, w ∝ d' (independent branches).
    The non-negative solution minimises wᵀRw - 2wᵀd' over w >= 0 (``scipy.optimize.nnls`` on R's Cholesky
    factor), which maximises the Fisher ratio (wᵀd')² / wᵀRw over that orthant.
    """
    names = [b for b in BRANCHES if per_branch.get(b) is not None and per_branch[b] > 0.5]
    if not names:
        return {}
    separation = np.array([math.sqrt(2.0) * float(norm.ppf(min(per_branch[b], MAX_BRANCH_AUROC))) for b in names])
    weights = separation
    if good_maps is not None and len(names) > 1 and all(b in good_maps for b in names):
        # every 4th pixel each way: the maps are smooth (sigma 4 px), and all pixels of 100+ images would be ~1 GB
        pixels = np.stack([good_maps[b][:, ::4, ::4].flatten().double().numpy() for b in names])
        correlation = np.corrcoef(pixels) + 1e-6 * np.eye(len(names))
        if np.all(np.isfinite(correlation)):
            factor = np.linalg.cholesky(correlation)
            weights, _ = nnls(factor.T, np.linalg.solve(factor, separation))
    total = float(weights.sum())
    if total <= 0:
        return {}
    return {b: round(float(w) / total, 3) for b, w in zip(names, weights)}


@torch.inference_mode()
def _level_scores(model: FODModel, features: list[torch.Tensor], config: FODConfig, batch_size: int = 8
                  ) -> list[list[LevelScores]]:
    """Per batch, per level: the branch values of every token (all branches the variant has)."""
    was_training = model.training
    model.eval()
    device = features[0].device
    variant = config.branches
    batches = []
    try:
        for start in range(0, features[0].shape[0], batch_size):
            with autocast_context(device):
                outputs = model([f[start : start + batch_size] for f in features], variant.intra, variant.inter)
            batches.append([
                _to_cpu(level_scores(out, grid, config, ScoreSpec(), i))
                for i, (out, grid) in enumerate(zip(outputs, model.grids))
            ])
    finally:
        model.train(was_training)
    return batches


def _to_cpu(scores: LevelScores) -> LevelScores:
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float().cpu()

    return LevelScores(cpu(scores.reconstruction), cpu(scores.intra_divergence), cpu(scores.inter_divergence),
                       cpu(scores.product), cpu(scores.score), nearest_distance=cpu(scores.nearest_distance))


def _branch_maps(batches: list[list[LevelScores]], statistics: list[dict[str, tuple[float, float]]],
                 grids: list[tuple[int, int]], config: FODConfig) -> dict[str, torch.Tensor]:
    """Smoothed level-mean map of each branch's z-score, and of the product score: name -> (N, S, S).

    Upsampling, level averaging and smoothing are linear, so a standardized candidate's map is the weighted
    mean of these branch maps: each candidate then costs one max, not a pass through the maps.
    """
    maps: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for branch, branch_map in branch_maps(batch, grids, config, statistics).items():
            maps.setdefault(branch, []).append(branch_map)
        maps.setdefault("product", []).append(image_maps([s.product for s in batch], grids, config)[0])
    return {name: torch.cat(parts) for name, parts in maps.items()}


def combined_map(maps: dict[str, torch.Tensor], spec: ScoreSpec) -> torch.Tensor:
    """One candidate's smoothed map (N, S, S) from the branch maps of ``_branch_maps``: the product's own map, or the
    weighted mean of the branches' z-maps (the same combination as ``scoring.standardized_terms``)."""
    if spec.mode == "product":
        return maps["product"]
    total = sum(w for w in spec.weights.values() if w > 0)
    return sum((w / total) * maps[b] for b, w in spec.weights.items() if w > 0)


def _image_scores(maps: dict[str, torch.Tensor], spec: ScoreSpec) -> np.ndarray:
    """Image scores (N,) of one candidate from ``_branch_maps``: the max of its ``combined_map``."""
    return combined_map(maps, spec).flatten(1).max(dim=1).values.numpy()


def candidate_specs(config: FODConfig, per_branch: dict[str, float | None],
                    statistics: list[dict[str, tuple[float, float]]],
                    good_maps: dict[str, torch.Tensor] | None = None) -> dict[str, ScoreSpec]:
    """Every score the self-check tries, in preference order: ``WEIGHTED`` (``separation_weights``, when a branch
    beats chance), every subset of branches equally weighted (all first), the paper's product."""
    specs: dict[str, ScoreSpec] = {}
    weighted = separation_weights(per_branch, good_maps)
    if weighted:
        specs[WEIGHTED] = ScoreSpec("standardized", weighted, statistics)
    for name, weights in candidate_weights(config).items():
        specs[name] = ScoreSpec("standardized", weights, statistics)
    specs["product"] = ScoreSpec("product")
    return specs


def held_out_reference(model: FODModel, good: list[torch.Tensor], config: FODConfig
                       ) -> tuple[list[dict[str, tuple[float, float]]], dict[str, torch.Tensor]]:
    """From held-out good images (backbone features per level (N, C, H, W)): per level, per branch (mean, std) of
    their tokens, and each branch's smoothed z-map (N, S, S) — what ``candidate_specs`` needs."""
    batches = _level_scores(model, good, config)
    statistics = good_statistics(batches)
    return statistics, _branch_maps(batches, statistics, model.grids, config)


def branch_z_maps(model: FODModel, features: list[torch.Tensor], statistics: list[dict[str, tuple[float, float]]],
                  config: FODConfig) -> dict[str, torch.Tensor]:
    """Each branch's smoothed z-map and the product map, (N, S, S), for backbone features per level (N, C, H, W),
    standardised with held-out good ``statistics``: what every candidate score is combined from."""
    return _branch_maps(_level_scores(model, features, config), statistics, model.grids, config)


def candidate_image_scores(model: FODModel, features: list[torch.Tensor], specs: dict[str, ScoreSpec],
                           statistics: list[dict[str, tuple[float, float]]], config: FODConfig
                           ) -> dict[str, np.ndarray]:
    """Image scores (N,) of every candidate for backbone features per level (N, C, H, W) — the self-check's own
    arithmetic, for benchmarks that ask how each candidate would have done on real images."""
    maps = branch_z_maps(model, features, statistics, config)
    return {name: _image_scores(maps, spec) for name, spec in specs.items()}


def evaluate(model: FODModel, data: SelfCheckSet, config: FODConfig) -> Evaluation:
    """Score held-out good and synthetic images with every candidate combination; choose per ``score_mode``."""
    statistics, good_maps = held_out_reference(model, data.good, config)
    synthetic_maps = branch_z_maps(model, data.synthetic, statistics, config)
    labels = np.r_[np.zeros(data.n_good), np.ones(data.n_synthetic)]

    def scores(spec: ScoreSpec) -> np.ndarray:
        return np.r_[_image_scores(good_maps, spec), _image_scores(synthetic_maps, spec)]

    per_branch: dict[str, float | None] = {
        branch: float(image_auroc(labels, scores(ScoreSpec("standardized", {branch: 1.0}, statistics))))
        if any(branch in level for level in statistics) else None
        for branch in BRANCHES
    }
    specs = candidate_specs(config, per_branch, statistics, good_maps)
    candidate_scores = {name: scores(spec) for name, spec in specs.items()}
    candidates = {name: float(image_auroc(labels, s)) for name, s in candidate_scores.items()}
    chosen = choose(candidate_scores, labels, config)
    per_branch["combined"] = candidates[chosen]
    return Evaluation(candidates, specs, chosen, per_branch)


#: The branch the automatic score falls back on: the distance to the nearest good patch, PatchCore's own score
#: (``bank_features`` "patchcore"), the one branch that does not depend on how training went.
PREFERRED_BRANCH = UNTRAINED_BRANCH
#: Another score replaces the preferred one only when its self-check AUROC is higher, in a one-sided paired test
#: (DeLong), at this family-wise error rate over all the candidates tested against it (Holm's step-down, ``holm``).
SIGNIFICANCE_LEVEL = 0.05


def holm(p_values: dict[str, float], level: float = SIGNIFICANCE_LEVEL) -> list[str]:
    """The hypotheses Holm's step-down procedure (Scand. J. Statist. 1979) rejects at family-wise error ``level``:
    the k-th smallest of m p-values is compared with ``level / (m - k + 1)``, stopping at the first that is not
    below it. With one hypothesis it is the plain test at ``level``. Hand-written: five lines, and statsmodels'
    ``multipletests`` would be a new dependency for it."""
    ranked = sorted(p_values, key=lambda name: p_values[name])
    rejected: list[str] = []
    for k, name in enumerate(ranked):
        if not p_values[name] < level / (len(ranked) - k):
            break
        rejected.append(name)
    return rejected


def one_sided_p(difference: float, error: float) -> float:
    """p-value of "the difference is > 0" from a paired difference and its standard error (normal approximation);
    1 where it is undefined (a class missing) and 0 for a positive difference without spread."""
    if not (math.isfinite(difference) and math.isfinite(error)):
        return 1.0
    if error <= 0:
        return 0.0 if difference > 0 else 1.0
    return float(norm.sf(difference / error))


def choose(scores: dict[str, np.ndarray], labels: np.ndarray, config: FODConfig) -> str:
    """The score combination to use, from every candidate's self-check image scores (name -> (N,), ``labels``
    1 = synthetic defect). ``score_mode`` 'product' / 'standardized' fix it (standardized = all branches, equally
    weighted); 'auto' keeps ``PREFERRED_BRANCH`` (without a memory bank: the single branch that separates synthetic
    defects best) unless other candidates beat it clearly — a one-sided paired test of each candidate's AUROC
    against it (``metrics.auroc_difference``), corrected for testing all of them (Holm, ``SIGNIFICANCE_LEVEL``) —
    and then takes the clearly better candidate with the highest AUROC (the first in preference order on ties).

    Why a test of significance: with the 4-5 held-out good images of a 16-32 image set, one self-check AUROC has a
    standard error of about 0.08, and a combination adds the noise of every branch it mixes in; a fixed margin
    either flips on noise (small sets) or ignores real gains (large ones). Why corrected: about 16 candidates are
    tested, and each at 5 % on its own let noise switch away from the preferred score far more often than 5 % of
    the time (``tests/test_selfcheck_training.py``; until 2026-12-03 each was tested alone at z > 1.645; BENCHMARKS.md
    "Twenty-sixth session"). Why the nearest branch: BENCHMARKS.md "The self-check's choice as a paired test".
    """
    if config.score_mode == "product":
        return "product"
    if config.score_mode == "standardized":
        return next(iter(candidate_weights(config)))  # all branches the model has, equally weighted
    aurocs = {name: float(image_auroc(labels, s)) for name, s in scores.items()}
    singles = [name for name in aurocs if name in BRANCHES]
    preferred = PREFERRED_BRANCH if PREFERRED_BRANCH in aurocs else max(singles, key=lambda name: aurocs[name])
    p_values = {name: one_sided_p(*auroc_difference(labels, scores[name], scores[preferred]))
                for name in aurocs if name != preferred}
    better = set(holm(p_values))
    return max((name for name in aurocs if name in better), key=lambda name: aurocs[name]) if better else preferred


def record(evaluation: Evaluation, data: SelfCheckSet, curve: list[dict[str, float]], best_step: int,
           steps_run: int, search: SearchChoice | None = None) -> dict[str, Any]:
    """The bundle record (see the module docstring); ``search``: where the nearest good patch is searched and the
    leave-one-out self-check that chose it (``fod_app.bank_search``), None where the model has no such choice."""
    return {
        **({} if search is None else {"nearest_search": search.to_dict()}),
        "method": METHOD,
        "n_good": data.n_good,
        "n_synthetic": data.n_synthetic,
        "auroc": round(evaluation.auroc, 4),
        "per_branch": {k: (None if v is None else round(v, 4)) for k, v in evaluation.per_branch.items()},
        "score": {"mode": evaluation.spec.mode, "weights": dict(evaluation.spec.weights), "name": evaluation.chosen},
        "candidates": {k: round(v, 4) for k, v in evaluation.candidates.items()},
        "curve": curve,
        "best_step": best_step,
        "steps_run": steps_run,
    }
