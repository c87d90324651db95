"""Set means and the mean over sets from stored ``bench/compare.py`` runs: image and pixel AUROC, FOD and PatchCore,
and the false-reject rate on test good images with today's threshold rule (``threshold_replay.replay``).

    python bench/nine_sets.py bench/results/a.json bench/results/b.json ...

A run is one (set, seed); a later file's run replaces an earlier one's (so a release is "the previous files, then
the reruns"). Test labels only measure here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from threshold_replay import load_runs, replay, replayed_thresholds  # noqa: E402

#: Bootstrap resamples of the test good images behind the false-reject interval (``frr_interval``).
BOOTSTRAP = 2000


def by_set(runs: dict[tuple[str, int], dict]) -> dict[str, list[dict]]:
    """Runs grouped by set name, sets and seeds in sorted order."""
    groups: dict[str, list[dict]] = {}
    for (name, _seed), run in sorted(runs.items()):
        groups.setdefault(name, []).append(run)
    return groups


def set_rows(runs: dict[tuple[str, int], dict]) -> list[dict]:
    """Per set: runs, mean image/pixel AUROC of FOD and PatchCore, worst run's difference, replayed FRR and misses."""
    rows = []
    for name, group in by_set(runs).items():
        def mean(method: str, key: str, group: list[dict] = group) -> float | None:
            values = [run[method][key] for run in group]
            return statistics.mean(values) if all(v is not None for v in values) else None

        replayed = {method: [replay(run, method) for run in group] for method in ("fod", "patchcore")}  # once a run
        rows.append({
            "set": name, "runs": len(group),
            "fod": mean("fod", "image_auroc"), "patchcore": mean("patchcore", "image_auroc"),
            "pixel_fod": mean("fod", "pixel_auroc"), "pixel_patchcore": mean("patchcore", "pixel_auroc"),
            "worst": min(run["fod"]["image_auroc"] - run["patchcore"]["image_auroc"] for run in group),
            "frr_fod": statistics.mean(r["frr_now"] for r in replayed["fod"]),
            "frr_patchcore": statistics.mean(r["frr_now"] for r in replayed["patchcore"]),
            "miss_fod": statistics.mean(r["miss_now"] for r in replayed["fod"]),
            "miss_patchcore": statistics.mean(r["miss_now"] for r in replayed["patchcore"]),
        })
    return rows


#: One run's statistic on resampled test images: (random generator) -> a vector of figures.
Draw = Callable[[np.random.Generator], np.ndarray]


def bootstrap_means(runs: dict[tuple[str, int], dict], draw_of: Callable[[dict], Draw], resamples: int,
                    seed: int) -> np.ndarray:
    """(resamples, k) draws of the mean over sets of the per-set means of ``draw_of(run)``'s figures: the paired
    bootstrap skeleton of ``frr_interval`` and ``auroc_interval``."""
    rng = np.random.default_rng(seed)
    groups = [[draw_of(run) for run in group] for group in by_set(runs).values()]
    return np.array([np.mean([np.mean([draw(rng) for draw in group], axis=0) for group in groups], axis=0)
                     for _ in range(resamples)])


def frr_interval(runs: dict[tuple[str, int], dict], resamples: int = BOOTSTRAP, seed: int = 0
                 ) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of the mean-over-sets false-reject rate (FOD, PatchCore, FOD − PatchCore) when each
    run's test good images are resampled with replacement (the same images for both methods: paired). The thresholds
    stay as replayed: this is the test sets' sampling noise, not the training's."""
    def draw_of(run: dict) -> Draw:
        good = np.asarray(run["test_labels"]) == 0
        fod, patchcore = (np.asarray(run[m]["scores_units"], dtype=np.float64)[good] * float(run[m]["threshold_raw"])
                          >= threshold for m, threshold in zip(("fod", "patchcore"), replayed_thresholds(run)))

        def draw(rng: np.random.Generator) -> np.ndarray:
            pick = rng.integers(0, fod.size, fod.size)
            return np.array([fod[pick].mean(), patchcore[pick].mean()])
        return draw

    draws = bootstrap_means(runs, draw_of, resamples, seed)
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    difference = np.percentile(draws[:, 0] - draws[:, 1], [2.5, 97.5])
    return {"fod": (low[0], high[0]), "patchcore": (low[1], high[1]), "difference": tuple(difference)}


def _auroc(good: np.ndarray, defect: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half) of defect scores over good ones: sklearn's value, fast enough to be
    called 10^5 times in the bootstrap below (sklearn's ``roc_auc_score`` takes ~1 ms a call)."""
    ordered = np.sort(good)
    below = np.searchsorted(ordered, defect, side="left")
    not_above = np.searchsorted(ordered, defect, side="right")
    return float((below + not_above).sum() / (2.0 * good.size * defect.size))


