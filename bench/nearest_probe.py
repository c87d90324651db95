"""The model's own nearest-good-patch branch under bank designs, next to the reference PatchCore: self-check chooses.

For one benchmark set and seed (training's split and synthetic defects, ``bench/bank_probe.probe_data``), each design
builds an untrained ``FODModel`` with its bank exactly as training does (``fod_app.training.patch_banks``) and scores
the nearest branch alone as the self-check does (per-level z-score with held-out good statistics, upsample, level
mean, smoothing, max). The branch does not depend on FOD's training, so this is the shipped branch. Printed per
design: the self-check AUROC (synthetic defects vs held-out good), and with ``--diagnostic`` the test image and pixel
AUROC (labels read after the fact; they never pick a design). ``bench/patchcore.py`` on the same split is the first
line.

    python bench/nearest_probe.py --set elpv_mono@16 --seed 1 --diagnostic --out bench/results/nearest_probe.json
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bank_probe import ProbeData, append_results, probe_arguments, probe_data  # noqa: E402
from bench.patchcore import PatchCore  # noqa: E402
from fod_app import metrics  # noqa: E402
from fod_app.model import create_model, to_tokens  # noqa: E402
from fod_app.scoring import image_maps  # noqa: E402
from fod_app.training import channel_statistics, patch_banks  # noqa: E402

#: name -> (bank_features, standardised features, bank rows per level (None: 10 % of the training tokens), levels
#: scored). "patchcore" is the ``cpu`` preset since 2026-12-01 (PatchCore's raw patch feature on the stride-8 grid);
#: "joint" designs bank both levels' multi-scale features, standardised or raw.
DESIGNS = {
    "joint: standardised, both levels, 8192 (shipped until 2026-12-01)": ("joint", True, 8192, (0, 1)),
    "joint: standardised, stride 8 only, 8192": ("joint", True, 8192, (0,)),
    "joint: standardised, stride 16 only, 8192": ("joint", True, 8192, (1,)),
    "joint: raw, both levels, 8192": ("joint", False, 8192, (0, 1)),
    "joint: raw, stride 8 only, 8192": ("joint", False, 8192, (0,)),
    "joint: standardised, both levels, 10 %": ("joint", True, None, (0, 1)),
    "patchcore: raw, stride 8 only, 10 % (shipped)": ("patchcore", True, None, (0,)),
}
BATCH = 16


def auroc_lines(data: ProbeData, score) -> dict[str, float | None]:
    """Self-check AUROC, and (with test features) test image/pixel AUROC, of ``score``: features -> (maps, scores)."""
    good, synthetic = score(data.held_out)[1], score(data.synthetic)[1]
    result: dict[str, float | None] = {"self_check": metrics.image_auroc(
        np.r_[np.zeros(len(good)), np.ones(len(synthetic))], np.r_[good, synthetic])}
    if data.test is not None:
        maps, scores = score(data.test)
        result["test_image"] = metrics.image_auroc(data.test_labels, scores)
        result["test_pixel"] = None if data.test_masks is None else metrics.pixel_auroc(data.test_masks, maps)
    return result


def design_scores(data: ProbeData, bank_features: str, standardise: bool, bank_rows: int | None,
                  levels: tuple[int, ...]):
    """The nearest branch of an untrained model with this bank: features -> (maps (N, S, S), image scores (N,))."""
    n_tokens = data.train[0].shape[0] * data.train[0].shape[2] * data.train[0].shape[3]
    config = dataclasses.replace(data.config, bank_features=bank_features, normalize_features=standardise,
                                 patch_bank_size=bank_rows or max(1, n_tokens // 10), patch_bank_ratio=0.0)
    model = create_model(config, data.backbone.channels, data.backbone.strides)
    model.set_reference_features([to_tokens(f).mean(0) for f in data.train],
                                 [channel_statistics(f) for f in data.train] if standardise else None)
    model.set_patch_banks(patch_banks(model, data.train, config))

    @torch.inference_mode()
    def distances(features: list[torch.Tensor]) -> list[torch.Tensor | None]:
        parts = [model([f[s : s + BATCH] for f in features], False, False, True, with_reconstruction=False)
                 for s in range(0, features[0].shape[0], BATCH)]
        return [None if parts[0][level].nearest is None else torch.cat([p[level].nearest for p in parts])
                for level in range(len(model.levels))]

    good = distances(data.held_out)
    stats = [None if d is None else (d.mean(), d.std()) for d in good]

    def score(features: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        values = [(d - stats[i][0]) / stats[i][1] for i, d in enumerate(distances(features)) if i in levels]
        maps, scores = image_maps(values, [model.grids[i] for i in levels], config)
        return maps.numpy(), scores.numpy()

    return score


def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], list(DESIGNS), results_file=True).parse_args()
    torch.set_num_threads(2)
    data = probe_data(args.set, args.seed, args.diagnostic)
    print(f"{args.set} seed {args.seed}: {len(data.train_idx)} training images, {len(data.hold_idx)} held out",
          flush=True)
    results = {}
    patchcore = PatchCore(data.backbone, 0.1, seed=args.seed, smoothing_sigma=data.config.smoothing_sigma)
    patchcore.fit([data.images[i] for i in data.train_idx])
    held = [data.images[i] for i in data.hold_idx]

    def patchcore_score(features: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        # PatchCore embeds images itself: map the feature list back to its images
        images = {id(data.held_out): held, id(data.synthetic): data.synthetic_images,
                  id(data.test): data.test_images}[id(features)]
        parts = [patchcore.score_batch(torch.as_tensor(np.stack(images[s : s + BATCH])))
                 for s in range(0, len(images), BATCH)]
        return torch.cat([p[0] for p in parts]).numpy(), torch.cat([p[1] for p in parts]).numpy()

    results["PatchCore (bench/patchcore.py, 10 % coreset)"] = auroc_lines(data, patchcore_score)
    for name in args.designs:
        started = time.perf_counter()
        results[name] = auroc_lines(data, design_scores(data, *DESIGNS[name]))
        results[name]["seconds"] = round(time.perf_counter() - started, 1)
    for name, row in results.items():
        print(f"  {name:45s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if v is not None), flush=True)
    append_results(args.out, args.set, args.seed, results)


if __name__ == "__main__":
    main()
