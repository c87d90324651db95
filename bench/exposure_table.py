"""Evening out each photo's exposure: stored runs (photos as taken) against reruns with ``exposure=even``.

    python bench/exposure_table.py --stored bench/results/a.json ... \
        --even bench/results/compare_exposure_fewshot.json --merged-out bench/results/compare_exposure_auto_merged.json

``--even``: ``bench/compare.py`` runs with ``--set exposure=even --peer-exposure even`` (FOD and PatchCore both see
the evened photos). For each of them the stored run of the same set and seed (same test images, checked) gives both
methods on the photos as taken. Per set (mean over seeds): FOD and PatchCore image AUROC as taken and evened, and
FOD's self-check AUROC (label-free) both ways. The column "auto" is what ``exposure="auto"`` decides for that run's
training images (``fod_app.exposure.choose_exposure``; good images only).

``--merged-out``: for the runs where "auto" evens the photos, the rerun's FOD with the stored run's PatchCore (the
plain peer, photos as taken), in ``compare.py``'s format, so that ``bench/nine_sets.py`` gives the nine-set figures
of ``exposure="auto"`` against plain PatchCore (runs where "auto" keeps the photos as taken are the stored ones).
Test labels only measure here.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.threshold_replay import load_runs  # noqa: E402


def auto_choice(set_name: str, seed: int) -> str:
    """What ``exposure="auto"`` decides for the training images of one benchmark run."""
    from bench.datasets import load_set
    from fod_app.data import load_images
    from fod_app.exposure import choose_exposure

    images = [image for _, image in load_images(load_set(set_name, seed).train, 256, compact=True).images]
    return choose_exposure(images)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stored", nargs="+", type=Path, required=True)
    parser.add_argument("--even", nargs="+", type=Path, required=True)
    parser.add_argument("--merged-out", type=Path)
    args = parser.parse_args()
    stored, even = load_runs(args.stored), load_runs(args.even)
    merged, per_set = [], {}
    for key, run in sorted(even.items()):
        before = stored[key]
        if before["test_images"] != run["test_images"]:
            raise SystemExit(f"{key}: the stored run scored other test images")
        choice = auto_choice(*key)
        per_set.setdefault(key[0], []).append((before, run, choice))
        if choice == "even":
            row = copy.deepcopy(run)
            row["patchcore"] = before["patchcore"]
            row["peer_from"] = "stored run, photos as taken"
            merged.append(row)
    print("| set | runs | auto | FOD as taken → even | PatchCore as taken → even | FOD even − PC as taken | "
          "self-check as taken → even |")
    print("|---|---|---|---|---|---|---|")

    def mean(rows: list, which: int, method: str, key: str = "image_auroc") -> float:
        return statistics.mean(r[which][method][key] for r in rows)

    def check(rows: list, which: int) -> float:
        return statistics.mean(r[which]["fod"]["self_check"]["auroc"] for r in rows)

    for name, rows in per_set.items():
        choices = "/".join(sorted({c for *_, c in rows}))
        print(f"| {name} | {len(rows)} | {choices} | {mean(rows, 0, 'fod'):.4f} → {mean(rows, 1, 'fod'):.4f} | "
              f"{mean(rows, 0, 'patchcore'):.4f} → {mean(rows, 1, 'patchcore'):.4f} | "
              f"{mean(rows, 1, 'fod') - mean(rows, 0, 'patchcore'):+.4f} | "
              f"{check(rows, 0):.3f} → {check(rows, 1):.3f} |")
    if args.merged_out:
        args.merged_out.write_text(json.dumps(merged, indent=1))
        print(f"\n{len(merged)} runs (FOD evened, PatchCore as taken) written to {args.merged_out}")


if __name__ == "__main__":
    main()
