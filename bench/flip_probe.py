"""Does a bank of flipped good patches help, and can the good images alone tell when flips are safe?

The nearest-good-patch branch (and the reference PatchCore) keeps a coreset of the training images' patch features.
With 12-27 training images a test good part often has no close patch in it; flipped copies of the training images
multiply what the bank has seen — but only where flipping a good part gives a good part (textures, symmetric
parts), never where orientation is part of "good" (a connector, a printed label).

For one benchmark set and seed, on training's own split, this probe builds the benchmark's PatchCore (strides 8 and
16, 3x3 pool, 10 % greedy coreset capped like the product's bank at 8192 rows, nearest distance, smoothing, max) from
the training images alone and with their flipped copies, and prints:

- the self-check AUROC of each bank (the synthetic defects of ``fod_app.selfcheck`` on the held-out good images);
- the **orientation check** (label-free): every training image and its three flips, each scored against the plain bank
  *without that image's own patches* (leave one out). If flipped good parts look as familiar as the parts themselves,
  the flipped/plain score ratios centre on 1; if orientation matters they sit above it. Printed: the median ratio and
  the share of pairs where the flip scores higher;
- with ``--diagnostic``, test image / pixel AUROC (labels read after the fact, never used to choose).

    python bench/flip_probe.py --set magnetic_tile@16 --seed 0 --diagnostic --out bench/results/flip_probe.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import append_results, probe_arguments, probe_data  # noqa: E402
from bench.level_probe import add_row, bank_row, coreset_bank, patches_of, score  # noqa: E402
from fod_app.training import FLIPS, extract_features  # noqa: E402

STRIDES = (8, 16)
BANK_CAP = 8192  # the product's ``patch_bank_size``
#: name -> which flips of the training images join the bank (indices into ``fod_app.training.FLIPS``).
DESIGNS = {"no flips (shipped)": (), "horizontal": (0,), "horizontal + vertical + both": (0, 1, 2)}


def levels_of(features: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    return dict(zip(STRIDES, features))


@torch.inference_mode()
def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], list(DESIGNS), results_file=True).parse_args()
    torch.set_num_threads(2)
    data = probe_data(args.set, args.seed, args.diagnostic)
    config, dev = data.config, torch.device("cpu")
    train_images = [data.images[i] for i in data.train_idx]
    flipped = [extract_features(data.backbone, [np.ascontiguousarray(f(a)) for a in train_images], dev)
               for f in FLIPS]
    plain = patches_of(levels_of(data.train), STRIDES)
    flip_patches = [patches_of(levels_of(f), STRIDES) for f in flipped]
    size, sigma = config.image_size, config.smoothing_sigma
    print(f"{args.set} seed {args.seed}: {len(train_images)} training images, {len(data.hold_idx)} held out, "
          f"{len(data.synthetic_images)} synthetic defects", flush=True)

    # Orientation check: leave-one-out plain banks (coreset of the other images' patches), each image vs its flips.
    per_image = plain.shape[0] // len(train_images)
    ratios = []
    started = time.perf_counter()
    train_levels = levels_of(data.train)
    for i in range(len(train_images)):
        keep = torch.ones(plain.shape[0], dtype=torch.bool)
        keep[i * per_image:(i + 1) * per_image] = False
        bank = coreset_bank(plain[keep], args.seed, BANK_CAP)
        own = score({s: f[i:i + 1] for s, f in train_levels.items()}, STRIDES, bank, size, sigma)[1][0]
        for f in flipped:
            ratios.append(score({s: x[i:i + 1] for s, x in levels_of(f).items()}, STRIDES, bank, size, sigma)[1][0]
                          / own)
    ratios = np.array(ratios)
    orientation = {"median_flip_ratio": float(np.median(ratios)), "share_flip_higher": float(np.mean(ratios > 1)),
                   "seconds": round(time.perf_counter() - started, 1)}
    print(f"  orientation check: median flipped/plain score {orientation['median_flip_ratio']:.3f}, "
          f"flip higher in {orientation['share_flip_higher']:.2f} of {len(ratios)} pairs", flush=True)

    results: dict[str, dict] = {"orientation check": orientation}
    for name in args.designs:
        started = time.perf_counter()
        bank = coreset_bank(torch.cat([plain] + [flip_patches[k] for k in DESIGNS[name]]), args.seed, BANK_CAP)
        row = bank_row(bank, STRIDES, levels_of(data.held_out), levels_of(data.synthetic), config,
                       None if data.test is None else levels_of(data.test), data.test_labels, data.test_masks)
        row["bank_rows"] = int(bank.shape[0])
        add_row(results, name, row, started, 30)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
