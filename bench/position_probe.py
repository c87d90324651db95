"""Nearest good patch searched everywhere (PatchCore) or only near the same place (FOD's positional reference)?

FOD's inter-image correlation compares each patch with the good images' patch *at the same position*; PatchCore's
nearest-good-patch score (the product's nearest branch) searches every position of every good image. For aligned
parts a positional search could see a defect that happens to look like good texture elsewhere in the image. This
probe scores, for one benchmark set and seed, training's own split with the shipped 8+16 feature: the global search
(10 % greedy coreset as shipped, and all patches), and a local search over all training images but only within
``r`` grid cells (stride 8) of the patch's own position, and the geometric mean of the global (coreset) and the
local r1 distance per patch. ``--leave-one-out`` adds a self-check on the training images themselves. Printed:
self-check AUROC (held-out good vs synthetic defects) and with ``--diagnostic`` test image / pixel AUROC (labels read
after the fact; they never pick a design).

    python bench/position_probe.py --set elpv_mono@16 --seed 0 --diagnostic --out bench/results/position_probe.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.level_probe import BATCH, coreset_bank, embed, patches_of, probe_features, score, scorer_row  # noqa: E402
from fod_app import metrics  # noqa: E402
from fod_app.memory_bank import build_bank, nearest_distance  # noqa: E402
from fod_app.scoring import gaussian_smooth  # noqa: E402
from fod_app.synthetic import KINDS, synthetic_defects  # noqa: E402
from fod_app.training import bank_size  # noqa: E402

STRIDES = (8, 16)
#: name -> search radius in stride-8 grid cells (None: every position, i.e. PatchCore's global search).
DESIGNS = {"global, 10 % coreset (shipped)": None, "global, all patches": None, "local r1": 1, "local r2": 2,
           "local r4": 4, "geometric mean of global (coreset) and local r1": 1,
           "global, product bank": None, "geometric mean of global (product bank) and local r1": 1}


def product_bank(patches: torch.Tensor, config, seed: int) -> torch.Tensor:
    """The product's nearest-branch bank (``training.patch_banks``): ``training.bank_size`` rows, a greedy
    coreset of at most ``MAX_CANDIDATES`` random candidates (fast on the full sets, where the probe's 10 % coreset of
    every patch takes about 16 min)."""
    return build_bank(patches, bank_size(config, patches.shape[0]), seed)


def local_distance(levels: dict[int, torch.Tensor], good: torch.Tensor, radius: int) -> torch.Tensor:
    """(N, H, W): each patch's distance to the nearest patch of the good images ``good`` (M, H, W, D) within
    ``radius`` grid cells of its own position."""
    height, width = good.shape[1:3]
    good_sq = (good**2).sum(-1).permute(1, 2, 0)  # (H, W, M)
    n = next(iter(levels.values())).shape[0]
    out = []
    for lo in range(0, n, BATCH):
        emb = embed(levels, STRIDES, lo, lo + BATCH)  # (B, H, W, D)
        emb_sq = (emb**2).sum(-1)
        best = torch.full(emb.shape[:3], float("inf"))
        for di in range(-radius, radius + 1):
            for dj in range(-radius, radius + 1):
                i0, i1, j0, j1 = max(0, -di), min(height, height - di), max(0, -dj), min(width, width - dj)
                sq = (emb_sq[:, i0:i1, j0:j1, None] + good_sq[None, i0 + di : i1 + di, j0 + dj : j1 + dj]
                      - 2 * torch.einsum("bhwd,mhwd->bhwm", emb[:, i0:i1, j0:j1],
                                         good[:, i0 + di : i1 + di, j0 + dj : j1 + dj]))
                best[:, i0:i1, j0:j1] = torch.minimum(best[:, i0:i1, j0:j1], sq.amin(-1))
        out.append(best.clamp_min(0).sqrt())
    return torch.cat(out)


def global_distance(levels: dict[int, torch.Tensor], bank: torch.Tensor) -> torch.Tensor:
    """(N, H, W): each patch's distance to the nearest row of ``bank`` (PatchCore's search)."""
    n = next(iter(levels.values())).shape[0]
    return torch.cat([nearest_distance(embed(levels, STRIDES, lo, lo + BATCH), bank) for lo in range(0, n, BATCH)])


def post_process(dist: torch.Tensor, size: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, S, S), image scores (N,)) of distance grids (N, H, W): PatchCore's upsampling, smoothing, max."""
    maps = torch.cat([gaussian_smooth(F.interpolate(dist[lo : lo + BATCH, None], size=(size, size), mode="bilinear",
                                                    align_corners=True)[:, 0], sigma)
                      for lo in range(0, dist.shape[0], BATCH)])
    return maps.numpy(), maps.flatten(1).amax(1).numpy()