def auroc_interval(runs: dict[tuple[str, int], dict], resamples: int = BOOTSTRAP // 2, seed: int = 0
                   ) -> tuple[float, float]:
    """95 % percentile interval of FOD − PatchCore image AUROC on the mean over sets, each run's test good and
    defective images resampled with replacement (separately; the same images for both methods: paired)."""
    def draw_of(run: dict) -> Draw:
        labels = np.asarray(run["test_labels"])
        fod, patchcore = (np.asarray(run[m]["scores_units"], dtype=np.float64) for m in ("fod", "patchcore"))
        good_all, defect_all = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)

        def draw(rng: np.random.Generator) -> np.ndarray:
            good = good_all[rng.integers(0, good_all.size, good_all.size)]
            defect = defect_all[rng.integers(0, defect_all.size, defect_all.size)]
            return np.array([_auroc(fod[good], fod[defect]) - _auroc(patchcore[good], patchcore[defect])])
        return draw

    low, high = np.percentile(bootstrap_means(runs, draw_of, resamples, seed)[:, 0], [2.5, 97.5])
    return float(low), float(high)


def ceiling_rows(runs: dict[tuple[str, int], dict]) -> list[dict]:
    """Per set: the shipped score's mean test image AUROC beside that of the best of the self-check's candidate
    scores on each run (``candidate_test_auroc``, picked with the test labels: an oracle, the most that choosing
    among today's candidates could give) and PatchCore's; which candidate that was, per run."""
    rows = []
    for name, group in by_set(runs).items():
        # a rerun of FOD alone (``bank_cap_probe.py --out``) keeps no candidate scores: its shipped score only
        best = [max((run["fod"].get("candidate_test_auroc") or {"shipped": run["fod"]["image_auroc"]}).items(),
                    key=lambda item: item[1]) for run in group]
        rows.append({"set": name, "runs": len(group),
                     "fod": statistics.mean(run["fod"]["image_auroc"] for run in group),
                     "oracle": statistics.mean(max(value, run["fod"]["image_auroc"])
                                               for (_, value), run in zip(best, group)),
                     "patchcore": statistics.mean(run["patchcore"]["image_auroc"] for run in group),
                     "best": [candidate for candidate, _ in best]})
    return rows


def print_ceiling(runs: dict[tuple[str, int], dict]) -> None:
    """The table of ``ceiling_rows`` and its mean over sets."""
    rows = ceiling_rows(runs)
    print("| set | runs | FOD (shipped) | best candidate per run (oracle) | PatchCore | oracle − PC | best per run |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['runs']} | {r['fod']:.4f} | {r['oracle']:.4f} | {r['patchcore']:.4f} | "
              f"{r['oracle'] - r['patchcore']:+.4f} | {', '.join(r['best'])} |")
    means = {key: statistics.mean(r[key] for r in rows) for key in ("fod", "oracle", "patchcore")}
    print(f"| **mean over {len(rows)} sets** | {sum(r['runs'] for r in rows)} | {means['fod']:.4f} | "
          f"{means['oracle']:.4f} | {means['patchcore']:.4f} | {means['oracle'] - means['patchcore']:+.4f} | |")


