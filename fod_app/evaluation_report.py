"""Downloads of an evaluation: CSV of per-image results, JSON of the metrics, one self-contained HTML report.

Scores and thresholds are in threshold units (1.0 = the model's calibrated threshold). The HTML report embeds
the misses and false rejects (photo + heat map) as base64 JPEG, so it opens anywhere, offline. No Streamlit.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from datetime import datetime
from typing import Any

from .data import ImageLoadError
from .evaluation import FALSE_REJECT, MISS, EvaluationReport
from .metrics import confusion_at
from .report import _CSS, _csv_safe, image_data_uri

BRANCH_LABELS = {
    "reconstruction": "Reconstruction",
    "intra": "Intra-image correlation",
    "inter": "Inter-image correlation",
    "nearest": "Nearest good patch (not FOD)",
    "combined": "Combined (the model's score)",
}
#: Most misses/false rejects drawn (photo + heat map) in the HTML report; the table lists every image.
MAX_REPORT_PICTURES = 60


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def evaluation_csv(report: EvaluationReport, threshold: float, model_name: str, model_version: str) -> str:
    """CSV text, one line per image (highest score first): file, type, truth, score, verdict, outcome, branches."""
    rows = sorted(report.rows(threshold), key=lambda r: -r["score"])
    branch_columns = [f"{name}_score" for name in report.branch_auroc]
    columns = ["file", "defect_type", "truth", "score", "verdict", "outcome", "has_mask", *branch_columns,
               "threshold", "model", "model_version", "dataset"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([
            _csv_safe(str(row["file"])), _csv_safe(str(row["defect_type"])), row["truth"], _number(row["score"]),
            row["verdict"], row["outcome"], "yes" if row["has_mask"] else "no",
            *[_number(row.get(c)) for c in branch_columns],
            _number(threshold), _csv_safe(model_name), model_version, _csv_safe(report.dataset_name),
        ])
    return buffer.getvalue()


def evaluation_summary(
    report: EvaluationReport, threshold: float, model_name: str, model_version: str, created: datetime | None = None
) -> dict[str, Any]:
    """Everything about one evaluation as a JSON-safe dict: data set, model, metrics, counts at ``threshold``."""
    labels, scores = report.labels, report.scores
    return {
        "model": model_name,
        "model_version": model_version,
        "dataset": {
            "name": report.dataset_name,
            "path": report.dataset_path,
            "layout": report.layout,
            "n_good": report.result.n_good,
            "n_defective": report.result.n_defective,
            "n_defective_with_mask": report.n_defect_with_mask,
        },
        "evaluated": (created or datetime.now().astimezone()).isoformat(timespec="seconds"),
        "threshold": threshold,
        "image_level_only": report.image_level_only,
        "metrics": report.to_dict(),
        "at_evaluate_threshold": {**report.at_threshold(threshold), **confusion_at(labels, scores, threshold)},
    }


def evaluation_json(report: EvaluationReport, threshold: float, model_name: str, model_version: str) -> str:
    """Strict JSON (no NaN) of :func:`evaluation_summary`."""
    return json.dumps(evaluation_summary(report, threshold, model_name, model_version), indent=1, allow_nan=False)


_EXTRA_CSS = """
.metrics { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 10px; margin: 10px 0; }
.metrics div { background: #f4f6f8; border-radius: 6px; padding: 10px 12px; }
.metrics b { display: block; font-size: 11px; text-transform: uppercase; color: #52606d; }
.metrics span { font-size: 24px; font-weight: 700; }
.pair { display: flex; gap: 8px; } .pair img { width: 200px; height: 200px; }
.tag { font-weight: 700; } .miss { color: #c62828; } .reject { color: #ef8f00; }
"""


def evaluation_html(
    report: EvaluationReport,
    threshold: float,
    model_name: str,
    model_version: str,
    created: datetime | None = None,
) -> str:
    """One self-contained HTML page: metrics, per-branch AUROC, confusion counts, the errors with pictures, all rows.

    Photos are re-read from the evaluated files; a file that cannot be read any more is listed without pictures.
    """
    esc = html.escape
    created = created or datetime.now().astimezone()
    result = report.result
    labels, scores = report.labels, report.scores
    counts = confusion_at(labels, scores, threshold)

    def metric(label: str, value: float | None, note: str = "") -> str:
        shown = _number(value, 3) or "n/a"
        return f"<div><b>{esc(label)}</b><span>{shown}</span>{esc(note)}</div>"

    no_masks = " (no masks)" if report.image_level_only else ""
    metrics = (
        metric("Image AUROC", result.image_auroc) + metric("F1-max", result.f1_max)
        + metric("Pixel AUROC" + no_masks, result.pixel_auroc) + metric("AUPRO (FPR ≤ 30%)" + no_masks, result.aupro)
    )
    if report.image_level_only:
        level_note = ("<p class='note'><b>Image-level metrics only</b>: this set has no defect masks, so pixel AUROC "
                      "and AUPRO (how well the heat map outlines the defects) are not computed.</p>")
    elif report.n_defect_with_mask < result.n_defective:
        level_note = (f"<p class='note'>Pixel metrics use the {report.n_defect_with_mask} of {result.n_defective} "
                      "defective images that have a mask (and all good images).</p>")
    else:
        level_note = ""
    branch_rows = "".join(
        f"<tr><td>{esc(BRANCH_LABELS.get(name, name))}</td><td class='num'>{_number(value, 3) or 'n/a'}</td></tr>"
        for name, value in report.branch_auroc.items()
    )
    branch_html = (
        "<h2>Image AUROC of each branch alone</h2><table><thead><tr><th>Branch</th><th class='num'>Image AUROC"
        f"</th></tr></thead><tbody>{branch_rows}</tbody></table>"
        if branch_rows else ""
    )
    errors = report.errors(threshold)
    pictures = []
    for kind, css in ((MISS, "miss"), (FALSE_REJECT, "reject")):
        for index in errors[kind][:MAX_REPORT_PICTURES]:
            record = report.records[index]
            try:
                photo, heat = report.view(index)
                images = (f"<div class='pair'><img src='{image_data_uri(photo)}' alt='photo'>"
                          f"<img src='{image_data_uri(heat)}' alt='heat map'></div>")
            except (ImageLoadError, OSError, ValueError):
                images = "<p class='note'>(the file could not be read again)</p>"
            pictures.append(
                f"<tr><td><span class='tag {css}'>{esc(kind)}</span><br>{esc(record['file'])}<br>"
                f"score {float(record['score']):.3f}</td><td>{images}</td></tr>"
            )
    shown = len(errors[MISS][:MAX_REPORT_PICTURES]) + len(errors[FALSE_REJECT][:MAX_REPORT_PICTURES])
    more = len(errors[MISS]) + len(errors[FALSE_REJECT]) - shown
    errors_html = (
        "<table><tbody>" + "".join(pictures) + "</tbody></table>"
        + (f"<p class='note'>{more} more are listed in the table below.</p>" if more > 0 else "")
        if pictures else "<p class='note'>No misses and no false rejects at this threshold.</p>"
    )
    all_rows = "".join(
        f"<tr><td>{esc(r['file'])}</td><td>{esc(r['truth'])}</td><td class='num'>{r['score']:.3f}</td>"
        f"<td>{esc(r['verdict'])}</td><td>{esc(r['outcome'])}</td></tr>"
        for r in sorted(report.rows(threshold), key=lambda r: -r["score"])
    )
    stamp = created.strftime("%Y-%m-%d %H:%M %Z").strip()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Evaluation – {esc(model_name)} on {esc(report.dataset_name)}</title>
<style>{_CSS}{_EXTRA_CSS}</style></head>
<body><div class="page">
<header><h1>Evaluation report</h1>
<div class="sub">FOD Inspector · model {esc(model_name)} (version {esc(model_version)}) on
{esc(report.dataset_name)} · generated {esc(stamp)}</div></header>
<div class="meta">
<div><b>Data set</b>{esc(report.dataset_path)}</div><div><b>Images</b>{result.n_good} good,
{result.n_defective} defective</div><div><b>NG threshold</b>{threshold:.2f} (1.00 = calibrated)</div>
<div><b>Layout</b>{"plain labelled folders" if report.layout == "folders" else "MVTec AD"}</div>
</div>
<h2>Metrics</h2>
<div class="metrics">{metrics}</div>
{level_note}
<h2>At the threshold {threshold:.2f}</h2>
<div class="cards">
<div class="card NG"><div class="n">{counts["tp"]}</div><div class="l">defects detected</div></div>
<div class="card REVIEW"><div class="n">{counts["fn"]}</div><div class="l">defects missed</div></div>
<div class="card FAIL"><div class="n">{counts["fp"]}</div><div class="l">good parts rejected</div></div>
<div class="card OK"><div class="n">{counts["tn"]}</div><div class="l">good parts passed</div></div>
</div>
{branch_html}
<h2>Misses and false rejects (photo and heat map)</h2>
{errors_html}
<h2>All images (highest score first)</h2>
<table><thead><tr><th>File</th><th>Truth</th><th class="num">Score</th><th>Verdict</th><th>Outcome</th></tr></thead>
<tbody>{all_rows}</tbody></table>
<footer>Generated by FOD Inspector. Scores are in threshold units (1.00 = the model's calibrated threshold); a part
is NG when its score is at or above the threshold. A miss is a defective part that passed; a false reject is a good
part that was rejected.</footer>
</div></body></html>
"""
