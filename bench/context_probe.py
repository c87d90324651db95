"""Two label-free uses of where a patch is and of the whole image, next to PatchCore's nearest distance.

For one benchmark set and seed, on training's own split, with the shipped patch feature (strides 8 + 16 on the
stride-8 grid) and the benchmark's 10 % coreset. Printed: self-check AUROC (held-out good vs the self-check's
synthetic defects) and, with ``--diagnostic``, test image / pixel AUROC (labels read after the fact; they never
pick a design).

- ``global (shipped)``: PatchCore's nearest distance to the bank, upsampled, smoothed, max.
- ``per-place scale``: that distance divided by how far good patches at the same place are from other good images
  (each fit image's patches against the patches of the other fit images, averaged over images per grid position,
  smoothed over 2 cells, floored at the map's 10th percentile, divided by its mean). Edges, busbars and corners of
  aligned parts are far from their neighbours even when good; a defect in a quiet region is not.
- ``+ image Gaussian``: the image score also adds the Mahalanobis distance (Ledoit-Wolf) of the image's mean-pooled
  features to the fit images' (in the style of Rippel et al. 2020), both terms standardised with their
  leave-one-out values on the fit images. The heat map stays the nearest distance's.
- ``per-place scale + image Gaussian``: both.

    python bench/context_probe.py --set elpv_mono@16 --seed 0 --diagnostic --out bench/results/context_probe.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.level_probe import add_row, coreset_bank, embed, patches_of, probe_features, scorer_row  # noqa: E402
from bench.position_probe import global_distance, post_process  # noqa: E402
from fod_app.memory_bank import nearest_distance  # noqa: E402
from fod_app.scoring import gaussian_smooth  # noqa: E402

STRIDES = (8, 16)
DESIGNS = ["global (shipped)", "per-place scale", "+ image Gaussian", "per-place scale + image Gaussian"]


def leave_one_out_distance(train: dict[int, torch.Tensor]) -> torch.Tensor:
    """(N, H, W): each fit image's patches' nearest distance to every patch of the other fit images."""
    emb = embed(train, STRIDES, 0, next(iter(train.values())).shape[0])  # (N, H, W, D)
    n = emb.shape[0]
    out = []
    for i in range(n):
        others = torch.cat([emb[j].reshape(-1, emb.shape[-1]) for j in range(n) if j != i])
        out.append(nearest_distance(emb[i : i + 1], others)[0])
    return torch.stack(out)


def place_scale(loo: torch.Tensor) -> torch.Tensor:
    """(H, W) relative scale of good patches' distances per grid position, mean 1."""
    scale = gaussian_smooth(loo.mean(0)[None], 2.0)[0]
    scale = scale.clamp_min(torch.quantile(scale.flatten(), 0.1))
    return scale / scale.mean()


def pooled(levels: dict[int, torch.Tensor]) -> np.ndarray:
    """(N, C) mean-pooled features of every level, concatenated."""
    return torch.cat([levels[s].mean((-2, -1)) for s in STRIDES], 1).numpy().astype(np.float64)


def mahalanobis(fit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of a Ledoit-Wolf Gaussian fitted on ``fit`` (N, C)."""
    estimator = LedoitWolf().fit(fit)
    return estimator.location_, estimator.precision_


def gaussian_distances(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x - mean
    return np.sqrt(np.einsum("nc,cd,nd->n", d, precision, d).clip(min=0))


@torch.inference_mode()
def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], DESIGNS, results_file=True).parse_args()
    torch.set_num_threads(2)
    found = probe_features(args.set, args.seed, STRIDES, args.diagnostic)
    size, sigma = found.config.image_size, found.config.smoothing_sigma
    bank = coreset_bank(patches_of(found.train, STRIDES), args.seed)
    loo = leave_one_out_distance(found.train)
    scale = place_scale(loo)
    # leave-one-out image terms on the fit images, to standardise the two terms of the fused image score
    train_pooled = pooled(found.train)
    n = len(train_pooled)
    loo_gauss = np.array([gaussian_distances(train_pooled[i : i + 1], *mahalanobis(np.delete(train_pooled, i, 0)))[0]
                          for i in range(n)])
    gauss = mahalanobis(train_pooled)
    loo_max = {False: post_process(loo, size, sigma)[1], True: post_process(loo / scale, size, sigma)[1]}
    results: dict[str, dict] = {}
    for name in args.designs:
        started = time.perf_counter()
        scaled, fused = name.startswith("per-place"), name.endswith("image Gaussian")

        def scorer(levels, scaled=scaled, fused=fused):
            dist = global_distance(levels, bank)
            maps, scores = post_process(dist / scale if scaled else dist, size, sigma)
            if fused:
                ref = loo_max[scaled]
                g = gaussian_distances(pooled(levels), *gauss)
                scores = (scores - ref.mean()) / ref.std() + (g - loo_gauss.mean()) / loo_gauss.std()
            return maps, scores

        row = scorer_row(scorer, found.held_out, found.synthetic, found.test, found.test_labels, found.test_masks)
        add_row(results, name, row, started, 34)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
