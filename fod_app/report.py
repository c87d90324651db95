"""Inspection reports for stakeholders: a CSV table and one self-contained HTML file (no Streamlit).

Rows are mappings with at least ``file``, ``score`` (threshold units, 1.0 = calibrated threshold) and
``verdict`` ('OK', 'REVIEW', 'NG'); for the HTML report optionally ``image`` and ``overlay`` as
(H, W, 3) uint8 arrays, embedded as base64 JPEG thumbnails so the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from PIL import Image

from .calibration import MAP_DISPLAY_MAX
from .visualize import PLOTLY_COLORSCALE

CSV_COLUMNS = ("file", "score", "verdict", "threshold", "model", "model_version", "review_threshold")
VERDICT_ORDER = ("NG", "REVIEW", "OK")
_VERDICT_COLOURS = {"NG": "#c62828", "REVIEW": "#ef8f00", "OK": "#2e7d32"}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_safe(text: str) -> str:
    """Neutralise spreadsheet formulas in file names (CSV injection): prefix with an apostrophe."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


def sort_rows(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Highest score first (the parts most likely to be defective on top)."""
    return sorted(rows, key=lambda r: float(r["score"]), reverse=True)


def verdict_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(VERDICT_ORDER, 0)
    for row in rows:
        counts[str(row["verdict"])] = counts.get(str(row["verdict"]), 0) + 1
    return counts


def results_csv(
    rows: Iterable[Mapping[str, Any]],
    threshold: float,
    model_name: str,
    model_version: str,
    review_threshold: float | None = None,
) -> str:
    """CSV text, one line per image sorted by score: file, score, verdict, threshold, model, version.

    Scores and thresholds are in threshold units (1.0 = the model's calibrated threshold). The
    ``review_threshold`` column is empty when no review band is used.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in sort_rows(rows):
        writer.writerow(
            [
                _csv_safe(str(row["file"])),
                _fmt(row["score"]),
                row["verdict"],
                _fmt(threshold),
                _csv_safe(str(model_name)),
                model_version,
                _fmt(review_threshold),
            ]
        )
    return buffer.getvalue()


def image_data_uri(array: np.ndarray, max_side: int = 256, fmt: str = "JPEG", quality: int = 85) -> str:
    """(H, W, 3) uint8 -> ``data:image/...;base64,...`` (downscaled so the longer side <= max_side)."""
    img = Image.fromarray(np.ascontiguousarray(array))
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        new_size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(new_size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if fmt.upper() == "JPEG":
        img.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
        mime = "jpeg"
    else:
        img.save(buffer, format="PNG", compress_level=1)  # fast: these URIs are built while the user waits
        mime = "png"
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _legend_gradient() -> str:
    stops = ", ".join(f"{colour} {100 * position:.0f}%" for position, colour in PLOTLY_COLORSCALE)
    return f"linear-gradient(to right, {stops})"


_CSS = """
* { box-sizing: border-box; }
body { font-family: -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif; color: #1f2933;
       margin: 0; background: #f4f6f8; }
.page { max-width: 1120px; margin: 0 auto; padding: 32px 28px 48px; background: #fff; min-height: 100vh; }
header { border-bottom: 3px solid #1f4e79; padding-bottom: 14px; margin-bottom: 22px; }
h1 { font-size: 26px; margin: 0 0 4px; color: #1f4e79; }
h2 { font-size: 18px; margin: 30px 0 10px; color: #1f4e79; }
.sub { color: #52606d; font-size: 14px; }
.meta { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 10px; margin: 16px 0; }
.meta div { background: #f4f6f8; border-radius: 6px; padding: 10px 12px; font-size: 13px; }
.meta b { display: block; font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: #52606d;
          font-weight: 600; margin-bottom: 3px; }
.cards { display: flex; gap: 12px; margin: 6px 0 8px; flex-wrap: wrap; }
.card { flex: 1 1 130px; border-radius: 8px; padding: 14px 16px; color: #fff; }
.card .n { font-size: 30px; font-weight: 700; line-height: 1.1; }
.card .l { font-size: 13px; opacity: .95; }
.card.total { background: #1f4e79; } .card.NG { background: #c62828; } .card.REVIEW { background: #ef8f00; }
.card.OK { background: #2e7d32; } .card.FAIL { background: #616e7c; }
.note { font-size: 13px; color: #52606d; margin: 6px 0; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th { text-align: left; background: #1f4e79; color: #fff; padding: 8px; font-weight: 600; position: sticky; top: 0; }
td { border-bottom: 1px solid #e4e7eb; padding: 6px 8px; vertical-align: middle; }
tr:nth-child(even) td { background: #fafbfc; }
td.img, th.img { width: 140px; } th.rank, td.rank { width: 36px; } th.v, td.v { width: 96px; }
td img { width: 128px; height: 128px; object-fit: contain; border-radius: 4px; display: block; background: #000; }
.badge { display: inline-block; min-width: 64px; text-align: center; padding: 3px 8px; border-radius: 12px;
         color: #fff; font-weight: 700; font-size: 12px; }
.num { font-variant-numeric: tabular-nums; text-align: right; }
.legend { display: flex; align-items: center; gap: 10px; font-size: 12px; color: #52606d; margin: 8px 0 4px; }
.bar { position: relative; width: 320px; height: 14px; border-radius: 3px; border: 1px solid #cbd2d9; }
.tick { position: absolute; top: -4px; width: 2px; height: 22px; background: #1f2933; }
.fail td { color: #8a1c1c; }
footer { margin-top: 36px; font-size: 12px; color: #7b8794; border-top: 1px solid #e4e7eb; padding-top: 10px; }
@media print { body { background: #fff; } .page { padding: 0; } th { position: static; }
               tr { page-break-inside: avoid; } }
"""


def html_report(
    rows: Sequence[Mapping[str, Any]],
    *,
    threshold: float,
    model_name: str,
    model_version: str,
    review_threshold: float | None = None,
    false_reject_rate: float | None = None,
    n_calibration: int | None = None,
    failures: Sequence[tuple[str, str]] = (),
    created: datetime | None = None,
    title: str = "Visual inspection report",
) -> str:
    """A single self-contained HTML page (inline CSS, base64 images) summarising one inspection batch.

    ``threshold``/``review_threshold`` and row scores are in threshold units. ``false_reject_rate``
    is the fraction of the model's good calibration images rejected at ``threshold``.
    """
    created = created or datetime.now().astimezone()
    esc = html.escape
    ordered = sort_rows(rows)
    counts = verdict_counts(ordered)

    def card(kind: str, number: int, label: str) -> str:
        return f'<div class="card {kind}"><div class="n">{number}</div><div class="l">{label}</div></div>'

    cards = [card("total", len(ordered), "images inspected")]
    labels = {"NG": "NG (rejected)", "REVIEW": "REVIEW (check by hand)", "OK": "OK (passed)"}
    for name in VERDICT_ORDER:
        if name == "REVIEW" and review_threshold is None and not counts["REVIEW"]:
            continue
        cards.append(card(name, counts[name], labels[name]))
    if failures:
        cards.append(card("FAIL", len(failures), "unreadable files"))

    rule = f"NG when score &ge; {threshold:.2f}"
    if review_threshold is not None:
        rule += f"; REVIEW when {review_threshold:.2f} &le; score &lt; {threshold:.2f}"
    rule += "; otherwise OK."
    frr = ""
    if false_reject_rate is not None:
        on = f" of the {n_calibration} good calibration images" if n_calibration else " of good calibration images"
        frr = (
            f'<p class="note">At this threshold the model rejects <b>{100 * false_reject_rate:.1f}%</b>{on} '
            "(the expected false-reject rate on good parts).</p>"
        )

    marker = 100 * min(max(threshold / MAP_DISPLAY_MAX, 0.0), 1.0)
    legend = (
        f'<div class="legend"><span>0</span><div class="bar" style="background:{_legend_gradient()}">'
        f'<div class="tick" style="left:calc({marker:.1f}% - 1px)" title="threshold"></div></div>'
        f"<span>{MAP_DISPLAY_MAX:g}+</span><span>Heat-map colours (score units, same scale on every image); "
        f"the black tick marks the threshold {threshold:.2f}.</span></div>"
    )

    body_rows = []
    for rank, row in enumerate(ordered, start=1):
        verdict = str(row["verdict"])
        colour = _VERDICT_COLOURS.get(verdict, "#616e7c")
        cells = []
        for key, alt in (("image", "image"), ("overlay", "heat map")):
            array = row.get(key)
            if array is None:
                cells.append("<td class='img'></td>")
            else:
                uri = image_data_uri(array)
                cells.append(f'<td class="img"><img src="{uri}" alt="{alt} of {esc(str(row["file"]))}"></td>')
        body_rows.append(
            f"<tr><td class='num rank'>{rank}</td>{''.join(cells)}<td>{esc(str(row['file']))}</td>"
            f"<td class='num'>{float(row['score']):.3f}</td>"
            f"<td class='v'><span class='badge' style='background:{colour}'>{esc(verdict)}</span></td></tr>"
        )
    failure_html = ""
    if failures:
        items = "".join(f"<tr class='fail'><td>{esc(n)}</td><td>{esc(r)}</td></tr>" for n, r in failures)
        failure_html = (
            "<h2>Files that could not be inspected</h2>"
            f"<table><thead><tr><th>File</th><th>Reason</th></tr></thead><tbody>{items}</tbody></table>"
        )

    stamp = created.strftime("%Y-%m-%d %H:%M %Z").strip()
    review_text = "off" if review_threshold is None else f"{review_threshold:.2f}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} – {esc(model_name)}</title>
<style>{_CSS}</style></head>
<body><div class="page">
<header><h1>{esc(title)}</h1>
<div class="sub">FOD Inspector · anomaly detection trained on good parts only · generated {esc(stamp)}</div></header>
<div class="meta">
<div><b>Model</b>{esc(model_name)}</div><div><b>Model version</b>{esc(model_version)}</div>
<div><b>NG threshold</b>{threshold:.2f}</div><div><b>Review band starts at</b>{review_text}</div>
</div>
<h2>Summary</h2>
<div class="cards">{"".join(cards)}</div>
<p class="note">Scores are in threshold units: 1.00 is the model's calibrated threshold. Decision rule: {rule}</p>
{frr}
<h2>Results (highest score first)</h2>
{legend}
<table><thead><tr><th class="rank">#</th><th class="img">Image</th><th class="img">Heat map</th><th>File</th>
<th class="num">Score</th><th class="v">Verdict</th>
</tr></thead><tbody>
{"".join(body_rows)}
</tbody></table>
{failure_html}
<footer>Generated by FOD Inspector (Focus-the-Discrepancy, ICCV 2023). Red areas of a heat map are the regions
that differ most from the good parts the model was trained on. A score is a measure of difference, not a
certainty: check NG and REVIEW parts by eye before acting.</footer>
</div></body></html>
"""
