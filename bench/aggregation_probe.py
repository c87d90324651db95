"""Could the peer's own patch score give more? PatchCore's image score under other aggregations, and other bank sizes.

FOD keeps PatchCore's patch score (the ``nearest`` branch) on most runs, so what lifts PatchCore lifts FOD. This
probe builds the benchmark's reference PatchCore (``bench/patchcore.py``) with a given coreset ratio and reports the
test image AUROC of several image scores made from the same smoothed map: the max (what both methods use), the mean
of the top-k pixels, the image mean, and the max minus the image's median. Test labels only measure; nothing here is
chosen from them (BENCHMARKS.md "Twenty-sixth session").

    .venv/bin/python bench/aggregation_probe.py --sets elpv_mono@16 magnetic_tile@16 --seeds 0 1 --coreset-ratio 0.1 \
        --out bench/results/aggregation_probe_r0.1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.datasets import load_set  # noqa: E402
from bench.patchcore import PatchCore  # noqa: E402
from fod_app.backbone import create_feature_extractor  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.data import load_images  # noqa: E402
from fod_app.metrics import image_auroc  # noqa: E402
from fod_app.training import split_holdout  # noqa: E402

#: Top-k pixel means tried (of 256 x 256 = 65 536 pixels); k = 1 is the max.
TOP_K = (1, 16, 64, 256, 1024, 4096)
BATCH = 32


def aggregations(maps: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, S, S) smoothed maps -> name -> (B,) image scores."""
    flat = maps.flatten(1)
    ranked = flat.sort(dim=1, descending=True).values
    scores = {f"top{k}": ranked[:, :k].mean(1) for k in TOP_K}
    scores["mean"] = flat.mean(1)
    scores["max_minus_median"] = ranked[:, 0] - flat.median(dim=1).values
    return scores


def run(set_name: str, seed: int, coreset_ratio: float) -> dict[str, float]:
    """Test image AUROC of every aggregation for one set and seed (PatchCore fitted on FOD's training split)."""
    config = create_config("cpu", seed=seed)
    bset = load_set(set_name, seed)
    images = [img for _, img in load_images(bset.train, config.image_size).images]
    fit_idx, _ = split_holdout(len(images), config)
    patchcore = PatchCore(create_feature_extractor(config.backbone, weights=None), coreset_ratio, seed=seed,
                          smoothing_sigma=config.smoothing_sigma).fit([images[i] for i in fit_idx])
    labels: list[int] = []
    scores: dict[str, list[float]] = {}
    for start in range(0, len(bset.test), BATCH):
        chunk = bset.test[start : start + BATCH]
        loaded = load_images([item.path for item in chunk], config.image_size)
        maps, _ = patchcore.score_batch(torch.as_tensor(np.stack([img for _, img in loaded.images])))
        for name, values in aggregations(maps).items():
            scores.setdefault(name, []).extend(values.tolist())
        labels.extend(item.label for item in chunk)
    return {name: round(float(image_auroc(np.array(labels), np.array(values))), 4) for name, values in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for set_name in args.sets:
        for seed in args.seeds:
            started = time.perf_counter()
            results[f"{set_name} seed {seed}"] = run(set_name, seed, args.coreset_ratio)
            print(set_name, seed, results[f"{set_name} seed {seed}"], f"{time.perf_counter() - started:.0f} s",
                  flush=True)
    args.out.write_text(json.dumps({"coreset_ratio": args.coreset_ratio, "command": " ".join(sys.argv),
                                    "image_auroc": results}, indent=1))


if __name__ == "__main__":
    main()