def print_selfcheck(runs: dict[tuple[str, int], dict]) -> None:
    """How well the self-check AUROC (synthetic defects on held-out good images) predicts the test image AUROC:
    Spearman's rank correlation over the runs and over the set means, and the label-free catch rate of synthetic
    defects at the threshold against the real defects caught there (today's threshold, ``threshold_replay``)."""
    from scipy import stats

    pairs = [(run["fod"]["self_check"]["auroc"], run["fod"]["image_auroc"]) for run in runs.values()]
    rho, p = stats.spearmanr(*zip(*pairs))
    print(f"Spearman(self-check AUROC, test image AUROC) over {len(pairs)} runs: rho = {rho:.2f} (p = {p:.3g})")
    means = [(statistics.mean(run["fod"]["self_check"]["auroc"] for run in group),
              statistics.mean(run["fod"]["image_auroc"] for run in group)) for group in by_set(runs).values()]
    rho, p = stats.spearmanr(*zip(*means))
    print(f"over the {len(means)} set means: rho = {rho:.2f} (p = {p:.3g})")
    caught = [(run["fod"]["synthetic_catch"], 1.0 - replay(run, "fod")["miss_now"]) for run in runs.values()
              if run["fod"].get("synthetic_catch") is not None]
    rho, p = stats.spearmanr(*zip(*caught))
    print(f"Spearman(synthetic defects caught, real defects caught) at the threshold over {len(caught)} runs: "
          f"rho = {rho:.2f} (p = {p:.3g}); mean {statistics.mean(c[0] for c in caught):.3f} vs "
          f"{statistics.mean(c[1] for c in caught):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--ceiling", action="store_true",
                        help="instead: the best candidate score per run, picked with the test labels (an oracle)")
    parser.add_argument("--selfcheck", action="store_true",
                        help="instead: how well the self-check predicts the test AUROC and the real catch rate")
    args = parser.parse_args()
    runs = load_runs(args.files)
    if args.ceiling:
        print_ceiling(runs)
        return
    if args.selfcheck:
        print_selfcheck(runs)
        return
    rows = set_rows(runs)
    print("| set | runs | FOD | PatchCore | FOD − PC | worst run | pixel FOD / PC | FRR test good FOD / PC "
          "| miss FOD / PC |")
    print("|---|---|---|---|---|---|---|---|---|")

    def pixel(fod: float | None, patchcore: float | None) -> str:
        return "–" if fod is None else f"{fod:.4f} / {patchcore:.4f}"

    for r in rows:
        difference = r["fod"] - r["patchcore"]
        print(f"| {r['set']} | {r['runs']} | {r['fod']:.4f} | {r['patchcore']:.4f} | {difference:+.4f} | "
              f"{r['worst']:+.4f} | {pixel(r['pixel_fod'], r['pixel_patchcore'])} | "
              f"{r['frr_fod']:.4f} / {r['frr_patchcore']:.4f} | {r['miss_fod']:.3f} / {r['miss_patchcore']:.3f} |")

    def over_sets(key: str) -> float:
        return statistics.mean(r[key] for r in rows if r[key] is not None)

    print(f"| **mean over {len(rows)} sets** | {sum(r['runs'] for r in rows)} | {over_sets('fod'):.4f} | "
          f"{over_sets('patchcore'):.4f} | {over_sets('fod') - over_sets('patchcore'):+.4f} | "
          f"{min(r['worst'] for r in rows):+.4f} | {pixel(over_sets('pixel_fod'), over_sets('pixel_patchcore'))} | "
          f"{over_sets('frr_fod'):.4f} / {over_sets('frr_patchcore'):.4f} | "
          f"{over_sets('miss_fod'):.3f} / {over_sets('miss_patchcore'):.3f} |")
    low, high = auroc_interval(runs)
    print(f"\nImage AUROC, FOD − PatchCore on the mean over sets, 95 % interval over resampled test images "
          f"({BOOTSTRAP // 2} draws): {low:+.4f} to {high:+.4f}")
    interval = frr_interval(runs)
    print("False rejects on test good images, mean over sets, 95 % interval over resampled test good images "
          f"({BOOTSTRAP} draws): FOD {interval['fod'][0]:.4f}–{interval['fod'][1]:.4f}, PatchCore "
          f"{interval['patchcore'][0]:.4f}–{interval['patchcore'][1]:.4f}, FOD − PatchCore "
          f"{interval['difference'][0]:+.4f} to {interval['difference'][1]:+.4f}")


if __name__ == "__main__":
    main()
