"""Could the leave-one-out self-check choose the patch feature's levels (8 + 16, or 8 + 16 + 32) with the search?

The thirteenth session found the stride-32 level set-dependent (magnetic tile gains, ELPV loses) and the held-out
self-check blind to it. The leave-one-out check (``fod_app.bank_search``: each training image and synthetic defects
cut from itself, scored against the other training images) chooses the search in the product. This probe runs it on
both level sets, with the product's defect images and image subset, tokens standardised per channel with the
training patches' statistics (as bank tokens are), and prints its AUROC per (levels, search); with ``--diagnostic``
also the test image AUROC of the same four scorers: the 10 % coreset global search and the positional search over
all training patches within one cell (labels read after the fact; they never choose).

    python bench/level_choice_probe.py --set magnetic_tile@16 --seed 0 --diagnostic \
        --out bench/results/level_choice_probe.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench.position_probe as position_probe  # noqa: E402
from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.level_probe import coreset_bank, embed, probe_features, score  # noqa: E402
from fod_app import bank_search, memory_bank, metrics  # noqa: E402

DESIGNS = ["8+16", "8+16+32"]


@torch.inference_mode()
def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], DESIGNS, results_file=True).parse_args()
    torch.set_num_threads(2)
    found = probe_features(args.set, args.seed, (8, 16, 32), args.diagnostic)
    n = next(iter(found.train.values())).shape[0]
    index = memory_bank.candidate_rows(n, args.seed, bank_search.MAX_CHOICE_IMAGES).numpy()  # the product's subset
    per_image = bank_search.DEFECTS_PER_IMAGE
    defects = found.extract(bank_search.defect_images([found.train_images[i] for i in index], args.seed, per_image))
    good = {stride: maps[torch.as_tensor(index)] for stride, maps in found.train.items()}
    size, sigma = found.config.image_size, found.config.smoothing_sigma
    results: dict[str, dict] = {}
    for name in args.designs:
        strides = tuple(int(s) for s in name.split("+"))
        train_tokens = embed(found.train, strides, 0, n)  # (N, H, W, D): every training patch
        patches = train_tokens.reshape(-1, train_tokens.shape[-1])
        mean, std = patches.mean(0), patches.std(0) + 1e-6
        tokens = (embed(good, strides, 0, len(index)) - mean) / std  # (n, H, W, D)
        n_good, height, width, dims = tokens.shape
        defect_tokens = (embed(defects, strides, 0, n_good * per_image) - mean) / std
        auroc = bank_search.leave_one_out_auroc(tokens.reshape(n_good, height * width, dims),
                                                defect_tokens.reshape(n_good, per_image, height * width, dims),
                                                (height, width), size, sigma)
        row = {f"loo_{search}": round(value, 4) for search, value in auroc.items()}
        if args.diagnostic:
            row["test_global"] = round(metrics.image_auroc(
                found.test_labels, score(found.test, strides, coreset_bank(patches, args.seed), size, sigma)[1]), 4)
            local = position_probe.local_distance(found.test, train_tokens, 1, strides)
            row["test_positional"] = round(metrics.image_auroc(
                found.test_labels, position_probe.post_process(local, size, sigma)[1]), 4)
        results[name] = row
        print(f"  {name:8s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
