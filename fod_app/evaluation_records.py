"""Evaluations as records in the history database: one row per evaluation, never overwritten.

Each record keeps the data set (name, path or upload name), image counts, the metrics, the threshold used and the
date (``fod_app.history``). No Streamlit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .evaluation import EvaluationReport
from .evaluation_report import evaluation_summary
from .history import EvaluationRecord, HistoryError, HistoryStore


def save_evaluation(
    report: EvaluationReport,
    model_name: str,
    model_version: str,
    threshold_units: float,
    dataset_path: str | None = None,
    history: Path | None = None,
) -> str:
    """Store ``report`` as a new evaluation record; returns its id. Raises ``HistoryError`` (one line)."""
    summary = evaluation_summary(report, threshold_units, model_name, model_version)
    metrics = {**summary["metrics"], "at_evaluate_threshold": summary["at_evaluate_threshold"]}
    return HistoryStore(history).record_evaluation(
        model_name=model_name,
        model_version=model_version,
        dataset_name=report.dataset_name,
        dataset_path=dataset_path if dataset_path is not None else report.dataset_path,
        n_good=report.result.n_good,
        n_defect=report.result.n_defective,
        metrics=metrics,
        threshold_units=float(threshold_units),
        image_level_only=report.image_level_only,
    )


def model_evaluations(model_name: str, history: Path | None = None) -> tuple[list[EvaluationRecord], str | None]:
    """A model's evaluation records, newest first, and a one-line reason when the history cannot be read."""
    try:
        return HistoryStore(history).evaluations(model_name), None
    except HistoryError as err:
        return [], str(err)


def latest_image_auroc(model_name: str, meta: dict[str, Any] | None = None) -> float | None:
    """Image AUROC of the model's latest evaluation record; else of an evaluation stored in an older bundle."""
    records, _ = model_evaluations(model_name)
    if records:
        return metric(records[0], "image_auroc")
    return metric((meta or {}).get("metrics"), "image_auroc")


def metric(record: EvaluationRecord | dict[str, Any] | None, key: str) -> float | None:
    """A finite metric of a record (or a plain metrics dict), else None."""
    metrics = record.metrics if isinstance(record, EvaluationRecord) else (record or {})
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def record_row(record: EvaluationRecord) -> dict[str, Any]:
    """One table row of a record: date, data set, counts, metrics, threshold."""
    return {
        "Date": record.created[:16].replace("T", " ") + " UTC",
        "Data set": record.dataset_name,
        "From": record.dataset_path,
        "Good": record.n_good,
        "Defective": record.n_defect,
        "Image AUROC": metric(record, "image_auroc"),
        "Pixel AUROC": None if record.image_level_only else metric(record, "pixel_auroc"),
        "AUPRO": None if record.image_level_only else metric(record, "aupro"),
        "Masks": "none (image level only)" if record.image_level_only else "yes",
        "Threshold": record.threshold_units,
        "Model version": record.model_version,
    }
