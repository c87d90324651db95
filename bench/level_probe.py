"""Which backbone feature levels make the best patch feature (issue 7 §4)? Self-check AUROC chooses.

The product's patch feature (the nearest-good-patch branch, and the reference PatchCore) concatenates the backbone's
3x3-pooled stride-8 map with its stride-16 map upsampled to the stride-8 grid. This probe builds the same PatchCore
(10 % greedy coreset in a 128-d random projection, Euclidean nearest distance, bilinear upsampling, Gaussian
smoothing with the preset's sigma, image score = max) on other sets of EfficientNet-Lite0 levels (strides 4, 8,
16, 32; finer levels area-pooled down to the stride-8 grid, coarser ones bilinearly upsampled to it) and scores,
for one benchmark set and seed, training's own split: self-check AUROC (the synthetic defects of
``fod_app.selfcheck`` on the held-out good images vs those images) and, with ``--diagnostic``, test image / pixel
AUROC (labels read after the fact; they never pick a design).

    python bench/level_probe.py --set magnetic_tile@16 --seed 0 --diagnostic --out bench/results/level_probe.json
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.datasets import load_set  # noqa: E402
from fod_app import backbone as backbone_module  # noqa: E402
from fod_app import metrics, selfcheck  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.data import load_images, load_mask  # noqa: E402
from fod_app.memory_bank import greedy_coreset, nearest_distance  # noqa: E402
from fod_app.scoring import gaussian_smooth  # noqa: E402
from fod_app.training import extract_features, split_holdout  # noqa: E402

ALL_STRIDES = (4, 8, 16, 32)
#: One group of images as a scorer takes it (``scorer_row``).
Images = TypeVar("Images")
#: name -> strides concatenated on the stride-8 grid. The first is the shipped feature.
DESIGNS = {
    "8+16 (shipped)": (8, 16),
    "4+8+16": (4, 8, 16),
    "8+16+32": (8, 16, 32),
    "4+8+16+32": (4, 8, 16, 32),
    "8 only": (8,),
    "16 only": (16,),
}
GRID_STRIDE = 8
BATCH = 16


def embed(levels: dict[int, torch.Tensor], strides: tuple[int, ...], lo: int, hi: int) -> torch.Tensor:
    """Images lo:hi of the per-stride maps -> (B, H8, W8, D) patch features on the stride-8 grid."""
    parts = []
    for stride in strides:
        f = levels[stride][lo:hi]
        if stride < GRID_STRIDE:
            f = F.avg_pool2d(f, GRID_STRIDE // stride)
        elif stride > GRID_STRIDE:
            size = (f.shape[-2] * stride // GRID_STRIDE, f.shape[-1] * stride // GRID_STRIDE)
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        parts.append(f)
    return torch.cat(parts, 1).permute(0, 2, 3, 1)


def score(levels: dict[int, torch.Tensor], strides: tuple[int, ...], bank: torch.Tensor, size: int,
          sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, S, S), image scores (N,)) of every image in ``levels``, PatchCore's post-processing."""
    n = next(iter(levels.values())).shape[0]
    maps = []
    for lo in range(0, n, BATCH):
        emb = embed(levels, strides, lo, lo + BATCH)
        dist = nearest_distance(emb, bank)[:, None]  # (B, 1, H8, W8)
        up = F.interpolate(dist, size=(size, size), mode="bilinear", align_corners=True)[:, 0]
        maps.append(gaussian_smooth(up, sigma))
    out = torch.cat(maps)
    return out.numpy(), out.flatten(1).amax(1).numpy()


def patches_of(levels: dict[int, torch.Tensor], strides: tuple[int, ...]) -> torch.Tensor:
    """(N * H8 * W8, D) patch features of every image in ``levels``."""
    emb = embed(levels, strides, 0, next(iter(levels.values())).shape[0])
    return emb.reshape(-1, emb.shape[-1])


def coreset_bank(patches: torch.Tensor, seed: int, cap: int = 0) -> torch.Tensor:
    """PatchCore's bank: a 10 % greedy coreset (128-d projection) of ``patches``, at most ``cap`` rows (0: no cap)."""
    size = max(1, int(0.1 * len(patches)))
    return patches[greedy_coreset(patches, min(size, cap) if cap else size, 128, seed)].contiguous()


def scorer_row(scorer: Callable[[Images], tuple[np.ndarray, np.ndarray]], good: Images, synthetic: Images,
               test: Images | None = None, test_labels: np.ndarray | None = None,
               test_masks: np.ndarray | None = None) -> dict[str, float | None]:
    """Self-check AUROC of one patch scorer (a group of images -> (maps, image scores); held-out good vs synthetic
    defects) and, given the test group, test image and pixel AUROC (pixel: None for sets without masks). A group is
    whatever the scorer takes: per-stride features here, a group's name in ``shift_probe``."""
    good_scores, synth_scores = scorer(good)[1], scorer(synthetic)[1]
    row: dict[str, float | None] = {"self_check": metrics.image_auroc(
        np.r_[np.zeros(len(good_scores)), np.ones(len(synth_scores))], np.r_[good_scores, synth_scores])}
    if test is not None:
        maps, scores = scorer(test)
        row["test_image"] = metrics.image_auroc(test_labels, scores)
        row["test_pixel"] = None if test_masks is None else metrics.pixel_auroc(test_masks, maps)
    return row


