"""Replay the current threshold rule on stored benchmark runs: false-reject and miss rates, stored vs now.

    python bench/threshold_replay.py bench/results/compare_*.json

``bench/compare.py`` stores, per run and for FOD and PatchCore, the raw scores of the held-out good images (which set
the threshold), the threshold and every test score in threshold units. This script recomputes each threshold from the
held-out scores alone with today's ``Calibration.from_scores`` (same quantile, same score origin) and measures both
thresholds on the stored test scores. The test labels only measure; nothing is fitted to them. A run is one (set,
seed); a later file's run replaces an earlier one's (as in ``nine_sets.py``). Per set: the mean over its runs; last
line: the mean over sets. ``--held-out-floor`` replays a variant rule instead of today's (``replayed_threshold``).
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

from fod_app.calibration import Calibration, held_out_quantile_point  # noqa: E402

METHODS = ("fod", "patchcore")


def load_runs(paths: list[Path]) -> dict[tuple[str, int], dict]:
    """Stored ``bench/compare.py`` runs by (set, seed); a later file's run replaces an earlier one's."""
    runs: dict[tuple[str, int], dict] = {}
    for path in paths:
        for run in json.loads(Path(path).read_text()):
            runs[(run["set"], run["seed"])] = run
    return runs


def held_out_scores(run: dict, method: str) -> np.ndarray:
    """One run's stored raw scores of the held-out good images that set ``method``'s threshold."""
    return np.asarray(run[method]["holdout_scores_raw"], dtype=np.float64)


def replayed_threshold(run: dict, method: str, held_out_floor: bool = False, tail_fit: bool = True,
                       scores: np.ndarray | None = None) -> float:
    """Today's threshold (raw units) from one run's stored held-out good scores, quantile and score origin.

    ``held_out_floor`` (a variant, not the product's rule): never below the held-out images' own empirical quantile
    (``calibration.held_out_quantile_point``), even where the log-normal fit passes the held-out check.
    ``tail_fit=False``: the rule before 2026-12-04. ``scores``: other held-out scores than the stored ones (e.g.
    all but one, ``threshold_loo.py``)."""
    data = run[method]
    held_out = held_out_scores(run, method) if scores is None else scores
    quantile = 1.0 - float(run.get("design_frr", 0.01))
    threshold = Calibration.from_scores(held_out, quantile, origin=float(data.get("score_origin") or 0.0),
                                        tail_fit=tail_fit).threshold
    if held_out_floor:
        threshold = max(threshold, held_out_quantile_point(held_out, quantile))
    return threshold


def replayed_thresholds(run: dict) -> tuple[float, ...]:
    """``replayed_threshold`` for each of ``METHODS``."""
    return tuple(replayed_threshold(run, method) for method in METHODS)


def replay(run: dict, method: str, held_out_floor: bool = False, tail_fit: bool = True) -> dict[str, float]:
    """Stored and replayed FRR on test good images / miss rate on defects, and held-out exceedances, of one run."""
    data = run[method]
    stored = float(data["threshold_raw"])
    labels = np.asarray(run["test_labels"])
    scores = np.asarray(data["scores_units"], dtype=np.float64) * stored
    held_out = held_out_scores(run, method)
    now = replayed_threshold(run, method, held_out_floor, tail_fit)
    good, defect = scores[labels == 0], scores[labels == 1]
    return {
        "frr_stored": float(np.mean(good >= stored)), "frr_now": float(np.mean(good >= now)),
        "miss_stored": float(np.mean(defect < stored)), "miss_now": float(np.mean(defect < now)),
        "held_out_above_stored": float(np.mean(held_out >= stored)),
        "held_out_above_now": float(np.mean(held_out >= now)),
        "threshold_ratio": now / stored,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--held-out-floor", action="store_true",
                        help="replay a variant: the threshold never below the held-out images' own quantile")
    args = parser.parse_args()
    runs = load_runs(args.files)
    per_set: dict[str, dict[str, list[dict[str, float]]]] = {}
    for (name, _seed), run in sorted(runs.items()):
        for method in METHODS:
            per_set.setdefault(name, {m: [] for m in METHODS})[method].append(replay(run, method, args.held_out_floor))
    keys = ("held_out_above_stored", "held_out_above_now", "frr_stored", "frr_now", "miss_stored", "miss_now")
    print("set | runs | " + " | ".join(f"{m}: held-out above (stored/now), FRR (stored/now), miss (stored/now)"
                                       for m in METHODS))
    means: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in METHODS}
    for name, runs in per_set.items():
        cells = []
        for method in METHODS:
            mean = {k: statistics.mean(r[k] for r in runs[method]) for k in keys}
            for k in keys:
                means[method][k].append(mean[k])
            ratio = max(r["threshold_ratio"] for r in runs[method])
            cells.append(f"{mean['held_out_above_stored']:.3f}/{mean['held_out_above_now']:.3f}, "
                         f"{mean['frr_stored']:.3f}/{mean['frr_now']:.3f}, "
                         f"{mean['miss_stored']:.2f}/{mean['miss_now']:.2f} (threshold x{ratio:.3f} at most)")
        print(f"{name} | {len(runs['fod'])} | " + " | ".join(cells))
    def mean_of(method: str, key: str) -> float:
        return statistics.mean(means[method][key])

    print(f"mean over {len(per_set)} sets | | " + " | ".join(
        f"{mean_of(m, 'held_out_above_stored'):.3f}/{mean_of(m, 'held_out_above_now'):.3f}, "
        f"{mean_of(m, 'frr_stored'):.4f}/{mean_of(m, 'frr_now'):.4f}, "
        f"{mean_of(m, 'miss_stored'):.3f}/{mean_of(m, 'miss_now'):.3f}" for m in METHODS))


if __name__ == "__main__":
    main()
