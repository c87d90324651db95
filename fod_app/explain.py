"""Explanation API (paper Fig. 4): per-patch intra/inter correlations against their targets.

``explain_image`` runs the model once on one image and keeps every level/layer/head's correlations;
``ImageExplanation.patch`` then answers any patch query by slicing (no model run), so a click in the
app updates instantly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .correlation import symmetric_kl, target_correlation
from .inference import Detector


@dataclass
class PatchExplanation:
    """One patch's correlation rows and targets on its level's grid (arrays (H, W), sum 1).

    ``head=None`` means the head average. KL values are symmetric KL (with the scoring log floor
    ``config.score_eps``), averaged over the selected heads. ``sigma_*`` are the target widths (row, column) in
    grid steps.
    """

    level: int
    layer: int
    head: int | None
    row: int
    col: int
    grid: tuple[int, int]
    intra_correlation: np.ndarray
    intra_target: np.ndarray
    inter_correlation: np.ndarray
    inter_target: np.ndarray
    intra_kl: float
    inter_kl: float
    sigma_intra: tuple[float, float]
    sigma_inter: tuple[float, float]
    reconstruction_error: float
    inter_divergence: float
    score: float
    # What this patch's level score is made of, in the score's raw units: branch -> term. Standardized scores:
    # ``w_b * z_b / sum(w)`` per branch, adding up to ``score``; product scores: empty.
    contributions: dict[str, float]
    # Layer- and head-mean intra divergence of this patch (the value the score uses; None without the branch).
    intra_divergence: float | None = None
    # Distance of this patch's token to the nearest good training token (None: the model keeps no patch bank).
    nearest_distance: float | None = None
    # The log floor inside the KL values above (``config.score_eps``): weights below it do not count in them, so a
    # logarithmic colour scale starts there.
    log_floor: float = 1e-4


@dataclass
class ImageExplanation:
    """All correlations of one image. maps: name -> (S, S) arrays; 'score' is in threshold units."""

    detector: Detector
    grids: list[tuple[int, int]]
    n_layers: int
    n_heads: int
    intra: list[list[tuple[torch.Tensor, torch.Tensor]]]  # [level][layer] -> (corr (h,L,L), sigma (h,L,2))
    inter: list[list[tuple[torch.Tensor, torch.Tensor]]]
    token_maps: list[dict[str, np.ndarray]]  # [level] name -> (H, W)
    maps: dict[str, np.ndarray]
    image_score: float
    # What the final map is made of, in threshold units: term name -> (S, S); the terms add up to maps["score"].
    # Standardized scores: one term per branch ("reconstruction", "intra", "inter", "nearest"); product scores: one term
    # per level ("level 1", ...), since the product does not split into branches.
    term_maps: dict[str, np.ndarray] = field(default_factory=dict)
    # Derived arrays memoised by the helpers of ``fod_app.compare`` (e.g. per-patch means per level).
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    def patch(self, level: int, layer: int, head: int | None, row: int, col: int) -> PatchExplanation:
        """Correlation rows and targets of patch (row, col) at a level/layer/head (None = head mean)."""
        if not 0 <= level < len(self.grids):
            raise ValueError(f"level must be in 0..{len(self.grids) - 1}")
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in 0..{self.n_layers - 1}")
        if head is not None and not 0 <= head < self.n_heads:
            raise ValueError(f"head must be in 0..{self.n_heads - 1} or None (average)")
        height, width = self.grids[level]
        if not (0 <= row < height and 0 <= col < width):
            raise ValueError(f"patch ({row}, {col}) is outside the {height}x{width} grid of level {level}")
        index = row * width + col
        heads = slice(None) if head is None else slice(head, head + 1)
        eps = self.detector.config.score_eps  # the divergence that scores
        rows = {}
        for name, states in (("intra", self.intra), ("inter", self.inter)):
            corr, sigma = states[level][layer]
            corr_row = corr[heads, index : index + 1].float()  # (h', 1, L)
            sig = sigma[heads, index : index + 1].float()  # (h', 1, 2)
            target = target_correlation(sig.unsqueeze(0), (height, width), torch.tensor([index]))[0]
            kl = float(symmetric_kl(corr_row, target, eps).mean())
            rows[name] = (
                corr_row.mean(0)[0].reshape(height, width).numpy(),
                target.mean(0)[0].reshape(height, width).numpy(),
                kl,
                tuple(float(v) for v in sig.mean(0)[0]),
            )
        tokens = self.token_maps[level]
        return PatchExplanation(
            level,
            layer,
            head,
            row,
            col,
            (height, width),
            rows["intra"][0],
            rows["intra"][1],
            rows["inter"][0],
            rows["inter"][1],
            rows["intra"][2],
            rows["inter"][2],
            rows["intra"][3],
            rows["inter"][3],
            float(tokens["reconstruction"][row, col]),
            float(tokens["inter_divergence"][row, col]),
            float(tokens["score"][row, col]),
            {k[len("contribution_"):]: float(v[row, col]) for k, v in tokens.items() if k.startswith("contribution_")},
            None if tokens.get("intra_divergence") is None else float(tokens["intra_divergence"][row, col]),
            None if tokens.get("nearest_distance") is None else float(tokens["nearest_distance"][row, col]),
            eps,
        )


@torch.inference_mode()
def explain_image(detector: Detector, image: np.ndarray) -> ImageExplanation:
    """Run the model once on one (3, S, S) image in [0, 1], keeping all correlations."""
    from .scoring import score_maps

    config = detector.config
    features, outputs = detector.forward(detector.to_batch([image]))
    grids = detector.model.grids
    scored = score_maps(outputs, grids, config, detector.score_spec, with_branches=True)
    names = ("reconstruction", "intra_divergence", "inter_divergence", "nearest_distance", "score")
    token_maps = [
        {name: getattr(s, name)[0].float().reshape(grid).cpu().numpy() for name in names
         if getattr(s, name) is not None}
        | {f"contribution_{k}": v[0].float().reshape(grid).cpu().numpy() for k, v in s.contributions.items()}
        for s, grid in zip(scored.levels, grids)
    ]
    threshold = detector.calibration.threshold if detector.calibration else 1.0
    image_score = float(scored.image_score[0]) / threshold
    result_maps = {name: m[0].float().cpu().numpy() for name, m in scored.branch_maps.items() if name != "score"}
    result_maps["score"] = (scored.anomaly_map[0] / threshold).float().cpu().numpy()

    term_maps = _term_maps(scored.levels, list(grids), config, threshold)

    def keep(states):
        return [(s.correlation[0].float().cpu(), s.sigma[0].float().cpu()) for s in states]

    return ImageExplanation(
        detector,
        list(grids),
        config.n_layers,
        config.n_heads,
        [keep(o.intra) for o in outputs],
        [keep(o.inter) for o in outputs],
        token_maps,
        result_maps,
        image_score,
        term_maps,
    )


def _term_maps(levels: list, grids: list[tuple[int, int]], config, threshold: float) -> dict[str, np.ndarray]:
    """Split the final map (threshold units) into additive terms: name -> (S, S).

    Upsampling, level averaging and smoothing are linear, so pushing each branch's (or each level's) token
    terms through them alone gives maps that add up to the final map exactly (up to float rounding).
    """
    from .scoring import gaussian_smooth, upsample_tokens

    size, n_levels = config.image_size, len(levels)
    standardized = any(level.contributions for level in levels)  # product scores have no branch terms
    parts: dict[str, torch.Tensor] = {}
    for index, (level, grid) in enumerate(zip(levels, grids)):
        terms = level.contributions if standardized else {f"level {index + 1}": level.score}
        for name, values in terms.items():
            upsampled = upsample_tokens(values[:1].float(), grid, size) / n_levels
            parts[name] = parts[name] + upsampled if name in parts else upsampled
    return {name: (gaussian_smooth(m, config.smoothing_sigma)[0] / threshold).cpu().numpy()
            for name, m in parts.items()}


def score_breakdown(patch: PatchExplanation, detector: Detector) -> str:
    """One sentence: what this patch's (unsmoothed, level) score is made of, in the score's raw units."""
    spec = detector.score_spec
    where = f"Score of this patch at level {patch.level + 1} (before smoothing and level averaging)"
    if patch.contributions:
        names = {"reconstruction": "reconstruction", "intra": "intra (reversed divergence)", "inter": "inter",
                 "nearest": "nearest good patch"}
        terms = " + ".join(f"{names.get(k, k)} {v:.2f}" for k, v in patch.contributions.items())
        return (
            f"{where} = {terms} = {patch.score:.2f}. Each term is that branch's z-score against held-out good "
            f"patches times its weight ({spec.describe()}); the weights were chosen by the self-check."
        )
    if spec.mode == "standardized":
        return (f"{where} = 0: none of the branches the score uses ({spec.describe()}) is computed at this level "
                "(the nearest good patch is searched on the finest level only); the other level carries the score.")
    source = "from the inter divergence " if detector.config.branches.inter else ""
    return (
        f"{where} = reconstruction error {patch.reconstruction_error:.3g} x correlation weight {source}"
        f"= {patch.score:.3g} ({spec.describe()})."
    )


def unused_correlations_note(detector: Detector) -> str | None:
    """When the model's score leaves out FOD's correlation branches: one sentence saying so (None otherwise).

    The Explore page still shows the correlations (to teach the method); this keeps it from implying that they
    drove the verdict.
    """
    spec = detector.score_spec
    variant = detector.config.branches
    present = [b for b, has in (("intra", variant.intra), ("inter", variant.inter)) if has]
    if spec.mode != "standardized" or not present:
        return None
    unused = [b for b in present if spec.weights.get(b, 0) <= 0]
    if not unused:
        return None
    used = ", ".join(b if b != "nearest" else "nearest good patch" for b, w in spec.weights.items() if w > 0)
    names = " and ".join(unused)
    positional = ""
    if spec.weights.get("nearest", 0) > 0 and any(lv.nearest_search == "positional" for lv in detector.model.levels):
        positional = (" Its nearest good patch is searched only near the patch's own position in the good photos "
                      "(FOD's idea of a positional reference, applied to PatchCore's distance; the Models page says "
                      "whether a leave-one-out self-check chose it or it was set for training).")
    return (
        f"This model's score does not use the {names} correlation{'s' if len(unused) > 1 else ''}: its self-check "
        f"found no combination with {'them' if len(unused) > 1 else 'it'} clearly better than {used} alone, so "
        f"the verdict comes from {used}.{positional} The correlation charts below show what the model learned, "
        "to explain the method, not this verdict."
    )
