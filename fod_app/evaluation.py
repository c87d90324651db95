"""Evaluate a detector on a labelled set: image AUROC, F1-max, per type, per branch; pixel AUROC/AUPRO from masks.

The set is plain ``good/`` + ``defect/`` folders or the MVTec layout (``fod_app.evaluation_data``). Masks are
used where present: pixel metrics are computed over the good images and the defective images that have a mask;
a set without masks gives image-level metrics only (``EvaluationReport.image_level_only``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .calibration import verdict
from .data import ImageLoadError, MVTecDataset, load_image, load_mask, prepare_image
from .evaluation_data import LabelledSet, check_mask_sizes_in
from .inference import Detector
from .metrics import EvaluationResult, evaluate, image_auroc
from .visualize import image_to_uint8, overlay

#: Outcome of one labelled image at a threshold (NG = score >= threshold).
MISS, FALSE_REJECT, DETECTED, PASSED = "miss", "false reject", "detected", "passed"


def outcome(label: int, score: float, threshold: float) -> str:
    """``miss`` (defective, passed), ``false reject`` (good, NG), ``detected`` or ``passed``."""
    flagged = score >= threshold
    if label:
        return DETECTED if flagged else MISS
    return FALSE_REJECT if flagged else PASSED


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass
class EvaluationReport:
    """Metrics plus one record per test image (scores in threshold units, 1.0 = calibrated threshold).

    ``maps``: (N, S, S) float16 anomaly maps in threshold units, aligned with ``records`` (for click-through).
    ``branch_auroc``: image AUROC of each branch alone ("reconstruction", "intra", "inter", "nearest") and "combined".
    """

    result: EvaluationResult
    records: list[dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    ms_per_image: float = 0.0  # scoring time per image in the evaluation's batches, every branch's map included
    verdict_ms: float = 0.0  # median batch-1 latency of the verdict alone (``verdict_latency_ms``), as in production
    maps: np.ndarray | None = None
    branch_auroc: dict[str, float] = field(default_factory=dict)
    dataset_name: str = ""
    dataset_path: str = ""
    layout: str = "mvtec"
    n_defect_with_mask: int = 0

    @property
    def image_level_only(self) -> bool:
        """True when no defective image had a mask: pixel AUROC and AUPRO were not computed."""
        return self.n_defect_with_mask == 0

    @property
    def labels(self) -> np.ndarray:
        """(N,) int, 1 = defective."""
        return np.array([int(r["label"]) for r in self.records], dtype=np.int64)

    @property
    def scores(self) -> np.ndarray:
        """(N,) float, threshold units."""
        return np.array([float(r["score"]) for r in self.records], dtype=np.float64)

    def at_threshold(self, threshold: float = 1.0) -> dict[str, Any]:
        """What the threshold does on this set: good parts rejected, defects detected (rates None without any).

        Defined for any test set, also one with only good (or only defective) images, where AUROC is not.
        """
        good = [float(r["score"]) for r in self.records if not r["label"]]
        bad = [float(r["score"]) for r in self.records if r["label"]]
        rejected = sum(s >= threshold for s in good)
        detected = sum(s >= threshold for s in bad)
        return {
            "threshold": threshold,
            "good_rejected": rejected,
            "false_reject_rate": rejected / len(good) if good else None,
            "defective_detected": detected,
            "detection_rate": detected / len(bad) if bad else None,
        }

    def errors(self, threshold: float) -> dict[str, list[int]]:
        """Indices of the misses (lowest score first) and false rejects (highest first) at ``threshold``."""
        misses = [i for i, r in enumerate(self.records) if outcome(r["label"], float(r["score"]), threshold) == MISS]
        rejects = [
            i for i, r in enumerate(self.records) if outcome(r["label"], float(r["score"]), threshold) == FALSE_REJECT
        ]
        misses.sort(key=lambda i: float(self.records[i]["score"]))
        rejects.sort(key=lambda i: -float(self.records[i]["score"]))
        return {MISS: misses, FALSE_REJECT: rejects}

    def rows(self, threshold: float) -> list[dict[str, Any]]:
        """One plain row per image at ``threshold``: file, type, truth, score, verdict, outcome, mask, branches."""
        out = []
        for r in self.records:
            score = float(r["score"])
            row = {
                "file": r["file"],
                "defect_type": r["defect_type"],
                "truth": "defective" if r["label"] else "good",
                "score": score,
                "verdict": verdict(score, threshold),
                "outcome": outcome(r["label"], score, threshold),
                "has_mask": bool(r.get("has_mask")),
            }
            row.update({f"{name}_score": value for name, value in r.get("branch_scores", {}).items()})
            out.append(row)
        return out

    def view(self, index: int, opacity: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Photo and heat-map overlay of record ``index``, both (S, S, 3) uint8 at the model's input size."""
        if self.maps is None:
            raise ValueError("This evaluation kept no heat maps.")
        record = self.records[index]
        amap = self.maps[index].astype(np.float32)
        image = prepare_image(load_image(record["path"], record["file"]), amap.shape[-1])
        return image_to_uint8(image), overlay(image, amap, opacity)

    def speed_text(self) -> str:
        """What the two times mean, for the CLI and the page: "N ms per image with every branch's map; inspecting
        one image takes M ms"."""
        return (f"{self.ms_per_image:.0f} ms per image with every branch's map; inspecting one image takes "
                f"{self.verdict_ms:.0f} ms")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe metrics (``nan`` -> None) with the rates at the calibrated threshold 1.0."""
        return {
            **self.result.to_dict(),
            "at_threshold": self.at_threshold(1.0),
            "branch_image_auroc": {k: _finite_or_none(v) for k, v in self.branch_auroc.items()},
            "image_level_only": self.image_level_only,
            "n_defective_with_mask": self.n_defect_with_mask,
            "layout": self.layout,
            "seconds": round(self.seconds, 2),
            "ms_per_image": round(self.ms_per_image, 1),
            "verdict_ms_batch1": round(self.verdict_ms, 1),
            "failures": [{"file": n, "reason": r} for n, r in self.failures],
        }


#: Images timed one at a time for ``verdict_latency_ms`` (after one untimed warm-up call).
LATENCY_IMAGES = 10


def verdict_latency_ms(detector: Detector, images: list[np.ndarray]) -> float:
    """Median milliseconds to score one (3, S, S) image at batch 1 without the per-branch maps: what inspecting a
    part costs (backbone, model, heat map and verdict). Evaluation itself scores in batches and, for per-branch
    AUROC, computes every branch's map, which the verdict may not need (2-3x the time on 2 CPU cores)."""
    if not images:
        return 0.0
    detector.score_batch(detector.to_batch(images[:1]))  # warm-up: the first batch-1 call plans its kernels
    times = []
    for image in images:
        t0 = time.perf_counter()
        detector.score_batch(detector.to_batch([image])).image_score.float().cpu()
        times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))


