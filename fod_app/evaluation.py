"""Evaluate a detector on a labelled MVTec-layout folder: image/pixel AUROC, AUPRO, F1-max, per type."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .data import ImageLoadError, MVTecDataset, check_mask_sizes, load_image, load_mask, prepare_image
from .inference import Detector
from .metrics import EvaluationResult, evaluate


@dataclass
class EvaluationReport:
    """Metrics plus one record per test image (scores in threshold units)."""

    result: EvaluationResult
    records: list[dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    ms_per_image: float = 0.0

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

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.result.to_dict(),
            "at_threshold": self.at_threshold(1.0),
            "seconds": round(self.seconds, 2),
            "ms_per_image": round(self.ms_per_image, 1),
            "failures": [{"file": n, "reason": r} for n, r in self.failures],
        }


def evaluate_detector(
    detector: Detector,
    dataset: MVTecDataset,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationReport:
    """Score every test image of ``dataset`` and compute all metrics. Unreadable files are reported.

    Masks of another size than their image are refused up front (``DatasetError`` naming them), never stretched.
    """
    check_mask_sizes(dataset.test_items)
    started = time.perf_counter()
    size = detector.config.image_size
    labels, scores, masks, maps, types, records = [], [], [], [], [], []
    failures: list[tuple[str, str]] = []
    items = dataset.test_items
    inference_seconds = 0.0
    for start in range(0, len(items), batch_size):
        batch, batch_items = [], []
        for item in items[start : start + batch_size]:
            name = f"{item.defect_type}/{item.path.name}"
            try:
                image = prepare_image(load_image(item.path, name), size)
                mask = load_mask(item.mask_path, size) if item.label else np.zeros((size, size), bool)
            except (ImageLoadError, ValueError, OSError) as err:
                failures.append((name, str(err)))
                continue
            batch.append((name, image))
            batch_items.append((item, mask))
        if batch:
            t0 = time.perf_counter()
            results = list(detector.inspect(batch, batch_size=batch_size))
            inference_seconds += time.perf_counter() - t0
            for result, (item, mask) in zip(results, batch_items):
                labels.append(item.label)
                scores.append(result.score)
                types.append(item.defect_type)
                masks.append(mask)
                maps.append(result.anomaly_map.astype(np.float32))
                records.append(
                    {
                        "file": result.name,
                        "defect_type": item.defect_type,
                        "label": item.label,
                        "score": round(result.score, 4),
                        "verdict": result.verdict,
                    }
                )
        if progress is not None:
            progress(min(start + batch_size, len(items)), len(items))
    if not labels:
        raise ValueError("No test image could be read; nothing to evaluate.")
    ignored = None if detector.ignore_regions is None else detector.ignore_regions.ignored(size)
    result = evaluate(np.array(labels), np.array(scores), np.stack(masks), np.stack(maps), types, ignore=ignored)
    n = len(labels)
    return EvaluationReport(result, records, failures, time.perf_counter() - started, 1000.0 * inference_seconds / n)
