"""Nearest good patch searched everywhere (PatchCore) or only near the same place (FOD's positional reference)?

FOD's inter-image correlation compares each patch with the good images' patch *at the same position*; PatchCore's
nearest-good-patch score (the product's nearest branch) searches every position of every good image. For aligned
parts a positional search could see a defect that happens to look like good texture elsewhere in the image. This
probe scores, for one benchmark set and seed, training's own split with the shipped 8+16 feature: the global search
(10 % greedy coreset as shipped, and all patches), and a local search over all training images but only within
``r`` grid cells (stride 8) of the patch's own position, and the geometric mean of the global (coreset) and the
local r1 distance per patch. ``--leave-one-out`` adds a self-check on the training images themselves;
``--alignment`` prints, label-free, how often the nearest good patch of a held-out good patch lies within one cell of
its own position; ``--jitter SHIFT ANGLE`` moves and turns every image at random (a proxy for parts that are not
fixtured; test masks are then left out). Printed:
self-check AUROC (held-out good vs synthetic defects) and with ``--diagnostic`` test image / pixel AUROC (labels read
after the fact; they never pick a design).

    python bench/position_probe.py --set elpv_mono@16 --seed 0 --diagnostic --out bench/results/position_probe.json
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.level_probe import (  # noqa: E402
    BATCH,
    add_row,
    coreset_bank,
    embed,
    patches_of,
    probe_features,
    score,
    scorer_row,
)
from fod_app import memory_bank, metrics  # noqa: E402
from fod_app.memory_bank import build_bank, nearest_distance  # noqa: E402
from fod_app.scoring import gaussian_smooth  # noqa: E402
from fod_app.synthetic import KINDS, synthetic_defects  # noqa: E402
from fod_app.training import bank_size  # noqa: E402

STRIDES = (8, 16)


@dataclass(frozen=True)
class Design:
    """What one design searches: a global ``bank`` ("coreset": the 10 % coreset, as the benchmark's PatchCore;
    "product": the product's own bank; "all": every training patch; None: no global search) and/or a local search
    within ``radius`` stride-8 grid cells of the patch's own position (None: none). Both: the geometric mean of the
    two distances. ``shuffled``: the good images' positions are shuffled first (one seeded permutation for all of
    them), so the local search looks at as many patches, but at unrelated places. ``per_place``: the local search
    keeps only that many good patches per position (a greedy coreset of its neighbourhood's patches): the bank a
    product would store, (H * W, per_place, D). ``images``: the local search (or its place bank) uses only that many
    training images (a seeded subset, as the product's ``memory_bank.MAX_PLACE_IMAGES``)."""

    bank: str | None
    radius: int | None
    shuffled: bool = False
    per_place: int | None = None
    images: int | None = None


DESIGNS = {"global, 10 % coreset (shipped)": Design("coreset", None), "global, all patches": Design("all", None),
           "local r1": Design(None, 1), "local r2": Design(None, 2), "local r4": Design(None, 4),
           "geometric mean of global (coreset) and local r1": Design("coreset", 1),
           "global, product bank": Design("product", None),
           "geometric mean of global (product bank) and local r1": Design("product", 1),
           "local r1 at shuffled places": Design(None, 1, shuffled=True),
           "local r1, 64 per place": Design(None, 1, per_place=64),
           "local r1, 32 per place": Design(None, 1, per_place=32),
           "local r1, 32 per place, 256 images": Design(None, 1, per_place=32, images=256),
           "local r1, 128 per place, 256 images": Design(None, 1, per_place=128, images=256),
           "local r1, 256 per place, 256 images": Design(None, 1, per_place=256, images=256),
           "local r1, 256 images": Design(None, 1, images=256),
           "local r1, 128 per place": Design(None, 1, per_place=128),
           "local r1, 256 per place": Design(None, 1, per_place=256)}
Scorer = Callable[[dict[int, torch.Tensor]], tuple[np.ndarray, np.ndarray]]


def product_bank(patches: torch.Tensor, config, seed: int) -> torch.Tensor:
    """The product's nearest-branch bank (``training.patch_banks``): ``training.bank_size`` rows, a greedy
    coreset of at most ``MAX_CANDIDATES`` random candidates (fast on the full sets, where the probe's 10 % coreset of
    every patch takes about 16 min)."""
    return build_bank(patches, bank_size(config, patches.shape[0]), seed)


def local_distance(levels: dict[int, torch.Tensor], good: torch.Tensor, radius: int,
                   strides: tuple[int, ...] = STRIDES) -> torch.Tensor:
    """(N, H, W): each patch's distance to the nearest patch of the good images ``good`` (M, H, W, D) within
    ``radius`` grid cells of its own position; ``levels`` embedded with ``strides`` as ``good`` was."""
    height, width = good.shape[1:3]
    good_sq = (good**2).sum(-1).permute(1, 2, 0)  # (H, W, M)
    n = next(iter(levels.values())).shape[0]
    out = []
    for lo in range(0, n, BATCH):
        emb = embed(levels, strides, lo, lo + BATCH)  # (B, H, W, D)
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


def place_distance(levels: dict[int, torch.Tensor], banks: torch.Tensor) -> torch.Tensor:
    """(N, H, W): each patch's distance to the nearest row of its own position's bank (``memory_bank.place_bank``),
    searched as the product does (``memory_bank.place_distance``)."""
    n = next(iter(levels.values())).shape[0]
    out = []
    for lo in range(0, n, BATCH):
        emb = embed(levels, STRIDES, lo, lo + BATCH)  # (B, H, W, D)
        out.append(memory_bank.place_distance(emb.flatten(1, 2), banks).reshape(emb.shape[:3]))
    return torch.cat(out)


def global_distance(levels: dict[int, torch.Tensor], bank: torch.Tensor,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    strides: tuple[int, ...] = STRIDES) -> torch.Tensor:
    """(N, H, W): each patch's distance to the nearest row of ``bank`` (PatchCore's search); ``transform`` maps the
    patch features (B, H, W, D) into the bank's space first (None: the bank holds raw patch features); the patch
    feature is the ``strides`` levels concatenated (``level_probe.embed``)."""
    n = next(iter(levels.values())).shape[0]
    out = []
    for lo in range(0, n, BATCH):
        patches = embed(levels, strides, lo, lo + BATCH)
        out.append(nearest_distance(patches if transform is None else transform(patches), bank))
    return torch.cat(out)


def post_process(dist: torch.Tensor, size: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, S, S), image scores (N,)) of distance grids (N, H, W): PatchCore's upsampling, smoothing, max."""
    maps = torch.cat([gaussian_smooth(F.interpolate(dist[lo : lo + BATCH, None], size=(size, size), mode="bilinear",
                                                    align_corners=True)[:, 0], sigma)
                      for lo in range(0, dist.shape[0], BATCH)])
    return maps.numpy(), maps.flatten(1).amax(1).numpy()


def jitter(shift: int, angle: float) -> Callable[[np.ndarray, str], np.ndarray]:
    """An image transform for ``probe_features``: a shift of up to ``shift`` px each way and a turn of up to
    ``angle`` degrees, the same for the same file every time (seeded by its path); corners filled with the image's
    corner colour."""
    def move(image: np.ndarray, path: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(path.encode()))
        dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, 2))
        u8 = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        moved = Image.fromarray(u8).rotate(rng.uniform(-angle, angle), resample=Image.BILINEAR, translate=(dx, dy),
                                           fillcolor=tuple(int(v) for v in u8[0, 0]))
        return (np.asarray(moved).astype(np.float32) / 255).transpose(2, 0, 1).copy()
    return move


