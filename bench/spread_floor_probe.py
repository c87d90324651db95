"""Would a larger floor on the few-shot threshold's spread keep the design false-reject rate? Good images decide.

With 4-5 held-out good images (16-32 image sets) the log-normal's spread is estimated from 4-5 scores, and
``calibration.MIN_LOG_SPREAD`` (0.05) is its floor. This replays the threshold of stored few-shot runs with larger
floors (below ``ROBUST_FROM`` held-out images only) and measures it on **good images only**: the up to 100 good
training images of the full set that the run did not use (``unused_raw`` of ``bench/loo_calibration_probe.py``,
PatchCore scores from the same bank). With ``--compare`` files it also prints, for information, the false-reject and
miss rates on the stored test scores of the same runs (labels read after the fact; they choose nothing).

    cd bench/results && ../../.venv/bin/python ../spread_floor_probe.py loo_calibration_fewshot.json \
        --compare compare_fewshot_s0_paired.json compare_fewshot_s12_paired.json compare_fewshot32_s0.json \
        compare_bottle_s0_paired.json compare_elpv_bottle32_s0.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fod_app import calibration  # noqa: E402

FLOORS = (0.05, 0.06, 0.07, 0.08, 0.10, 0.12, 0.15)


def threshold(held_out: np.ndarray, quantile: float, floor: float) -> float:
    """Today's ``Calibration.from_scores`` threshold (origin 0: PatchCore distances), ``floor`` on the spread below
    ``ROBUST_FROM`` held-out images."""
    min_spread = floor if held_out.size < calibration.ROBUST_FROM else calibration.MIN_LOG_SPREAD
    return calibration.Calibration.from_scores(held_out, quantile, min_spread=min_spread).threshold


def set_mean(per_set: dict[str, list[float]]) -> float:
    return statistics.mean(statistics.mean(values) for values in per_set.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("loo_file", type=Path)
    parser.add_argument("--compare", nargs="*", type=Path, default=[])
    args = parser.parse_args()
    rows = json.loads(args.loo_file.read_text())
    tests = {(run["set"], run["seed"]): run for path in args.compare for run in json.loads(path.read_text())}
    print(f"{len(rows)} runs: " + ", ".join(f"{r['set']} s{r['seed']}" for r in rows))
    print("floor | unused good FRR (mean over sets) | test good FRR | test miss   (PatchCore; design FRR 0.010)")
    for floor in FLOORS:
        unused: dict[str, list[float]] = {}
        frr: dict[str, list[float]] = {}
        miss: dict[str, list[float]] = {}
        for row in rows:
            held = np.asarray(row["held_out_raw"], dtype=np.float64)
            t = threshold(held, 0.99, floor)
            unused.setdefault(row["set"], []).append(float(np.mean(np.asarray(row["unused_raw"]) >= t)))
            run = tests.get((row["set"], row["seed"]))
            if run is not None:
                labels = np.asarray(run["test_labels"])
                scores = np.asarray(run["patchcore"]["scores_units"]) * float(run["patchcore"]["threshold_raw"])
                frr.setdefault(row["set"], []).append(float(np.mean(scores[labels == 0] >= t)))
                miss.setdefault(row["set"], []).append(float(np.mean(scores[labels == 1] < t)))
        cells = [f"{set_mean(unused):.4f} (" + ", ".join(f"{k} {statistics.mean(v):.3f}" for k, v in unused.items())
                 + ")"]
        if frr:
            cells += [f"{set_mean(frr):.4f}", f"{set_mean(miss):.3f}"]
        print(f"{floor:.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