def _as_labelled_set(dataset: LabelledSet | MVTecDataset) -> LabelledSet:
    if isinstance(dataset, LabelledSet):
        return dataset
    return LabelledSet(dataset.root, "mvtec", list(dataset.test_items))


def evaluate_detector(
    detector: Detector,
    dataset: LabelledSet | MVTecDataset,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    with_branches: bool = True,
    dataset_path: str | None = None,
) -> EvaluationReport:
    """Score every test image of ``dataset`` and compute all metrics. Unreadable files are reported.

    Masks of another size than their image are refused up front (``DatasetError`` naming them), never stretched.
    ``with_branches`` also scores each branch alone (per-branch AUROC; costs the branches the score skips).
    """
    labelled = _as_labelled_set(dataset)
    if detector.calibration is None:
        raise RuntimeError("this model has no calibration; train it again")
    check_mask_sizes_in(labelled)
    started = time.perf_counter()
    size = detector.config.image_size
    threshold_raw = detector.calibration.threshold
    labels, scores, masks, has_mask, maps, types, records = [], [], [], [], [], [], []
    branch_scores: dict[str, list[float]] = {}
    failures: list[tuple[str, str]] = []
    items = labelled.test_items
    inference_seconds = 0.0
    timed: list[np.ndarray] = []  # the first LATENCY_IMAGES readable images, for verdict_latency_ms
    for start in range(0, len(items), batch_size):
        batch, batch_items = [], []
        for item in items[start : start + batch_size]:
            name = labelled.relative(item.path)
            try:
                image = prepare_image(load_image(item.path, name), size)
                masked = bool(item.label and item.mask_path is not None)
                mask = load_mask(item.mask_path, size) if masked else np.zeros((size, size), bool)
            except (ImageLoadError, ValueError, OSError) as err:
                failures.append((name, str(err)))
                continue
            batch.append(image)
            batch_items.append((item, name, mask, masked))
            if len(timed) < LATENCY_IMAGES:
                timed.append(image)
        if batch:
            t0 = time.perf_counter()
            scored = detector.score_batch(detector.to_batch(batch), with_branches=with_branches)
            units = (scored.anomaly_map / threshold_raw).float().cpu().numpy()
            raw = scored.image_score.float().cpu().numpy()
            per_branch = {k: v.float().cpu().numpy() for k, v in scored.branch_image_scores.items()}
            inference_seconds += time.perf_counter() - t0
            for i, (item, name, mask, masked) in enumerate(batch_items):
                score = float(raw[i] / threshold_raw)
                labels.append(item.label)
                scores.append(score)
                types.append(item.defect_type)
                masks.append(mask)
                has_mask.append(masked or not item.label)
                maps.append(units[i].astype(np.float16))
                branches = {k: float(v[i]) for k, v in per_branch.items()}
                for key, value in branches.items():
                    branch_scores.setdefault(key, []).append(value)
                records.append({
                    "file": name,
                    "path": str(item.path),
                    "defect_type": item.defect_type,
                    "label": item.label,
                    "has_mask": masked,
                    "score": round(score, 4),
                    "raw_score": float(raw[i]),
                    "verdict": verdict(score, 1.0),
                    "branch_scores": branches,
                })
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    if not labels:
        raise ValueError("No test image could be read; nothing to evaluate.")
    y, s = np.array(labels), np.array(scores)
    result = evaluate(y, s, defect_types=types)
    pixel = np.array(has_mask)
    n_masked = int(np.count_nonzero(pixel & (y == 1)))
    if n_masked:
        # masks where present: good images (no defect pixel by definition) + defective images with a mask
        maps_f32 = np.stack([maps[i].astype(np.float32) for i in np.flatnonzero(pixel)])
        ignored = None if detector.ignore_regions is None else detector.ignore_regions.ignored(size)
        pixel_result = evaluate(
            y[pixel], s[pixel], np.stack([masks[i] for i in np.flatnonzero(pixel)]), maps_f32, ignore=ignored
        )
        result = dataclasses.replace(result, pixel_auroc=pixel_result.pixel_auroc, aupro=pixel_result.aupro)
    branch_auroc = {name: image_auroc(y, np.array(values)) for name, values in branch_scores.items()}
    n = len(labels)
    verdict_ms = verdict_latency_ms(detector, timed)
    return EvaluationReport(
        result,
        records,
        failures,
        time.perf_counter() - started,
        1000.0 * inference_seconds / n,
        verdict_ms,
        maps=np.stack(maps),
        branch_auroc=branch_auroc,
        dataset_name=labelled.name,
        dataset_path=dataset_path if dataset_path is not None else str(labelled.root),
        layout=labelled.layout,
        n_defect_with_mask=n_masked,
    )
