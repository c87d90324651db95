"""Does evening out each photo's brightness and contrast help PatchCore's nearest distance? Self-check chooses.

Parts on a line are photographed under light that drifts; magnetic-tile crops differ in exposure. This probe
normalises every loaded image (training, held-out, test alike; the self-check's synthetic defects are cut from the
normalised held-out images) to the same mean and spread of its grey level before the backbone, then builds the
benchmark's PatchCore (strides 8 + 16 on the stride-8 grid, 10 % coreset, nearest distance, upsampling, smoothing,
max). ``..., before the backbone``: the same normalisation applied to each image just before feature extraction, so
that the self-check's synthetic defects are cut from the photos as taken and normalised with them, as a defect on a
part would be (the other designs normalise at loading, and cut the defects from normalised images). For one
benchmark set and seed, on training's own split: self-check AUROC and, with ``--diagnostic``, test
image / pixel AUROC (labels read after the fact; they never pick a design).

    python bench/light_probe.py --set magnetic_tile@16 --seed 0 --diagnostic --out bench/results/light_probe.json

``--search "local r1"`` scores with the nearest good patch searched within one grid cell of the patch's own place
(``bench/position_probe.py``; the product's positional search) instead of PatchCore's global search.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import level_probe  # noqa: E402
from bench.bank_probe import append_results, probe_arguments  # noqa: E402
from bench.level_probe import add_row, coreset_bank, patches_of, probe_features, scorer_row  # noqa: E402
from bench.position_probe import DESIGNS as SEARCHES  # noqa: E402
from bench.position_probe import global_distance, make_scorer, post_process  # noqa: E402

STRIDES = (8, 16)


class Light(NamedTuple):
    """One design: the grey level's target (mean, sd; sd None: spread kept; None: the image as loaded), applied to
    every image at loading or, ``before_backbone``, just before feature extraction."""

    target: tuple[float, float | None] | None
    before_backbone: bool = False


DESIGNS = {"as loaded (shipped)": Light(None), "grey mean 0.5, sd 0.2": Light((0.5, 0.2)),
           "grey mean 0.5, spread kept": Light((0.5, None)),
           "grey mean 0.5, sd 0.2, before the backbone": Light((0.5, 0.2), before_backbone=True)}


def normaliser(target: tuple[float, float | None]):
    """An image transform for ``probe_features``: (3, S, S) in [0, 1] -> the same with the grey level's mean (and
    spread, unless None) moved to ``target``, every channel by the same gain and offset (colour ratios kept)."""
    mean_to, sd_to = target

    def normalise(image: np.ndarray, _path: str) -> np.ndarray:
        grey = image.mean(0)
        gain = 1.0 if sd_to is None else sd_to / max(float(grey.std()), 1e-3)
        return np.clip((image - grey.mean()) * gain + mean_to, 0.0, 1.0).astype(np.float32)
    return normalise


@torch.inference_mode()
def main() -> None:
    parser = probe_arguments(__doc__.split("\n")[0], list(DESIGNS), results_file=True)
    parser.add_argument("--search", choices=["global", "local r1"], default="global")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict[str, dict] = {}
    for name in args.designs:
        started = time.perf_counter()
        design = DESIGNS[name]
        normalise = None if design.target is None else normaliser(design.target)
        extract = level_probe.extract_features
        if normalise is not None and design.before_backbone:
            level_probe.extract_features = lambda backbone, images, device, extract=extract, normalise=normalise: \
                extract(backbone, [normalise(image, "") for image in images], device)
        try:
            found = probe_features(args.set, args.seed, STRIDES, args.diagnostic,
                                   None if design.before_backbone else normalise)
        finally:
            level_probe.extract_features = extract
        size, sigma = found.config.image_size, found.config.smoothing_sigma
        if args.search == "global":
            bank = coreset_bank(patches_of(found.train, STRIDES), args.seed)

            def scorer(levels, bank=bank, size=size, sigma=sigma):
                return post_process(global_distance(levels, bank), size, sigma)
        else:
            scorer = make_scorer(SEARCHES[args.search], found.train, found.config, args.seed)

        row = scorer_row(scorer, found.held_out, found.synthetic, found.test, found.test_labels, found.test_masks)
        add_row(results, name, row, started, 28)
    append_results(args.out, args.set if args.search == "global" else f"{args.set} {args.search}", args.seed, results)


if __name__ == "__main__":
    main()
