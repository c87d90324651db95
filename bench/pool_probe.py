"""How much neighbourhood should a patch feature average? PatchCore's 3x3 next to 1x1, 5x5 and 7x7. Self-check chooses.

The backbone averages each feature level over a 3x3 neighbourhood (stride 1, zero padding counted) before patches
are compared: PatchCore's ``p = 3`` (Roth et al. 2022; ``patchsize=3`` in the authors' code), kept by the issue's
reference peer. This probe takes the same levels unpooled and averages them over other neighbourhoods, then
builds the benchmark's PatchCore (strides 8 + 16 on the stride-8 grid, 10 % coreset, nearest distance, upsampling,
smoothing, max). For one benchmark set and seed, on training's own split: self-check AUROC and, with
``--diagnostic``, test image / pixel AUROC (labels read after the fact; they never pick a design).

    python bench/pool_probe.py --set magnetic_tile@16 --seed 0 --diagnostic --out bench/results/pool_probe.json
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.level_probe import add_row, coreset_bank, patches_of, probe_features, scorer_row  # noqa: E402
from bench.position_probe import global_distance, post_process  # noqa: E402
from fod_app import backbone as backbone_module  # noqa: E402

STRIDES = (8, 16)
DESIGNS = {"3x3 (shipped)": 3, "1x1": 1, "5x5": 5, "7x7": 7}


def pool(levels: dict[int, torch.Tensor], kernel: int) -> dict[int, torch.Tensor]:
    """Each unpooled level averaged over ``kernel`` x ``kernel`` (stride 1, zero padding counted, as shipped)."""
    return {s: F.avg_pool2d(f, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
            for s, f in levels.items()}


@torch.inference_mode()
def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], list(DESIGNS), results_file=True).parse_args()
    torch.set_num_threads(2)
    # the backbone's own 3x3 average becomes the identity, so that the probe pools the raw levels itself
    backbone_module.F = types.SimpleNamespace(avg_pool2d=lambda level, **_: level)
    found = probe_features(args.set, args.seed, STRIDES, args.diagnostic)
    size, sigma = found.config.image_size, found.config.smoothing_sigma
    results: dict[str, dict] = {}
    for name in args.designs:
        started = time.perf_counter()
        kernel = DESIGNS[name]
        bank = coreset_bank(patches_of(pool(found.train, kernel), STRIDES), args.seed)

        def scorer(levels, kernel=kernel, bank=bank):
            return post_process(global_distance(pool(levels, kernel), bank), size, sigma)

        row = scorer_row(scorer, found.held_out, found.synthetic, found.test, found.test_labels, found.test_masks)
        add_row(results, name, row, started, 14)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
