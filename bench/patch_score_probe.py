"""Three more ways to score a patch against good patches, next to PatchCore's nearest distance. Self-check chooses.

For one benchmark set and seed, on training's own split, with the shipped patch feature (strides 8 + 16 on the
stride-8 grid) and the benchmark's 10 % coreset, each design gives every patch a distance; then the same upsampling,
smoothing and max. Printed: self-check AUROC (held-out good vs the self-check's synthetic defects) and, with
``--diagnostic``, test image / pixel AUROC (labels read after the fact; they never pick a design).

- ``global (shipped)``: PatchCore's nearest distance to the bank (the product's nearest branch).
- ``own image, beyond rK``: the smaller of that distance and the distance to the nearest patch *of the same image*
  more than K grid cells away (a training-free form of FOD's intra-image idea: a good patch of a texture has copies
  in its own image, a defect seldom does). The image's own patches join the bank at test time.
- ``zoomed crops in the bank``: the bank also holds the patches of five 80 % crops of every training image, resized
  back (texture at another scale: magnetic-tile images are crops of different sizes scaled to 256²).
- ``whitened``: patches whitened with the training patches' Ledoit-Wolf covariance before coreset and search.

    python bench/patch_score_probe.py --set magnetic_tile@16 --seed 0 --diagnostic \
        --out bench/results/patch_score_probe.json
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.level_probe import BATCH, add_row, coreset_bank, embed, patches_of, probe_features, scorer_row  # noqa: E402
from bench.position_probe import global_distance, post_process  # noqa: E402

STRIDES = (8, 16)
DESIGNS = ["global (shipped)", "own image, beyond r4", "own image, beyond r8", "zoomed crops in the bank",
           "whitened"]
#: features per stride -> (N, H, W) patch distances
Distance = Callable[[dict[int, torch.Tensor]], torch.Tensor]


def bank_distance(bank: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Distance:
    """The nearest-row distance to ``bank`` as a ``Distance`` (``position_probe.global_distance``)."""
    return lambda levels: global_distance(levels, bank, transform)


def own_image_distance(levels: dict[int, torch.Tensor], beyond: int) -> torch.Tensor:
    """(N, H, W): each patch's distance to the nearest patch of its own image more than ``beyond`` cells away."""
    n = next(iter(levels.values())).shape[0]
    out = []
    for lo in range(0, n, BATCH):
        emb = embed(levels, STRIDES, lo, lo + BATCH)
        b, h, w, d = emb.shape
        x = emb.reshape(b, h * w, d)
        sq = (x * x).sum(-1)
        d2 = sq[:, :, None] + sq[:, None, :] - 2 * x @ x.transpose(1, 2)  # (B, L, L)
        rows, cols = (t.flatten() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
        near = ((rows[:, None] - rows[None]).abs() <= beyond) & ((cols[:, None] - cols[None]).abs() <= beyond)
        out.append(d2.masked_fill(near[None], float("inf")).amin(-1).clamp_min(0).sqrt().reshape(b, h, w))
    return torch.cat(out)


def zoomed_crops(images: list[np.ndarray], fraction: float = 0.8) -> list[np.ndarray]:
    """Five crops (centre and corners) of ``fraction`` of each (3, S, S) image, resized back to S x S."""
    out = []
    for image in images:
        x = torch.from_numpy(image)[None]
        size = x.shape[-1]
        crop = int(round(size * fraction))
        for top, left in ((size - crop) // 2, (size - crop) // 2), (0, 0), (0, size - crop), (size - crop, 0), \
                (size - crop, size - crop):
            part = x[..., top : top + crop, left : left + crop]
            out.append(F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False)[0].numpy())
    return out


def make_distance(name: str, found, seed: int) -> Distance:
    patches = patches_of(found.train, STRIDES)
    if name == "global (shipped)":
        return bank_distance(coreset_bank(patches, seed))
    if name.startswith("own image"):
        beyond = int(name.rsplit("r", 1)[1])
        shipped = bank_distance(coreset_bank(patches, seed))
        return lambda levels: torch.minimum(shipped(levels), own_image_distance(levels, beyond))
    if name == "zoomed crops in the bank":
        zoomed = patches_of(found.extract(zoomed_crops(found.train_images)), STRIDES)
        return bank_distance(coreset_bank(torch.cat([patches, zoomed]), seed))
    if name == "whitened":
        mean = patches.mean(0)
        sample = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(seed))[:50000]]
        values, vectors = np.linalg.eigh(LedoitWolf().fit((sample - mean).double().numpy()).covariance_)
        whiten = torch.from_numpy(vectors @ np.diag(values**-0.5) @ vectors.T).float()
        whiten = whiten / whiten.diagonal().mean()  # distances on a scale like the raw ones
        return bank_distance(coreset_bank((patches - mean) @ whiten, seed), lambda x: (x - mean) @ whiten)
    raise ValueError(f"unknown design {name!r}")


@torch.inference_mode()
def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], DESIGNS, results_file=True).parse_args()
    torch.set_num_threads(2)
    found = probe_features(args.set, args.seed, STRIDES, args.diagnostic)
    size, sigma = found.config.image_size, found.config.smoothing_sigma
    results: dict[str, dict] = {}
    for name in args.designs:
        started = time.perf_counter()
        distance = make_distance(name, found, args.seed)
        row = scorer_row(lambda levels, distance=distance: post_process(distance(levels), size, sigma),
                         found.held_out, found.synthetic, found.test, found.test_labels, found.test_masks)
        add_row(results, name, row, started, 26)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
