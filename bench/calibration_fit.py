"""Does a log-normal or a normal fit suit FOD's held-out good scores? Offline, from ``bench/compare.py`` JSON.

    python bench/calibration_fit.py bench/results/compare_elpv_full_s0_fisher.json ...

Label-free part: Shapiro-Wilk p-values of the held-out good image scores (raw and log) of each run. Measured part
(test labels only measure): false-reject rate on test good images, miss rate on defective ones, and the share of
the self-check's synthetic defects caught, at the current log-normal prediction bound (``Calibration.from_scores``)
and at the same bound fitted to raw scores instead of log scores.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.stats import t as student_t

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fod_app.calibration import ROBUST_FROM, Calibration  # noqa: E402


def normal_bound(scores: np.ndarray, quantile: float) -> float:
    """The current rule's prediction bound, on raw scores (spread at least 5 % of the centre)."""
    n = scores.size
    if n < ROBUST_FROM:
        centre, spread = scores.mean(), scores.std(ddof=1)
        k = student_t.ppf(quantile, n - 1) * math.sqrt(1 + 1 / n)
    else:
        centre = np.median(scores)
        spread = stats.median_abs_deviation(scores, scale="normal")
        k = student_t.ppf(quantile, 0.37 * (n - 1)) * math.sqrt(1 + math.pi / (2 * n))
    return float(centre + k * max(spread, 0.05 * abs(centre)))


def rates(threshold: float, test: np.ndarray, labels: np.ndarray, synthetic: np.ndarray) -> str:
    """'FRR / miss / synthetic caught' at ``threshold`` (raw units)."""
    caught = f"{np.mean(synthetic >= threshold):.2f}" if synthetic.size else "–"
    return f"{np.mean(test[labels == 0] >= threshold):.3f} / {np.mean(test[labels == 1] < threshold):.3f} / {caught}"


def main() -> None:
    print("| set | detector | held-out | Shapiro p log / raw | log-normal: FRR / miss / synthetic caught "
          "| normal: FRR / miss / synthetic caught |")
    print("|---|---|---|---|---|---|")
    for name in sys.argv[1:]:
        for row in json.loads(Path(name).read_text()):
            labels = np.asarray(row["test_labels"])
            for who in ("fod", "patchcore"):
                result = row[who]
                held = np.asarray(result["holdout_scores_raw"], dtype=np.float64)
                test = np.asarray(result["scores_units"]) * result["threshold_raw"]
                synthetic = np.asarray(result.get("synthetic_scores_raw") or [], dtype=np.float64)

                lognormal = Calibration.from_scores(held, 0.99).threshold
                print(f"| {row['set']} | {who} | {held.size} | {stats.shapiro(np.log(held)).pvalue:.2f} / "
                      f"{stats.shapiro(held).pvalue:.2f} | {rates(lognormal, test, labels, synthetic)} | "
                      f"{rates(normal_bound(held, 0.99), test, labels, synthetic)} |")


if __name__ == "__main__":
    main()