def local_scores(levels: dict[int, torch.Tensor], good: torch.Tensor, radius: int, size: int,
                 sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``post_process`` of ``local_distance``."""
    return post_process(local_distance(levels, good, radius), size, sigma)


def leave_one_out_check(found, radius: int | None, size: int, sigma: float) -> float:
    """Self-check AUROC on the *training* images, leave-one-out: each fit image and a synthetic defect cut from
    itself, both scored against the other fit images only (all their patches; ``radius`` None: global search).
    Many more good images than the 4-5 held-out ones of a few-shot set (the held-out check is the same for both)."""
    good_scores, defect_scores = [], []
    n = len(found.train_images)
    defects = found.extract([synthetic_defects([image], [image], 1, 1000 + i, kinds=(KINDS[i % len(KINDS)],))[0][0]
                             for i, image in enumerate(found.train_images)])
    for i in range(n):
        others = {s: f[[j for j in range(n) if j != i]] for s, f in found.train.items()}
        pair = {s: torch.cat([found.train[s][i : i + 1], defects[s][i : i + 1]]) for s in STRIDES}
        if radius is None:
            bank = patches_of(others, STRIDES)
            scores = score(pair, STRIDES, bank, size, sigma)[1]
        else:
            scores = local_scores(pair, embed(others, STRIDES, 0, n - 1), radius, size, sigma)[1]
        good_scores.append(scores[0])
        defect_scores.append(scores[1])
    return metrics.image_auroc(np.r_[np.zeros(n), np.ones(n)], np.r_[good_scores, defect_scores])


@torch.inference_mode()
def main() -> None:
    parser = probe_arguments(__doc__.split("\n")[0], list(DESIGNS), results_file=True)
    parser.add_argument("--leave-one-out", action="store_true",
                        help="also the leave-one-out self-check on the training images (global designs: all patches)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    found = probe_features(args.set, args.seed, STRIDES, args.diagnostic)
    size, sigma = found.config.image_size, found.config.smoothing_sigma
    patches = patches_of(found.train, STRIDES)
    good = embed(found.train, STRIDES, 0, next(iter(found.train.values())).shape[0])  # (M, H, W, D)
    results = {}
    for name in args.designs:
        started = time.perf_counter()
        radius = DESIGNS[name]
        if name.startswith("geometric mean"):
            bank = product_bank(patches, found.config, args.seed) if "product" in name else coreset_bank(patches,
                                                                                                         args.seed)
            scorer = lambda levels, bank=bank, radius=radius: post_process(  # noqa: E731
                (global_distance(levels, bank) * local_distance(levels, good, radius)).sqrt(), size, sigma)
        elif radius is None:
            bank = (coreset_bank(patches, args.seed) if "coreset" in name else
                    product_bank(patches, found.config, args.seed) if "product" in name else patches)
            scorer = lambda levels, bank=bank: score(levels, STRIDES, bank, size, sigma)  # noqa: E731
        else:
            scorer = lambda levels, radius=radius: local_scores(levels, good, radius, size, sigma)  # noqa: E731
        row = scorer_row(scorer, found.held_out, found.synthetic, found.test, found.test_labels, found.test_masks)
        if args.leave_one_out:
            row["self_check_leave_one_out"] = leave_one_out_check(found, radius, size, sigma)
        row["seconds"] = round(time.perf_counter() - started, 1)
        results[name] = row
        print(f"  {name:32s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if v is not None), flush=True)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
