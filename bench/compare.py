"""Fixed benchmark protocol: FOD and a reference PatchCore side by side, on the same images, splits and calibration.

    python bench/compare.py --sets mvtec_bottle mvtec_bottle@16 elpv_mono --seeds 0 1 2 --out bench/results/compare.json
    python bench/compare.py --sets mvtec_bottle@16 --seeds 0 --preset quick --set epochs=1 --max-test 16   # smoke
    python bench/compare.py --from-json bench/results/compare.json ...  # tables only, from earlier runs

Sets: see ``bench/datasets.py`` (``mvtec_bottle``, ``magnetic_tile``, ``elpv_mono``, each also as ``<set>@16``,
``<set>@32``: k seeded good training images). Each set x seed runs in a fresh subprocess (peak RSS is per run):

* FOD: ``fod_app.training.train(images, create_config(preset, seed=seed, **overrides))``; it holds out good images
  (``split_holdout``) and calibrates its threshold on them.
* PatchCore (``bench/patchcore.py``, same backbone): memory bank from the same images as FOD's (the training split,
  or all of them with ``held_out_in_bank``, the ``cpu`` preset's default), threshold from the same held-out good
  images (cross-fitted over the same folds when they are in the bank) with the same
  ``Calibration.from_scores(scores, config.threshold_quantile)``.
* Both score the same test images (``--max-test N``: a seeded sample balanced between good and defective). Metrics
  from ``fod_app.metrics``: image AUROC, pixel AUROC and AUPRO (None without masks), F1-max at the oracle threshold,
  and at the calibrated threshold the false-reject rate on test good images and the miss rate on defective ones,
  next to the design false-reject rate 1 - quantile. On few-shot sets both thresholds are also checked label-free:
  the share of the full set's other good training images (up to ``UNUSED_GOOD``, never test images) each rejects.

Writes all rows as a JSON list (``--out``, rewritten after every run) and prints Markdown tables (mean +- sd over
seeds), plus the Spearman rank correlation between FOD's self-check AUROC and its test image AUROC over all runs,
and between the share of synthetic defects FOD's threshold flags (label-free) and the share of real defects it flags.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BRANCHES = ("reconstruction", "intra", "inter", "nearest", "combined")
BATCH = 8
LATENCY_IMAGES = 10
#: Few-shot sets: at most this many of the full set's other good training images check the threshold label-free.
UNUSED_GOOD = 100


def _clean(value: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars -> float, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def sample_test(items: list, max_test: int | None, seed: int) -> list:
    """All items, or a seeded sample of ``max_test`` balanced between good and defective (order kept)."""
    import numpy as np

    if not max_test or max_test >= len(items):
        return items
    good = [i for i, t in enumerate(items) if t.label == 0]
    bad = [i for i, t in enumerate(items) if t.label == 1]
    n_bad = min(len(bad), max(max_test - len(good), max_test // 2))
    rng = np.random.default_rng(seed)
    pick = list(rng.choice(good, max_test - n_bad, replace=False)) + list(rng.choice(bad, n_bad, replace=False))
    return [items[i] for i in sorted(int(i) for i in pick)]


def threshold_rates(labels: Any, scores: Any, threshold: float) -> dict[str, float | None]:
    """False-reject rate on good and miss rate on defective test images at ``threshold`` (NG = score >= it)."""
    import numpy as np

    good, bad = scores[labels == 0], scores[labels == 1]
    return {
        "frr_test_good": float(np.mean(good >= threshold)) if good.size else None,
        "miss_rate": float(np.mean(bad < threshold)) if bad.size else None,
    }


def test_image_names(items: list) -> list[str]:
    """How a run names its test images: ``<split>/<type>/<file>``."""
    return [str(t.path.relative_to(t.path.parents[2])) for t in items]


def method_record(labels: Any, scores: Any, masks: Any, maps: Any, types: list[str], threshold: float) -> dict:
    """One method's metrics on the test images (``fod_app.metrics``; pixel metrics need ``masks`` and ``maps``) and
    its calibrated threshold's rates, with every image's score in threshold units."""
    from fod_app import metrics

    result = metrics.evaluate(labels, scores, masks, maps, types)
    return {
        "image_auroc": result.image_auroc,
        "pixel_auroc": result.pixel_auroc,
        "aupro": result.aupro,
        "f1_max_oracle_threshold": result.f1_max,
        "f1_oracle_threshold_units": result.f1_threshold / threshold,
        "per_type_image_auroc": result.per_type_image_auroc,
        "threshold_raw": threshold,
        **threshold_rates(labels, scores, threshold),
        "scores_units": (scores / threshold).round(5).tolist(),  # per test image, threshold units
    }


def run_single(
    set_name: str, seed: int, preset: str, overrides: dict, device: str, max_test: int | None, coreset_ratio: float,
    peer_exposure: str = "as_taken",
) -> dict:
    """One set x seed, in this process: train FOD, build PatchCore, score the test set with both."""
    import numpy as np
    import torch

    from bench.datasets import load_set, parse_name
    from bench.patchcore import PatchCore
    from fod_app import metrics, selfcheck
    from fod_app.backbone import create_feature_extractor
    from fod_app.calibration import Calibration
    from fod_app.config import create_config
    from fod_app.data import load_images, load_mask
    from fod_app.inference import device_label, resolve_device
    from fod_app.scoring import ScoreSpec
    from fod_app.training import HELD_OUT_FOLDS, extract_features, split_holdout, train

    started = time.perf_counter()
    config = create_config(preset, seed=seed, **overrides)
    bset = load_set(set_name, seed)
    report = load_images(bset.train, config.image_size)
    if report.failures:
        raise RuntimeError(f"unreadable training images: {report.failures[:3]}")
    images = [img for _, img in report.images]
    dev = resolve_device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # FOD: train() makes its own hold-out split and calibration.
    t0 = time.perf_counter()
    detector = train(images, config, device=device)
    sync()
    fod_train_s = time.perf_counter() - t0

    # PatchCore: the same split, the same calibration rule. Where FOD's banks take the held-out images too
    # (``held_out_in_bank``), PatchCore's bank is built from all the images (as anomalib's is) and its held-out
    # scores are cross-fitted over the same folds (``calibrate_with_held_out_in_banks``).
    train_idx, hold_idx = split_holdout(len(images), config)
    t0 = time.perf_counter()
    patchcore = PatchCore(
        create_feature_extractor(config.backbone, weights=None, device=dev, exposure=peer_exposure),
        coreset_ratio,
        seed=seed,
        smoothing_sigma=config.smoothing_sigma,
    )
    hold = [images[i] for i in hold_idx]

    def pc_scores_of(selected: list) -> np.ndarray:
        return torch.cat([patchcore.score_batch(torch.as_tensor(np.stack(selected[s : s + BATCH])))[1].cpu()
                          for s in range(0, len(selected), BATCH)]).numpy()

    if config.held_out_in_bank:
        hold_scores = np.empty(len(hold_idx))
        for fold in np.array_split(np.arange(len(hold_idx)), HELD_OUT_FOLDS):
            others = np.setdiff1d(np.arange(len(hold_idx)), fold)
            patchcore.fit([images[i] for i in train_idx] + [hold[i] for i in others])
            hold_scores[fold] = pc_scores_of([hold[i] for i in fold])
        patchcore.fit(images)
    else:
        patchcore.fit([images[i] for i in train_idx])
        hold_scores = pc_scores_of(hold)
    sync()
    bank_s = time.perf_counter() - t0  # backbone load + features + coreset(s) + held-out scores
    pc_calibration = Calibration.from_scores(hold_scores, config.threshold_quantile)
    sync()
    pc_build_s = time.perf_counter() - t0
    # Diagnostic, not a choice: every score combination the self-check tried, scored on the test images too,
    # with the final model and its held-out good statistics (how well the self-check ranks them).
    hold_features = extract_features(detector.backbone, hold, dev)
    good_stats, good_maps = selfcheck.held_out_reference(detector.model, hold_features, detector.config)
    per_branch = {k: v for k, v in ((detector.metadata.get("self_check") or {}).get("per_branch") or {}).items()
                  if k != "combined"}
    candidate_specs = selfcheck.candidate_specs(detector.config, per_branch, good_stats, good_maps)
    independent = selfcheck.separation_weights(per_branch)  # d'-proportional: the weighting without correlations
    if independent:
        candidate_specs["weighted_independent"] = ScoreSpec("standardized", independent, good_stats)
    del good_maps
    del images, report, hold_features

    # Test set: the same images for both, in batches.
    items = sample_test(bset.test, max_test, seed)
    labels = np.array([t.label for t in items])
    types = [t.defect_type for t in items]
    size = config.image_size
    masks = None
    if bset.has_masks:
        masks = np.stack([load_mask(t.mask_path, size) if t.label else np.zeros((size, size), bool) for t in items])
    fod_maps, fod_scores, pc_maps, pc_scores = [], [], [], []
    branch_scores: dict[str, list] = {name: [] for name in BRANCHES}
    candidate_scores: dict[str, list] = {}
    latency_images: list = []
    for start in range(0, len(items), BATCH):
        chunk = items[start : start + BATCH]
        loaded = load_images([t.path for t in chunk], size)
        if loaded.failures:
            raise RuntimeError(f"unreadable test images: {loaded.failures[:3]}")
        batch = detector.to_batch([img for _, img in loaded.images])
        if len(latency_images) < LATENCY_IMAGES:
            latency_images.extend(batch[: LATENCY_IMAGES - len(latency_images)])
        # One pass gives the score and every branch's image score (with_branches does not change the score).
        with torch.inference_mode():
            features = detector.backbone(batch)
        out = detector.score_features(features, with_branches=True)
        fod_maps.append(out.anomaly_map.float().cpu().numpy())
        fod_scores.append(out.image_score.float().cpu().numpy())
        for name, values in selfcheck.candidate_image_scores(
            detector.model, features, candidate_specs, good_stats, detector.config
        ).items():
            candidate_scores.setdefault(name, []).append(values)
        pc_map, pc_score = patchcore.score_batch(batch)
        pc_maps.append(pc_map.cpu().numpy())
        pc_scores.append(pc_score.cpu().numpy())
        for name in BRANCHES:
            value = out.branch_image_scores.get(name)
            branch_scores[name].append(None if value is None else value.float().cpu().numpy())
    # Label-free check of both thresholds on few-shot sets: good training images of the full set that the @k subset
    # left out (good by construction; never test images), a seeded sample of at most UNUSED_GOOD.
    frr_unused: dict[str, float | None] = {"fod": None, "patchcore": None}
    base, k = parse_name(set_name)
    n_unused = 0
    if k is not None:
        chosen = {str(p) for p in bset.train}
        unused = [p for p in load_set(base, seed).train if str(p) not in chosen]
        pick = np.random.default_rng(seed).choice(len(unused), min(UNUSED_GOOD, len(unused)), replace=False)
        unused = [unused[i] for i in sorted(int(i) for i in pick)]
        n_unused = len(unused)
        fod_unused, pc_unused = [], []
        for start in range(0, n_unused, BATCH):
            loaded = load_images(unused[start : start + BATCH], size)
            batch = detector.to_batch([img for _, img in loaded.images])
            fod_unused.append(detector.score_batch(batch).image_score.float().cpu().numpy())
            pc_unused.append(patchcore.score_batch(batch)[1].cpu().numpy())
        frr_unused = {
            "fod": float(np.mean(np.concatenate(fod_unused) >= detector.calibration.threshold)),
            "patchcore": float(np.mean(np.concatenate(pc_unused) >= pc_calibration.threshold)),
        }
    # FOD latency: batch 1, end to end from the image tensor (backbone + FOD + maps), median after one warm-up.
    detector.score_batch(latency_images[0][None])
    times = []
    for image in latency_images:
        t0 = time.perf_counter()
        detector.score_batch(image[None]).image_score.cpu()
        sync()
        times.append(time.perf_counter() - t0)
    fod_s = statistics.median(times) * len(items)  # summary() divides by the number of items
    patchcore.score_batch(latency_images[0][None])
    times = []
    for image in latency_images:
        t0 = time.perf_counter()
        patchcore.score_batch(image[None])[1].cpu()
        sync()
        times.append(time.perf_counter() - t0)
    pc_s = statistics.median(times) * len(items)

    def summary(maps: list, scores: list, threshold: float, seconds: float) -> dict:
        all_maps = np.concatenate(maps) if masks is not None else None
        record = method_record(labels, np.concatenate(scores), masks, all_maps, types, threshold)
        record["ms_per_image"] = 1000 * seconds / len(items)  # median batch-1 latency (LATENCY_IMAGES test images)
        return record

    fod = summary(fod_maps, fod_scores, detector.calibration.threshold, fod_s)
    fod["train_s"] = fod_train_s
    fod["fit_s"] = detector.metadata.get("training", {}).get("seconds_fit")
    fod["self_check"] = detector.metadata.get("self_check")
    fod["exposure"] = detector.metadata.get("training", {}).get("exposure")  # what exposure=auto decided
    fod["holdout_scores_raw"] = detector.calibration.good_scores  # to re-check a calibration rule offline
    fod["synthetic_scores_raw"] = detector.calibration.synthetic_scores  # the self-check's synthetic defects
    fod["synthetic_catch"] = detector.calibration.synthetic_catch_rate()  # label-free estimate of 1 - miss rate
    fod["score_origin"] = detector.calibration.origin  # the calibration's natural zero (ScoreSpec.score_origin)
    fod["frr_unused_good"] = frr_unused["fod"]
    fod["branch_image_auroc"] = None
    if branch_scores is not None:
        fod["branch_image_auroc"] = {
            name: None
            if not parts or any(p is None for p in parts)
            else metrics.image_auroc(labels, np.concatenate(parts))
            for name, parts in branch_scores.items()
        }
    fod["candidate_test_auroc"] = {
        name: metrics.image_auroc(labels, np.concatenate(parts)) for name, parts in candidate_scores.items()
    }
    del fod_maps
    pc = summary(pc_maps, pc_scores, pc_calibration.threshold, pc_s)
    pc.update(
        build_s=pc_build_s,
        bank_s=bank_s,
        n_patches=patchcore.n_patches,
        memory_bank=len(patchcore.memory_bank),
        coreset_ratio=coreset_ratio,
        exposure=peer_exposure,
        holdout_scores_raw=[float(v) for v in pc_calibration.good_scores],
        frr_unused_good=frr_unused["patchcore"],
    )
    return _clean(
        {
            "set": set_name,
            "seed": seed,
            "preset": preset,
            "overrides": overrides,
            "device": device_label(dev),
            "machine": {"node": platform.node(), "cores": os.cpu_count(), "torch": torch.__version__},
            "n_train_images": len(bset.train),
            "n_fit": len(train_idx),
            "n_holdout": len(hold_idx),
            "n_unused_good": n_unused,
            "n_test_good": int((labels == 0).sum()),
            "n_test_defect": int((labels == 1).sum()),
            "has_masks": masks is not None,
            "test_images": test_image_names(items),
            "test_labels": labels.tolist(),
            "design_frr": 1.0 - config.threshold_quantile,
            "fod": fod,
            "patchcore": pc,
            "wall_s": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


# --------------------------------------------------------------------------- report


def _get(row: dict, path: str) -> float | None:
    value: Any = row
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else float(value)


def _cell(values: list[float | None], digits: int = 3) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    text = f"{statistics.fmean(vals):.{digits}f}"
    return text + (f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else "")


MAIN_COLUMNS = [
    ("image AUROC FOD", "fod.image_auroc", 3),
    ("image AUROC PatchCore", "patchcore.image_auroc", 3),
    ("pixel AUROC FOD", "fod.pixel_auroc", 3),
    ("pixel AUROC PatchCore", "patchcore.pixel_auroc", 3),
    ("FRR test good FOD", "fod.frr_test_good", 3),
    ("FRR test good PatchCore", "patchcore.frr_test_good", 3),
    ("miss rate FOD", "fod.miss_rate", 3),
    ("miss rate PatchCore", "patchcore.miss_rate", 3),
    ("self-check AUROC (FOD)", "fod.self_check.auroc", 3),
    ("train s FOD", "fod.train_s", 0),
    ("build s PatchCore", "patchcore.build_s", 0),
]
MORE_COLUMNS = [
    ("AUPRO FOD", "fod.aupro", 3),
    ("AUPRO PatchCore", "patchcore.aupro", 3),
    ("F1-max FOD (oracle threshold)", "fod.f1_max_oracle_threshold", 3),
    ("F1-max PatchCore (oracle threshold)", "patchcore.f1_max_oracle_threshold", 3),
    ("ms/img FOD (batch 1)", "fod.ms_per_image", 0),
    ("ms/img PatchCore (batch 1)", "patchcore.ms_per_image", 0),
    ("synthetic defects caught FOD (label-free)", "fod.synthetic_catch", 3),
    ("FRR unused good FOD (label-free)", "fod.frr_unused_good", 3),
    ("FRR unused good PatchCore (label-free)", "patchcore.frr_unused_good", 3),
    *[(f"FOD {b} image AUROC", f"fod.branch_image_auroc.{b}", 3) for b in BRANCHES],
]


def table(rows: list[dict], columns: list[tuple[str, str, int]]) -> str:
    """Markdown: one line per set (mean ± sd over its seeds) and a final mean over the per-set means."""
    sets = list(dict.fromkeys(r["set"] for r in rows))
    lines = [
        "| set | runs | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    set_means: dict[str, list[float | None]] = {c[1]: [] for c in columns}
    for name in sets:
        runs = [r for r in rows if r["set"] == name]
        cells = []
        for _, path, digits in columns:
            vals = [_get(r, path) for r in runs]
            cells.append(_cell(vals, digits))
            present = [v for v in vals if v is not None]
            set_means[path].append(statistics.fmean(present) if present else None)
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    means = []
    for _, path, digits in columns:
        present = [v for v in set_means[path] if v is not None]
        means.append(_cell([statistics.fmean(present)] if present else [], digits))
    lines.append(f"| **mean over sets** | {len(rows)} | " + " | ".join(means) + " |")
    return "\n".join(lines)


def spearman_line(rows: list[dict], label_free: str = "fod.self_check.auroc", real: str = "fod.image_auroc",
                  what: str = "self-check AUROC, test image AUROC") -> str:
    """Spearman rank correlation over all runs of a label-free figure (default: FOD's self-check AUROC) with the
    real one it estimates (default: FOD's test image AUROC)."""
    pairs = [(_get(r, label_free), _get(r, real)) for r in rows]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if len(pairs) < 3:
        return f"Spearman({what}): n/a ({len(pairs)} runs with both; need 3)"
    from scipy.stats import spearmanr

    rho, p = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    return f"Spearman({what}) over {len(pairs)} runs: rho = {rho:.3f} (p = {p:.3g})"


def candidate_ranking_line(rows: list[dict]) -> str:
    """Within each run: Spearman rank correlation between the self-check AUROC of every score candidate and the
    same candidate's test image AUROC (does the self-check rank combinations as real defects do?), and how far
    the chosen candidate's test AUROC is from the best candidate's on test (an oracle, for comparison only)."""
    from scipy.stats import spearmanr

    rhos, regrets = [], []
    for row in rows:
        tested = (row.get("fod") or {}).get("candidate_test_auroc") or {}
        checked = ((row.get("fod") or {}).get("self_check") or {}).get("candidates") or {}
        names = [n for n in checked if n in tested and tested[n] is not None]
        if len(names) >= 3:
            rho = spearmanr([checked[n] for n in names], [tested[n] for n in names])[0]
            if math.isfinite(rho):
                rhos.append(rho)
            chosen = row["fod"]["self_check"]["score"]["name"]
            if chosen in tested:
                regrets.append(max(tested[n] for n in names) - tested[chosen])
    if not rhos:
        return "Candidate ranking: n/a (no run recorded candidate test AUROCs)"
    return (
        f"Candidate ranking over {len(rhos)} runs: mean Spearman(self-check AUROC, test AUROC) of the score candidates "
        f"= {statistics.fmean(rhos):.3f}; chosen candidate's test AUROC below the test-best candidate (oracle) by "
        f"{statistics.fmean(regrets):.3f} on the mean (max {max(regrets):.3f})"
    )


def _catch_rate(row: dict) -> float | None:
    miss = _get(row, "fod.miss_rate")
    return None if miss is None else 1.0 - miss


def report(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    design = {r.get("design_frr") for r in ok}
    parts = [
        f"FRR / miss rate: at the calibrated threshold (hold-out good images); design FRR = "
        f"{', '.join(f'{d:.3f}' for d in sorted(x for x in design if x is not None))}. "
        "Cells: mean ± sd over seeds.",
        "",
        table(ok, MAIN_COLUMNS),
        "",
        table(ok, MORE_COLUMNS),
        "",
        spearman_line(ok),
        "",
        candidate_ranking_line(ok),
        "",
        spearman_line([{**r, "fod_catch": _catch_rate(r)} for r in ok], "fod.synthetic_catch", "fod_catch",
                      "synthetic defects caught, real defects caught at the threshold"),
    ]
    failed = [r for r in rows if "error" in r]
    if failed:
        parts.append("FAILED runs: " + ", ".join(f"{r['set']} seed {r['seed']}" for r in failed))
    return "\n".join(parts)


# --------------------------------------------------------------------------- CLI


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=1", "variant=inter"]`` -> ``{"epochs": 1, "variant": "inter"}`` (JSON values, else strings)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", help="benchmark sets, e.g. mvtec_bottle mvtec_bottle@16 elpv_mono@32")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="FOD config overrides")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-test", type=int, help="score a seeded, balanced sample of N test images")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--peer-exposure", choices=["as_taken", "even"], default="as_taken",
                        help="the photos PatchCore sees (even: each photo's exposure evened out, as FOD's "
                        "exposure=even does; default: as taken, like anomalib's PatchCore)")
    parser.add_argument("--out", help="write the JSON list of rows here")
    parser.add_argument("--from-json", nargs="+", help="only print the tables of earlier --out files (merged)")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: JSON of one run
    args = parser.parse_args()

    if args.single:
        print("RESULT " + json.dumps(run_single(**json.loads(args.single))), flush=True)
        return
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.machine()}")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    if args.from_json:
        print(report([row for path in args.from_json for row in json.loads(Path(path).read_text())]))
        return
    if not args.sets:
        parser.error("--sets is required (or --from-json)")
    from bench.datasets import parse_name

    for name in args.sets:
        try:
            parse_name(name)  # fail early on a typo
        except ValueError as exc:
            parser.error(str(exc))
    overrides = parse_overrides(args.set)
    if "seed" in overrides:
        parser.error("the seed is set per run with --seeds, not with --set")
    rows: list[dict] = []
    for name in args.sets:
        for seed in args.seeds:
            spec = {
                "set_name": name,
                "seed": seed,
                "preset": args.preset,
                "overrides": overrides,
                "device": args.device,
                "max_test": args.max_test,
                "coreset_ratio": args.coreset_ratio,
                "peer_exposure": args.peer_exposure,
            }
            print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed} ...", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--single", json.dumps(spec)],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # stderr (progress, tracebacks) goes straight to ours
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                row = {
                    "set": name,
                    "seed": seed,
                    "error": f"exit code {proc.returncode}",
                    "stdout": proc.stdout[-2000:],
                }
                print(f"{name} seed {seed}: FAILED (exit code {proc.returncode})", file=sys.stderr)
            else:
                row = json.loads(line[len("RESULT ") :])
                row["command"] = shlex.join([sys.executable, *sys.argv])
                print(json.dumps({k: row[k] for k in ("set", "seed", "wall_s", "peak_rss_mb")}), flush=True)
            rows.append(row)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(rows, indent=1))
    print()
    print(report(rows))


if __name__ == "__main__":
    main()
