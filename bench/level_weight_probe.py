"""How much should each feature level weigh in a patch's distance? Self-check chooses.

The shipped patch feature concatenates EfficientNet-Lite0's 3x3-pooled stride-8 map (40 channels) with its stride-16
map (112 channels) upsampled to the stride-8 grid, so the Euclidean distance weighs each level by its channel count
and magnitude. This probe scales the stride-8 block by ``w`` before the benchmark's PatchCore (10 % coreset, nearest
distance, upsampling, smoothing, max), and also scores each level alone, standardised with the held-out good
images' own pixel statistics, then summed. For one benchmark set and seed, on training's own split: self-check AUROC
and, with ``--diagnostic``, test image / pixel AUROC (labels read after the fact; they never pick a design).

    python bench/level_weight_probe.py --set magnetic_tile@16 --seed 0 --diagnostic \
        --out bench/results/level_weight_probe.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.level_probe import add_row, coreset_bank, embed, patches_of, probe_features, scorer_row  # noqa: E402
from bench.position_probe import global_distance, post_process  # noqa: E402
from fod_app import bank_search, memory_bank, metrics  # noqa: E402

STRIDES = (8, 16)
DESIGNS = ["w 1 (shipped)", "w 0.5", "w 2", "w 3", "levels standardised, summed"]


def weighted(levels: dict[int, torch.Tensor], w8: float) -> dict[int, torch.Tensor]:
    return {8: levels[8] * w8, 16: levels[16]}


def leave_one_out_check(found, defects: dict[int, torch.Tensor], index: list[int], w8: float) -> float:
    """The product's leave-one-out self-check AUROC (``bank_search.leave_one_out_scores``, global search) of the
    patch feature with the stride-8 block scaled by ``w8``; ``defects`` are the features of
    ``bank_search.DEFECTS_PER_IMAGE`` defects cut from each of the fit images ``index``."""
    good = embed(weighted({s: f[index] for s, f in found.train.items()}, w8), STRIDES, 0, len(index))
    bad = embed(weighted(defects, w8), STRIDES, 0, next(iter(defects.values())).shape[0])
    n, h, w, d = good.shape
    labels, scores = bank_search.leave_one_out_scores(
        good.reshape(n, h * w, d), bad.reshape(n, -1, h * w, d), (h, w), found.config.image_size,
        found.config.smoothing_sigma)
    return float(metrics.image_auroc(labels, scores["global"]))


@torch.inference_mode()
def main() -> None:
    parser = probe_arguments(__doc__.split("\n")[0], DESIGNS, results_file=True)
    parser.add_argument("--leave-one-out", action="store_true", help="also the leave-one-out self-check")
    args = parser.parse_args()
    torch.set_num_threads(2)
    found = probe_features(args.set, args.seed, STRIDES, args.diagnostic)
    size, sigma = found.config.image_size, found.config.smoothing_sigma
    if args.leave_one_out:  # the product's subset and defects (``training.choose_search``)
        index = memory_bank.candidate_rows(len(found.train_images), found.config.seed,
                                           bank_search.MAX_CHOICE_IMAGES).tolist()
        defects = found.extract(bank_search.defect_images([found.train_images[i] for i in index], found.config.seed,
                                                          bank_search.DEFECTS_PER_IMAGE))
    results: dict[str, dict] = {}
    for name in args.designs:
        started = time.perf_counter()
        if name.startswith("w "):
            w8 = float(name.split()[1])
            bank = coreset_bank(patches_of(weighted(found.train, w8), STRIDES), args.seed)

            def scorer(levels, w8=w8, bank=bank):
                return post_process(global_distance(weighted(levels, w8), bank), size, sigma)
        else:
            banks = {s: coreset_bank(patches_of(found.train, (s,)), args.seed) for s in STRIDES}
            # per level: mean and sd of the held-out good images' distances (label-free: good images only)
            stats = {}
            for s in STRIDES:
                held = global_distance(found.held_out, banks[s], strides=(s,))
                stats[s] = (held.mean(), held.std())

            def scorer(levels, banks=banks, stats=stats):
                total = sum((global_distance(levels, banks[s], strides=(s,)) - stats[s][0]) / stats[s][1]
                            for s in STRIDES)
                return post_process(total, size, sigma)
        row = scorer_row(scorer, found.held_out, found.synthetic, found.test, found.test_labels, found.test_masks)
        if args.leave_one_out and name.startswith("w "):
            row["self_check_leave_one_out"] = leave_one_out_check(found, defects, index, w8)
        add_row(results, name, row, started, 28)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
