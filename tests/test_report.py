"""Unit tests of fod_app.report: the CSV export and the self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import io
import re
from datetime import datetime

import numpy as np
from PIL import Image

from fod_app.report import CSV_COLUMNS, html_report, image_data_uri, results_csv, verdict_counts


def _rows(with_images: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = [
        {"file": "good_01.png", "score": 0.42, "verdict": "OK"},
        {"file": "defect_03.png", "score": 1.734, "verdict": "NG"},
        {"file": "border.png", "score": 0.91, "verdict": "REVIEW"},
    ]
    if with_images:
        for row in rows:
            row["image"] = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            row["overlay"] = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return rows


def test_csv_columns_rows_sorted_by_score() -> None:
    text = results_csv(_rows(), 1.0, "solar-cells", "abc123def456", review_threshold=0.8)
    lines = text.splitlines()
    assert lines[0] == "file,score,verdict,threshold,model,model_version,review_threshold"
    records = list(csv.DictReader(io.StringIO(text)))
    assert [r["file"] for r in records] == ["defect_03.png", "border.png", "good_01.png"]
    assert records[0] == {
        "file": "defect_03.png", "score": "1.7340", "verdict": "NG", "threshold": "1.0000",
        "model": "solar-cells", "model_version": "abc123def456", "review_threshold": "0.8000",
    }
    assert tuple(records[0]) == CSV_COLUMNS


def test_csv_without_review_band_and_formula_names_are_neutralised() -> None:
    rows = [{"file": "=HYPERLINK(\"x\").png", "score": 2.0, "verdict": "NG"}, {"file": "a,b.png", "score": 0.1,
                                                                              "verdict": "OK"}]
    records = list(csv.DictReader(io.StringIO(results_csv(rows, 1.25, "m", "v"))))
    assert records[0]["file"].startswith("'=")
    assert records[1]["file"] == "a,b.png"  # commas are quoted, not split
    assert records[0]["review_threshold"] == "" and records[0]["threshold"] == "1.2500"


def test_html_report_is_self_contained_with_images_and_verdicts() -> None:
    page = html_report(
        _rows(with_images=True), threshold=1.0, review_threshold=0.8, model_name="solar-cells",
        model_version="abc123def456", false_reject_rate=0.05, n_calibration=20,
        failures=[("broken <b>.png", "not a readable image")], created=datetime(2026, 1, 2, 3, 4),
    )
    assert page.startswith("<!DOCTYPE html>")
    uris = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 6  # photo + heat map for each of 3 rows
    Image.open(io.BytesIO(base64.b64decode(uris[0]))).verify()
    for text in ("solar-cells", "abc123def456", "2026-01-02", ">NG<", ">OK<", ">REVIEW<", "5.0%", "1.734"):
        assert text in page
    assert "broken &lt;b&gt;.png" in page and "<b>.png" not in page  # file names are escaped
    assert not re.search(r'(src|href)="(http|//)', page), "no external resources"
    # highest score first
    assert page.index("defect_03.png") < page.index("border.png") < page.index("good_01.png")


def test_html_report_without_images_or_review() -> None:
    page = html_report(_rows()[:2], threshold=1.3, model_name="m", model_version="v")
    assert "base64" not in page
    assert "REVIEW (check by hand)" not in page
    assert "1.30" in page


def test_image_data_uri_downscales() -> None:
    uri = image_data_uri(np.zeros((600, 300, 3), np.uint8), max_side=100, fmt="PNG")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.size == (50, 100)


def test_verdict_counts() -> None:
    assert verdict_counts(_rows()) == {"NG": 1, "REVIEW": 1, "OK": 1}
