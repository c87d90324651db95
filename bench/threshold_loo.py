"""How often a good image reaches the threshold fitted to the *other* held-out good images: the threshold rule's
false-reject rate, measured label-free, leave-one-out, on stored ``bench/compare.py`` runs.

    python bench/threshold_loo.py bench/results/a.json bench/results/b.json ...

For every run with at least ``ROBUST_FROM`` held-out good images (the full sets: 31, 66 or 114), for FOD and the
PatchCore peer: each held-out image in turn is left out, the threshold is fitted to the others
(``Calibration.from_scores``, the run's quantile and score origin) and the left-out image is checked against it.
The held-out images are good images from the training folder, never trained on, scored like a new part, so the
pooled share of left-out images at or above their threshold estimates the rule's false-reject rate without any
label. Both rules are replayed: the tail fit (``tail_fit=True``, since 2026-12-04) and the rule before it.

Then, as a measurement only (test labels do not choose here), the same two rules' thresholds from all held-out images
on the stored test scores: false rejects of test good images and misses of defective ones, per set and on the mean
over sets (runs with fewer held-out images are unchanged by the tail fit and are in the mean as they are). A run is
one (set, seed); a later file's run replaces an earlier one's (as in ``nine_sets.py``).

    python bench/threshold_loo.py --candidates FILES...

replays, leave-one-out only, the fourteen rules the tail fit was chosen from (``CANDIDATES``; 2026-12-04).

    python bench/threshold_loo.py --simulate

instead draws held-out scores from known distributions (log-normal, and three skewed in log as real held-out scores
are) and prints each rule's exact false-reject rate on fresh good images, averaged over 300 draws per size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from threshold_replay import METHODS, held_out_scores, load_runs, replay, replayed_threshold  # noqa: E402

from fod_app.calibration import ROBUST_FROM, Calibration, robust_k  # noqa: E402

RULES = {"before": False, "tail fit": True}


def _qq(logs: np.ndarray, share: float, minimum: int, inflate: bool, quantile: float) -> float:
    """A Theil-Sen line through the top ``share`` (at least ``minimum``) of the log scores' normal QQ plot, read at
    the plain normal quantile or (``inflate``) at ``log_fit``'s robust ``k``."""
    from scipy import stats

    n = logs.size
    positions = stats.norm.ppf((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    top = max(minimum, round(share * n))
    slope, intercept, _, _ = stats.theilslopes(logs[-top:], positions[-top:])
    z = robust_k(n, quantile) if inflate else stats.norm.ppf(quantile)
    return float(intercept + slope * z)


def _gpd(logs: np.ndarray, share: float, shape_cap: float, quantile: float) -> float:
    """Peaks over the top ``share`` of the log scores: a generalised Pareto (shape at most ``shape_cap``) read at
    the tail probability that leaves ``1 - quantile`` of all images above."""
    from scipy import stats

    n = logs.size
    top = max(5, round(share * n))
    base = logs[n - top - 1]
    shape, _, scale = stats.genpareto.fit(logs[-top:] - base, floc=0)
    shape, _, scale = stats.genpareto.fit(logs[-top:] - base, floc=0, f0=min(shape, shape_cap))
    return float(base + stats.genpareto.ppf(1 - (1 - quantile) * n / top, shape, 0, scale))


def _candidate(kind: str, **options: object):
    """A rule: (sorted held-out scores, quantile, origin) -> threshold; below ``ROBUST_FROM`` images the rule before.

    kinds: "fallback" (the tail line only where the held-out check rejects the log-normal fit), "max" (at least
    the tail line), "alone" (the tail line instead of the fit), "gpd" (at least the Pareto tail); ``check``: the
    held-out check afterwards."""
    from fod_app.calibration import held_out_allowance, held_out_check, log_fit

    def rule(values: np.ndarray, quantile: float, origin: float) -> float:
        centre, spread, k = log_fit(values - origin, quantile)
        body = origin + np.exp(centre + k * spread)
        if values.size < ROBUST_FROM:
            return held_out_check(body, values, quantile)
        logs = np.log(values - origin)
        if kind == "gpd":
            tail = origin + np.exp(_gpd(logs, options["share"], options["shape_cap"], quantile))
        else:
            tail = origin + np.exp(_qq(logs, options["share"], options.get("minimum", 5), options["inflate"],
                                       quantile))
        if kind == "fallback":
            rejected = int(np.sum(values >= body)) > held_out_allowance(values.size, quantile)
            return max(body, tail) if rejected else body
        threshold = tail if kind == "alone" else max(body, tail)
        return held_out_check(threshold, values, quantile) if options.get("check") else threshold

    return rule


#: The rules compared on 2026-12-04 (pooled leave-one-out, FOD + PatchCore); "top 1/4, max, check" became the tail
#: fit (with at least 8 points, chosen by ``--simulate`` at 12-20 held-out images; same on the full sets).
CANDIDATES = {
    "before": None,
    "upper half, fallback only": _candidate("fallback", share=0.5, inflate=False),
    "upper half, fallback only, k": _candidate("fallback", share=0.5, inflate=True),
    "upper half, max": _candidate("max", share=0.5, inflate=False),
    "upper half, max, k": _candidate("max", share=0.5, inflate=True),
    "upper half, max, k, check": _candidate("max", share=0.5, inflate=True, check=True),
    "upper half alone": _candidate("alone", share=0.5, inflate=False),
    "upper half alone, k": _candidate("alone", share=0.5, inflate=True),
    "upper half alone, k, check": _candidate("alone", share=0.5, inflate=True, check=True),
    "Pareto top 1/4, shape <= 0.5, check": _candidate("gpd", share=0.25, shape_cap=0.5, check=True),
    "Pareto top 1/4, shape <= 0, check": _candidate("gpd", share=0.25, shape_cap=0.0, check=True),
    "Pareto top 0.4, shape <= 0, check": _candidate("gpd", share=0.4, shape_cap=0.0, check=True),
    "top 1/4, max, k, check": _candidate("max", share=0.25, inflate=True, check=True),
    "top 0.15, max, k, check": _candidate("max", share=0.15, inflate=True, check=True),
}


def candidates(runs: dict[tuple[str, int], dict]) -> None:
    """Pooled leave-one-out reach of each of ``CANDIDATES`` over the runs with ``ROBUST_FROM`` held-out images."""
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # the Pareto fits on a few points
    print("rule | " + " | ".join(METHODS) + " | both")
    for name, rule in CANDIDATES.items():
        counts = []
        for method in METHODS:
            reached = total = 0
            for run in runs.values():
                if held_out_scores(run, method).size < ROBUST_FROM:
                    continue
                quantile = 1.0 - float(run.get("design_frr", 0.01))
                origin = float(run[method].get("score_origin") or 0.0)
                fit = (partial(replayed_threshold, run, method, tail_fit=False) if rule is None
                       else lambda scores, rule=rule, quantile=quantile, origin=origin: rule(scores, quantile, origin))
                found = leave_one_out(run, method, fit)
                reached, total = reached + found[0], total + found[1]
            counts.append((reached, total))
        both = (sum(c[0] for c in counts), sum(c[1] for c in counts))
        print(f"{name} | " + " | ".join(f"{r}/{t}" for r, t in [*counts, both]))


def leave_one_out(run: dict, method: str, fit: Callable[..., float]) -> tuple[int, int]:
    """(left-out held-out images at or above ``fit(scores=the others, sorted)``, held-out images)."""
    held_out = held_out_scores(run, method)
    reached = sum(int(held_out[i] >= fit(scores=np.sort(np.delete(held_out, i)))) for i in range(held_out.size))
    return reached, held_out.size


def simulate(draws: int = 300, sizes: tuple[int, ...] = (12, 20, 31, 66, 114)) -> None:
    """Each rule's false-reject rate on fresh good images of a known log-score distribution (quantile 0.99)."""
    from scipy import stats

    log_scores = {  # frozen distributions of log(score)
        "log-normal (sd 0.2)": stats.norm(0.0, 0.2),
        "Gumbel (scale 0.1)": stats.gumbel_r(0.0, 0.1),
        "skew-normal (a 5, scale 0.15)": stats.skewnorm(5, 0.0, 0.15),
        "0.1 x log-normal (sd 0.5)": stats.lognorm(0.5, 0.0, 0.1),
    }
    rng = np.random.default_rng(0)
    print("log-score distribution | held-out images | " + " | ".join(RULES))
    for name, truth in log_scores.items():
        for n in sizes:
            rates = {rule: [] for rule in RULES}
            for _ in range(draws):
                scores = np.exp(truth.rvs(size=n, random_state=rng))
                for rule, tail_fit in RULES.items():
                    cut = Calibration.from_scores(scores, 0.99, tail_fit=tail_fit).threshold
                    rates[rule].append(float(truth.sf(np.log(cut))))
            print(f"{name} | {n} | " + " | ".join(f"{statistics.mean(v):.4f}" for v in rates.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--simulate", action="store_true", help="known distributions instead of stored runs")
    parser.add_argument("--candidates", action="store_true", help="the fourteen rules compared, leave-one-out")
    args = parser.parse_args()
    if args.simulate:
        simulate()
        return
    runs = load_runs(args.files)
    if args.candidates:
        candidates(runs)
        return

    print("Leave-one-out, held-out good images (label-free): reached / left out")
    print("set | seed | " + " | ".join(f"{m} {rule}" for m in METHODS for rule in RULES))
    pooled = {(m, rule): [0, 0] for m in METHODS for rule in RULES}
    for (name, seed), run in sorted(runs.items()):
        if held_out_scores(run, "fod").size < ROBUST_FROM:
            continue
        cells = []
        for method in METHODS:
            for rule, tail_fit in RULES.items():
                reached, total = leave_one_out(run, method, partial(replayed_threshold, run, method,
                                                                    tail_fit=tail_fit))
                pooled[(method, rule)][0] += reached
                pooled[(method, rule)][1] += total
                cells.append(f"{reached}/{total}")
        print(f"{name} | {seed} | " + " | ".join(cells))
    print("pooled | | " + " | ".join(f"{r}/{t} = {r / t:.4f}" for r, t in pooled.values()))

    print("\nTest images (measurement only): false rejects of good / misses of defective, mean over a set's runs")
    print("set | runs | " + " | ".join(f"{m} {rule}" for m in METHODS for rule in RULES))
    groups: dict[str, list[dict]] = {}
    for (name, _seed), run in sorted(runs.items()):
        groups.setdefault(name, []).append(run)
    set_means = {(m, rule): [] for m in METHODS for rule in RULES}
    for name, group in groups.items():
        cells = []
        for method in METHODS:
            for rule, tail_fit in RULES.items():
                rates = [replay(run, method, tail_fit=tail_fit) for run in group]
                mean = (statistics.mean(r["frr_now"] for r in rates), statistics.mean(r["miss_now"] for r in rates))
                set_means[(method, rule)].append(mean)
                cells.append(f"{mean[0]:.4f} / {mean[1]:.3f}")
        print(f"{name} | {len(group)} | " + " | ".join(cells))
    print(f"mean over {len(groups)} sets | | " + " | ".join(
        f"{statistics.mean(v[0] for v in values):.4f} / {statistics.mean(v[1] for v in values):.3f}"
        for values in set_means.values()))


if __name__ == "__main__":
    main()