def alignment(found) -> dict[str, float]:
    """Label-free: for the held-out good patches, the share whose nearest training patch (all of them) lies within one
    grid cell of their own position, and the median of local r1 / global nearest distance (1: as near locally)."""
    good = embed(found.train, STRIDES, 0, next(iter(found.train.values())).shape[0])
    nearest = global_distance(found.held_out, good.reshape(-1, good.shape[-1]))
    ratio = local_distance(found.held_out, good, 1) / nearest.clamp_min(1e-6)
    return {"share_nearest_within_r1": float((ratio < 1.0001).float().mean()), "median_local_over_global": float(
        ratio.median())}


def make_scorer(design: Design, train: dict[int, torch.Tensor], config, seed: int) -> Scorer:
    """features -> (maps, image scores) of ``design`` with the training images ``train`` as the good ones."""
    size, sigma = config.image_size, config.smoothing_sigma
    bank = good = None
    if design.bank is not None:
        patches = patches_of(train, STRIDES)
        bank = {"coreset": lambda: coreset_bank(patches, seed), "product": lambda: product_bank(patches, config, seed),
                "all": lambda: patches}[design.bank]()
    if design.radius is not None:
        good = embed(train, STRIDES, 0, next(iter(train.values())).shape[0])  # (M, H, W, D)
        if design.shuffled:
            m, h, w, d = good.shape
            order = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))
            good = good.reshape(m, h * w, d)[:, order].reshape(m, h, w, d)
    if design.images is not None:  # the seeded subset ``training.place_banks`` takes
        good = good[memory_bank.candidate_rows(good.shape[0], seed, design.images)]
    banks = None if design.per_place is None else memory_bank.place_bank(good, design.per_place, seed, design.radius)

    def scorer(levels: dict[int, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        if good is None:
            return score(levels, STRIDES, bank, size, sigma)
        local = local_distance(levels, good, design.radius) if banks is None else place_distance(levels, banks)
        return post_process(local if bank is None else (global_distance(levels, bank) * local).sqrt(), size, sigma)

    return scorer


def leave_one_out_check(found, design: Design, seed: int) -> float:
    """Self-check AUROC on the *training* images, leave-one-out: each fit image and a synthetic defect cut from
    itself, both scored by ``design`` built from the other fit images only (its bank rebuilt without that image).
    Many more good images than the 4-5 held-out ones of a few-shot set."""
    good_scores, defect_scores = [], []
    n = len(found.train_images)
    defects = found.extract([synthetic_defects([image], [image], 1, 1000 + i, kinds=(KINDS[i % len(KINDS)],))[0][0]
                             for i, image in enumerate(found.train_images)])
    for i in range(n):
        others = {s: f[[j for j in range(n) if j != i]] for s, f in found.train.items()}
        pair = {s: torch.cat([found.train[s][i : i + 1], defects[s][i : i + 1]]) for s in STRIDES}
        scores = make_scorer(design, others, found.config, seed)(pair)[1]
        good_scores.append(scores[0])
        defect_scores.append(scores[1])
    return metrics.image_auroc(np.r_[np.zeros(n), np.ones(n)], np.r_[good_scores, defect_scores])


@torch.inference_mode()
def main() -> None:
    parser = probe_arguments(__doc__.split("\n")[0], list(DESIGNS), results_file=True)
    parser.add_argument("--leave-one-out", action="store_true",
                        help="also the leave-one-out self-check on the training images")
    parser.add_argument("--alignment", action="store_true", help="also the label-free alignment statistics")
    parser.add_argument("--jitter", nargs=2, type=float, metavar=("SHIFT", "ANGLE"),
                        help="move every image by up to SHIFT px and turn it by up to ANGLE degrees")
    args = parser.parse_args()
    torch.set_num_threads(2)
    move = jitter(int(args.jitter[0]), args.jitter[1]) if args.jitter else None
    found = probe_features(args.set, args.seed, STRIDES, args.diagnostic, move)
    results: dict[str, dict] = {}
    for name in args.designs:
        started = time.perf_counter()
        scorer = make_scorer(DESIGNS[name], found.train, found.config, args.seed)
        row = scorer_row(scorer, found.held_out, found.synthetic, found.test, found.test_labels, found.test_masks)
        if args.leave_one_out:
            row["self_check_leave_one_out"] = leave_one_out_check(found, DESIGNS[name], args.seed)
        add_row(results, name, row, started, 32)
    if args.alignment:
        started = time.perf_counter()
        add_row(results, "alignment", alignment(found), started, 32)
    moved = f" jitter {args.jitter[0]:g} px {args.jitter[1]:g} deg" if args.jitter else ""
    append_results(args.out, args.set + moved, args.seed, results)


if __name__ == "__main__":
    main()
