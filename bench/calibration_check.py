"""The calibration rule on real sets: false-reject and miss rates of the threshold, old rule vs current rule.

    python bench/calibration_check.py --sets mvtec_bottle@16 elpv_mono@16 ... --seeds 0 1 2 --out FILE.json

The detector is the reference PatchCore (``bench/patchcore.py``: no training, so many sets x seeds are cheap),
built on the same split as FOD (``split_holdout`` of the ``cpu`` preset). The threshold comes from the held-out good
images only, with the current rule (``Calibration.from_scores``) and the rule used before 2026-11-30 (log-normal
mean/std 99 % quantile, never below 0.9 x the largest held-out score). The test set only measures: false-reject rate
on its good images and miss rate on its defective ones, next to the design rate 1 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def legacy_threshold(scores, quantile: float = 0.99) -> float:
    """The rule before 2026-11-30, kept here only to compare."""
    from statistics import NormalDist

    import numpy as np

    logs = np.log(np.sort(np.asarray(scores, dtype=np.float64)))
    z = NormalDist().inv_cdf(quantile)
    fitted = float(np.exp(logs.mean() + z * max(float(logs.std(ddof=1)), 0.05)))
    return max(fitted, 0.9 * float(np.exp(logs[-1])))


def check(set_name: str, seed: int, coreset_ratio: float) -> dict:
    import numpy as np
    import torch

    from bench.compare import BATCH, threshold_rates
    from bench.datasets import load_set
    from bench.patchcore import PatchCore
    from fod_app.backbone import create_feature_extractor
    from fod_app.calibration import Calibration
    from fod_app.config import create_config
    from fod_app.data import load_images
    from fod_app.training import split_holdout

    config = create_config("cpu", seed=seed)
    bset = load_set(set_name, seed)
    images = [img for _, img in load_images(bset.train, config.image_size).images]
    train_idx, hold_idx = split_holdout(len(images), config)
    patchcore = PatchCore(create_feature_extractor(config.backbone, weights=None, device=torch.device("cpu")),
                          coreset_ratio, seed=seed, smoothing_sigma=config.smoothing_sigma)
    patchcore.fit([images[i] for i in train_idx])

    def scores(batch_images: list) -> np.ndarray:
        return np.concatenate([
            patchcore.score_batch(torch.as_tensor(np.stack(batch_images[s : s + BATCH])))[1].cpu().numpy()
            for s in range(0, len(batch_images), BATCH)
        ])

    hold = scores([images[i] for i in hold_idx])
    test = load_images([t.path for t in bset.test], config.image_size)
    labels = np.array([t.label for t in bset.test])
    test_scores = scores([img for _, img in test.images])
    current = Calibration.from_scores(hold, config.threshold_quantile).threshold
    old = legacy_threshold(hold, config.threshold_quantile)
    return {
        "set": set_name, "seed": seed, "n_holdout": len(hold_idx), "design_frr": 1 - config.threshold_quantile,
        "current": threshold_rates(labels, test_scores, current),
        "old": threshold_rates(labels, test_scores, old),
        "holdout_scores": hold.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    print("| set | seed | held-out | FRR old | FRR current | miss old | miss current |")
    print("|---|---|---|---|---|---|---|")
    for set_name in args.sets:
        for seed in args.seeds:
            row = check(set_name, seed, args.coreset_ratio)
            rows.append(row)
            o, c = row["old"], row["current"]
            print(f"| {set_name} | {seed} | {row['n_holdout']} | {o['frr_test_good']:.3f} | {c['frr_test_good']:.3f} "
                  f"| {o['miss_rate']:.3f} | {c['miss_rate']:.3f} |", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=1))
    for rule in ("old", "current"):
        frr = [r[rule]["frr_test_good"] for r in rows]
        miss = [r[rule]["miss_rate"] for r in rows]
        print(f"mean over {len(rows)} runs, {rule} rule: FRR {statistics.mean(frr):.3f} (design 0.010), "
              f"miss {statistics.mean(miss):.3f}")


if __name__ == "__main__":
    main()
