"""Set means and the mean over sets from stored ``bench/compare.py`` runs: image and pixel AUROC, FOD and PatchCore,
and the false-reject rate on test good images with today's threshold rule (``threshold_replay.replay``).

    python bench/nine_sets.py bench/results/a.json bench/results/b.json ...

A run is one (set, seed); a later file's run replaces an earlier one's (so a release is "the previous files, then
the reruns"). Test labels only measure here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from threshold_replay import replay  # noqa: E402


def set_rows(runs: dict[tuple[str, int], dict]) -> list[dict]:
    """Per set: runs, mean image/pixel AUROC of FOD and PatchCore, worst run's difference, replayed FRR."""
    by_set: dict[str, list[dict]] = {}
    for (name, _seed), run in sorted(runs.items()):
        by_set.setdefault(name, []).append(run)
    rows = []
    for name, group in by_set.items():
        def mean(method: str, key: str, group: list[dict] = group) -> float | None:
            values = [run[method][key] for run in group]
            return statistics.mean(values) if all(v is not None for v in values) else None

        rows.append({
            "set": name, "runs": len(group),
            "fod": mean("fod", "image_auroc"), "patchcore": mean("patchcore", "image_auroc"),
            "pixel_fod": mean("fod", "pixel_auroc"), "pixel_patchcore": mean("patchcore", "pixel_auroc"),
            "worst": min(run["fod"]["image_auroc"] - run["patchcore"]["image_auroc"] for run in group),
            "frr_fod": statistics.mean(replay(run, "fod")["frr_now"] for run in group),
            "frr_patchcore": statistics.mean(replay(run, "patchcore")["frr_now"] for run in group),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    runs: dict[tuple[str, int], dict] = {}
    for path in args.files:
        for run in json.loads(path.read_text()):
            runs[(run["set"], run["seed"])] = run
    rows = set_rows(runs)
    print("| set | runs | FOD | PatchCore | FOD − PC | worst run | pixel FOD / PC | FRR test good FOD / PC |")
    print("|---|---|---|---|---|---|---|---|")

    def pixel(fod: float | None, patchcore: float | None) -> str:
        return "–" if fod is None else f"{fod:.4f} / {patchcore:.4f}"

    for r in rows:
        difference = r["fod"] - r["patchcore"]
        print(f"| {r['set']} | {r['runs']} | {r['fod']:.4f} | {r['patchcore']:.4f} | {difference:+.4f} | "
              f"{r['worst']:+.4f} | {pixel(r['pixel_fod'], r['pixel_patchcore'])} | "
              f"{r['frr_fod']:.4f} / {r['frr_patchcore']:.4f} |")

    def over_sets(key: str) -> float:
        return statistics.mean(r[key] for r in rows if r[key] is not None)

    print(f"| **mean over {len(rows)} sets** | {sum(r['runs'] for r in rows)} | {over_sets('fod'):.4f} | "
          f"{over_sets('patchcore'):.4f} | {over_sets('fod') - over_sets('patchcore'):+.4f} | "
          f"{min(r['worst'] for r in rows):+.4f} | {pixel(over_sets('pixel_fod'), over_sets('pixel_patchcore'))} | "
          f"{over_sets('frr_fod'):.4f} / {over_sets('frr_patchcore'):.4f} |")


if __name__ == "__main__":
    main()