def bank_row(bank: torch.Tensor, strides: tuple[int, ...], good: dict[int, torch.Tensor],
             synthetic: dict[int, torch.Tensor], config, test: dict[int, torch.Tensor] | None = None,
             test_labels: np.ndarray | None = None, test_masks: np.ndarray | None = None) -> dict[str, float | None]:
    """``scorer_row`` of PatchCore's nearest-patch score against ``bank``."""
    return scorer_row(lambda levels: score(levels, strides, bank, config.image_size, config.smoothing_sigma),
                      good, synthetic, test, test_labels, test_masks)


def add_row(results: dict[str, dict], name: str, row: dict, started: float, width: int = 20) -> None:
    """Finish one design's row: its seconds since ``started``; store it under ``name`` and print it."""
    row["seconds"] = round(time.perf_counter() - started, 1)
    results[name] = row
    print(f"  {name:{width}s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if v is not None), flush=True)


@dataclass
class ProbeFeatures:
    """Backbone features (stride -> (N, C, h, w)) of one set and seed, split as training splits it."""

    config: Any
    train: dict[int, torch.Tensor]
    held_out: dict[int, torch.Tensor]
    synthetic: dict[int, torch.Tensor]
    test: dict[int, torch.Tensor] | None = None
    test_labels: np.ndarray | None = None
    test_masks: np.ndarray | None = None
    train_images: list[np.ndarray] | None = None  # the fit images themselves (HxWx3 uint8)
    extract: Callable[[list[np.ndarray]], dict[int, torch.Tensor]] | None = None  # images -> features, same backbone


@torch.inference_mode()
def probe_features(set_name: str, seed: int, strides: tuple[int, ...], with_test: bool,
                   transform: Callable[[np.ndarray, str], np.ndarray] | None = None) -> ProbeFeatures:
    """Features of training's own split (fit images, held-out good images, the self-check's synthetic defects on
    them) and, ``with_test``, of the test images with their labels and masks (never used to choose).
    ``transform`` (image (3, S, S), its path -> image) is applied to every loaded image; test masks are then left
    out (they would no longer fit)."""
    config = create_config("cpu", seed=seed)
    bset = load_set(set_name, seed)
    size = config.image_size

    def load(paths: list) -> list[np.ndarray]:
        loaded = load_images([(str(path), path) for path in paths], size).images  # (path, image)
        return [image if transform is None else transform(image, name) for name, image in loaded]

    images = load(bset.train)
    train_idx, hold_idx = split_holdout(len(images), config)
    backbone_module.FEATURE_STRIDES = strides  # these levels of the same backbone, same 3x3 pooling
    backbone = backbone_module.create_feature_extractor(config.backbone, device="cpu")
    dev = torch.device("cpu")

    def features(imgs: list[np.ndarray]) -> dict[int, torch.Tensor]:
        return dict(zip(strides, extract_features(backbone, imgs, dev)))

    synthetic = selfcheck.make_synthetic_images([images[i] for i in hold_idx], config.seed)
    found = ProbeFeatures(config, features([images[i] for i in train_idx]), features([images[i] for i in hold_idx]),
                          features(synthetic), train_images=[images[i] for i in train_idx], extract=features)
    if with_test:
        found.test = features(load([t.path for t in bset.test]))
        found.test_labels = np.array([t.label for t in bset.test])
        if bset.has_masks and transform is None:
            found.test_masks = np.stack([load_mask(t.mask_path, size) if t.label else np.zeros((size, size), bool)
                                         for t in bset.test])
    print(f"{set_name} seed {seed}: {len(train_idx)} training images, {len(hold_idx)} held out, "
          f"{len(synthetic)} synthetic defects", flush=True)
    return found


@torch.inference_mode()
def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], list(DESIGNS), results_file=True).parse_args()
    torch.set_num_threads(2)
    found = probe_features(args.set, args.seed, ALL_STRIDES, args.diagnostic)
    config, train_f, hold_f, synth_f = found.config, found.train, found.held_out, found.synthetic
    test_f, test_labels, test_masks = found.test, found.test_labels, found.test_masks
    results = {}
    for name in args.designs:
        strides = DESIGNS[name]
        started = time.perf_counter()
        patches = patches_of(train_f, strides)
        bank = coreset_bank(patches, args.seed)
        row = bank_row(bank, strides, hold_f, synth_f, config, test_f, test_labels, test_masks)
        row["dims"] = int(patches.shape[1])
        add_row(results, name, row, started)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
