"""Would leave-one-out scores of the training images make a better few-shot threshold? A replay on stored runs.

With 16-32 good images the threshold rests on 4-5 held-out images. For a score that needs no training (PatchCore's
nearest-patch distance, which FOD keeps on most few-shot runs), every *training* image can also be scored as if it
were new: against the memory bank without the rows that came from that image (leave-one-out). This probe rebuilds,
for each stored ``bench/compare.py`` run, the benchmark's PatchCore exactly (same split, seed, coreset), scores each
training image leave-one-out, and recomputes the threshold with today's ``Calibration.from_scores`` from

* the held-out images alone (the rule in use),
* the held-out images plus the leave-one-out training images, and
* the held-out images alone, raised where more held-out + leave-one-out images reach it than the design rate
  plausibly gives (the held-out check of ``Calibration.from_scores``, on more images; it can only raise the threshold),

then measures both on the run's stored PatchCore test scores (labels only measure) and, label-free, on the full set's
unused good training images (few-shot sets). Prints a line per run and the means.

    python bench/loo_calibration_probe.py bench/results/compare_fewshot_s0_paired.json ... [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.datasets import load_set, parse_name  # noqa: E402
from bench.patchcore import PatchCore  # noqa: E402
from fod_app.backbone import create_feature_extractor  # noqa: E402
from fod_app.calibration import Calibration, held_out_check  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.data import load_images  # noqa: E402
from fod_app.training import split_holdout  # noqa: E402

BATCH = 16
UNUSED_GOOD = 100  # as bench/compare.py


@torch.inference_mode()
def leave_one_out_scores(patchcore: PatchCore, images: list[np.ndarray]) -> np.ndarray:
    """Image score of each training image (as fitted, in order) against the bank without its own rows."""
    return np.array([float(patchcore.score_batch(torch.as_tensor(image[None]),
                                                 patchcore.memory_bank[patchcore.bank_sources != i])[1][0])
                     for i, image in enumerate(images)])


def batch_scores(patchcore: PatchCore, images: list[np.ndarray]) -> np.ndarray:
    """PatchCore image scores (N,) of ``images``, in batches."""
    return np.concatenate([patchcore.score_batch(torch.as_tensor(np.stack(images[s : s + BATCH])))[1].numpy()
                           for s in range(0, len(images), BATCH)])


def rates(threshold: float, good: np.ndarray, defect: np.ndarray) -> tuple[float, float]:
    return float(np.mean(good >= threshold)), float(np.mean(defect < threshold))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for path in args.files:
        for run in json.loads(path.read_text()):
            if parse_name(run["set"])[1] is None:
                continue  # few-shot sets only: the full sets have 31-114 held-out images
            config = create_config(run["preset"], seed=run["seed"], **run["overrides"])
            bset = load_set(run["set"], run["seed"])
            images = [img for _, img in load_images(bset.train, config.image_size).images]
            train_idx, hold_idx = split_holdout(len(images), config)
            patchcore = PatchCore(create_feature_extractor(config.backbone, device="cpu"),
                                  run["patchcore"].get("coreset_ratio", 0.1), seed=run["seed"],
                                  smoothing_sigma=config.smoothing_sigma)
            fit_images = [images[i] for i in train_idx]
            patchcore.fit(fit_images)
            held = np.asarray(run["patchcore"]["holdout_scores_raw"])
            hold_scores = batch_scores(patchcore, [images[i] for i in hold_idx])
            same_bank = bool(np.allclose(np.sort(hold_scores), np.sort(held), rtol=1e-4))
            loo = leave_one_out_scores(patchcore, fit_images)
            quantile = 1.0 - float(run["design_frr"])
            now = Calibration.from_scores(held, quantile).threshold
            with_loo = Calibration.from_scores(np.r_[held, loo], quantile).threshold
            checked = held_out_check(now, np.r_[held, loo], quantile)
            labels = np.asarray(run["test_labels"])
            test = np.asarray(run["patchcore"]["scores_units"]) * float(run["patchcore"]["threshold_raw"])
            good, defect = test[labels == 0], test[labels == 1]
            base, _ = parse_name(run["set"])
            chosen = {str(p) for p in bset.train}
            unused = [p for p in load_set(base, run["seed"]).train if str(p) not in chosen]
            pick = np.random.default_rng(run["seed"]).choice(len(unused), min(UNUSED_GOOD, len(unused)), replace=False)
            unused_images = [img for _, img in load_images([unused[i] for i in sorted(int(i) for i in pick)],
                                                            config.image_size).images]
            unused_scores = batch_scores(patchcore, unused_images)
            row = {
                "set": run["set"], "seed": run["seed"], "n_held_out": len(held), "n_loo": len(loo),
                "bank_reproduced": same_bank,
                "held_out_mean": float(held.mean()), "loo_mean": float(loo.mean()),
                "threshold_held_out": now, "threshold_with_loo": with_loo,
                "threshold_checked": checked,
                "frr_miss_held_out": rates(now, good, defect), "frr_miss_with_loo": rates(with_loo, good, defect),
                "frr_miss_checked": rates(checked, good, defect),
                "frr_unused_held_out": float(np.mean(unused_scores >= now)),
                "frr_unused_with_loo": float(np.mean(unused_scores >= with_loo)),
                "frr_unused_checked": float(np.mean(unused_scores >= checked)),
                "held_out_raw": held.tolist(), "loo_raw": loo.tolist(), "unused_raw": unused_scores.tolist(),
            }
            rows.append(row)
            print(f"{row['set']:18s} s{row['seed']} bank ok {same_bank} held {held.mean():.3f} loo {loo.mean():.3f} "
                  f"thr {now:.3f} -> {with_loo:.3f}  FRR/miss {row['frr_miss_held_out'][0]:.3f}/"
                  f"{row['frr_miss_held_out'][1]:.2f} -> {row['frr_miss_with_loo'][0]:.3f}/"
                  f"{row['frr_miss_with_loo'][1]:.2f}  unused FRR {row['frr_unused_held_out']:.3f} -> "
                  f"{row['frr_unused_with_loo']:.3f}  checked thr {checked:.3f} "
                  f"FRR/miss {row['frr_miss_checked'][0]:.3f}/"
                  f"{row['frr_miss_checked'][1]:.2f} unused {row['frr_unused_checked']:.3f}", flush=True)
    for key in ("frr_miss_held_out", "frr_miss_with_loo", "frr_miss_checked"):
        print(f"mean {key}: FRR {np.mean([r[key][0] for r in rows]):.4f} miss {np.mean([r[key][1] for r in rows]):.3f}")
    for key in ("frr_unused_held_out", "frr_unused_with_loo", "frr_unused_checked"):
        print(f"mean {key}: {np.mean([r[key] for r in rows]):.4f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
