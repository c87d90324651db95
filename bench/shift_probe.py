"""Sub-cell shifted views at inspection: does averaging the nearest-patch map over shifted copies help?

The nearest-good-patch score lives on the stride-8 grid: a defect smaller than a cell, or straddling cells, is
diluted by the 3x3 pooling. This probe scores every image also as copies shifted by half a cell (4 px, reflect
padding), shifts each copy's full-resolution map back into the image's frame, averages the maps, then smooths and
takes the max as the product does. The bank is PatchCore's (10 % greedy coreset, 128-d projection) of the
unshifted training images of training's own split; self-check AUROC (the shipped synthetic defects on the held-out
good images) could choose; test image / pixel AUROC only with ``--diagnostic`` (read after the fact).

    python bench/shift_probe.py --set magnetic_tile@16 --seed 0 --diagnostic --out bench/results/shift_probe.json
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
from bench.datasets import load_set  # noqa: E402
from bench.level_probe import add_row, coreset_bank, embed, patches_of, scorer_row  # noqa: E402
from fod_app import backbone as backbone_module  # noqa: E402
from fod_app import selfcheck  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.data import load_images, load_mask  # noqa: E402
from fod_app.memory_bank import nearest_distance  # noqa: E402
from fod_app.scoring import gaussian_smooth  # noqa: E402
from fod_app.training import extract_features, split_holdout  # noqa: E402

STRIDES = (8, 16)
HALF = 4  # half a stride-8 cell, in pixels
#: name -> the (dy, dx) shifts whose maps are averaged. The first is the shipped score.
DESIGNS = {
    "1 view (shipped)": ((0, 0),),
    "2 views, diagonal": ((0, 0), (HALF, HALF)),
    "4 views, stride 4": ((0, 0), (0, HALF), (HALF, 0), (HALF, HALF)),
    "5 views, +-half cell": ((0, 0), (HALF, HALF), (-HALF, -HALF), (HALF, -HALF), (-HALF, HALF)),
}


def shift_images(images: list[np.ndarray], dy: int, dx: int) -> list[np.ndarray]:
    """Copies of (3, S, S) images whose pixel (y, x) is the original's (y + dy, x + dx) (reflect padding)."""
    if dy == 0 and dx == 0:
        return images
    pad = max(abs(dy), abs(dx))
    out = []
    for image in images:
        padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        s = image.shape[-1]
        out.append(np.ascontiguousarray(padded[:, pad + dy : pad + dy + s, pad + dx : pad + dx + s]))
    return out


def unshift_maps(maps: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(N, S, S) maps of shifted copies -> the originals' frame (edge cells replicated)."""
    if dy == 0 and dx == 0:
        return maps
    pad = max(abs(dy), abs(dx))
    padded = F.pad(maps[:, None], (pad, pad, pad, pad), mode="replicate")[:, 0]
    s = maps.shape[-1]
    return padded[:, pad - dy : pad - dy + s, pad - dx : pad - dx + s]


@torch.inference_mode()
def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], list(DESIGNS), results_file=True).parse_args()
    torch.set_num_threads(2)
    config = create_config("cpu", seed=args.seed)
    size, sigma = config.image_size, config.smoothing_sigma
    bset = load_set(args.set, args.seed)

    def load(paths: list) -> list[np.ndarray]:
        return [image for _, image in load_images([(str(p), p) for p in paths], size).images]

    images = load(bset.train)
    train_idx, hold_idx = split_holdout(len(images), config)
    held_out = [images[i] for i in hold_idx]
    groups = {"good": held_out, "synthetic": selfcheck.make_synthetic_images(held_out, config.seed)}
    test_labels = test_masks = None
    if args.diagnostic:
        groups["test"] = load([t.path for t in bset.test])
        test_labels = np.array([t.label for t in bset.test])
        if bset.has_masks:
            test_masks = np.stack([load_mask(t.mask_path, size) if t.label else np.zeros((size, size), bool)
                                   for t in bset.test])
    backbone = backbone_module.create_feature_extractor(config.backbone, device="cpu")
    dev = torch.device("cpu")

    def features(imgs: list[np.ndarray]) -> dict[int, torch.Tensor]:
        return dict(zip(STRIDES, extract_features(backbone, imgs, dev)))

    started = time.perf_counter()
    bank = coreset_bank(patches_of(features([images[i] for i in train_idx]), STRIDES), args.seed)
    bank_seconds = time.perf_counter() - started
    print(f"{args.set} seed {args.seed}: {len(train_idx)} training images, {len(hold_idx)} held out, "
          f"bank {tuple(bank.shape)} in {bank_seconds:.0f} s", flush=True)
    shifts = sorted({s for name in args.designs for s in DESIGNS[name]})
    raw: dict[str, dict[tuple[int, int], torch.Tensor]] = {g: {} for g in groups}
    for group, imgs in groups.items():  # full-resolution unsmoothed maps per shift, in the original frame
        for dy, dx in shifts:
            levels = features(shift_images(imgs, dy, dx))
            n, parts = len(imgs), []
            for lo in range(0, n, 16):
                dist = nearest_distance(embed(levels, STRIDES, lo, lo + 16), bank)[:, None]
                parts.append(F.interpolate(dist, size=(size, size), mode="bilinear", align_corners=True)[:, 0])
            raw[group][(dy, dx)] = unshift_maps(torch.cat(parts), dy, dx)
    results = {}
    for name in args.designs:
        views = DESIGNS[name]
        started = time.perf_counter()

        def scorer(group: str, views=views) -> tuple[np.ndarray, np.ndarray]:
            mean = torch.stack([raw[group][v] for v in views]).mean(0)
            smoothed = gaussian_smooth(mean, sigma)
            return smoothed.numpy(), smoothed.flatten(1).amax(1).numpy()

        row = scorer_row(scorer, "good", "synthetic", "test" if args.diagnostic else None, test_labels, test_masks)
        row["views"] = len(views)
        add_row(results, name, row, started, width=24)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
