"""AppTest tests of the Evaluate page on the folders engineers have (plain good/ + defect/, a zip of them),
its click-through to misses and false rejects, its downloads, its own threshold, and evaluation records on the
Models page. Real bottle images from the shared data sets, the session's real test model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from test_evaluate_folders import make_mvtec_set, make_plain_set, zip_of

from fod_app.bundle import read_metadata
from fod_app.history import HistoryStore
from fod_app.ui.pickers import THRESHOLD_KEY

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """CPU engine, a private history database, the tmp folder as the only extra data root."""
    monkeypatch.setenv("FOD_DEVICE", "cpu")
    monkeypatch.setenv("FOD_HISTORY_DB", str(tmp_path / "history.sqlite3"))
    monkeypatch.setenv("FOD_DATA_ROOTS", str(tmp_path))
    return tmp_path


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _app(page: str = "pages/5_evaluate.py", session: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=TIMEOUT)
    at.run()
    _ok(at)
    for key, value in (session or {}).items():
        at.session_state[key] = value
    at.switch_page(page).run()
    _ok(at)
    return at


def _text(at: AppTest) -> str:
    parts = [str(e.value) for kind in ("markdown", "caption", "info", "success", "warning", "error")
             for e in at.get(kind)]
    return "\n".join(parts)


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _evaluate_folder(at: AppTest, folder: Path) -> None:
    at.text_input(key="evaluate_path").set_value(str(folder)).run()
    _ok(at)
    at.button(key="evaluate_run").click().run()
    _ok(at)


def _text_of(value: object) -> str:
    value = value() if callable(value) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def test_plain_folders_image_level_click_through_and_downloads(models_env: Path, isolated: Path,
                                                                downloads: dict) -> None:
    folder = make_plain_set(isolated / "bottle_parts")
    at = _app()
    at.text_input(key="evaluate_path").set_value(str(folder)).run()
    _ok(at)
    text = _text(at)
    assert "6 test images**: 4 good, 2 defective" in text and "plain labelled folders" in text
    assert "Image-level metrics only" in text
    at.button(key="evaluate_run").click().run()
    _ok(at)
    metrics = _metrics(at)
    assert 0.0 <= float(metrics["Image AUROC"]) <= 1.0
    assert metrics["Pixel AUROC"] == "— (no masks)" and metrics["AUPRO (FPR ≤ 30%)"] == "— (no masks)"
    assert any("image level only: no masks" in h.value for h in at.subheader)
    assert at.slider(key="evaluate_threshold_w").value == 1.0  # the model's calibrated threshold

    # per-branch AUROC for educators
    branches = next(df.value for df in at.dataframe if "Branch" in df.value.columns)
    assert "Combined (the model's score)" in list(branches["Branch"]) and "Reconstruction" in list(branches["Branch"])

    # a threshold between the scores makes misses and false rejects; click through to one of each
    report = at.session_state["evaluation"]["report"]
    scores = np.sort(report.scores)
    threshold = round(float(scores[len(scores) // 2]), 2)
    at.slider(key="evaluate_threshold_w").set_value(threshold).run()
    _ok(at)
    errors = report.errors(threshold)
    assert f"Confusion matrix at threshold {threshold:.2f}" in " ".join(c.proto.spec for c in at.get("plotly_chart"))
    shown = 0
    for group, kind in (("Misses", "miss"), ("False rejects", "false reject")):
        label = next(o for o in at.radio(key="evaluate_error_group").options if o.startswith(group))
        assert label == f"{group} ({len(errors[kind])})"
        at.radio(key="evaluate_error_group").set_value(label).run()
        _ok(at)
        if not errors[kind]:
            assert "None at this threshold." in _text(at)
            continue
        pick = at.selectbox(key="evaluate_error_pick")
        assert list(pick.options) == [f"{report.records[i]['file']} — score {report.records[i]['score']:.3f}"
                                      for i in errors[kind]]
        last = errors[kind][-1]
        pick.set_value(last).run()
        _ok(at)
        record = report.records[last]
        assert _metrics(at)["Score"] == f"{record['score']:.3f}"
        captions = [c for img in at.image for c in img.captions]
        assert f"Photo: {record['file']}" in captions and any(c.startswith("Heat map") for c in captions)
        shown += 1
    assert shown >= 1, "the median threshold leaves at least one error on a 4 + 2 set"

    # downloads at this page's threshold
    rows = list(csv.DictReader(io.StringIO(_text_of(downloads["evaluation_test-model_bottle_parts.csv"]))))
    assert len(rows) == 6 and {float(r["threshold"]) for r in rows} == {threshold}
    assert sum(r["outcome"] == "miss" for r in rows) == len(errors["miss"])
    summary = json.loads(_text_of(downloads["evaluation_test-model_bottle_parts.json"]))
    assert summary["image_level_only"] is True and summary["dataset"]["n_good"] == 4
    page = _text_of(downloads["evaluation_test-model_bottle_parts.html"])
    assert page.startswith("<!DOCTYPE html>") and "Image-level metrics only" in page
    assert page.count("data:image/jpeg;base64,") == 2 * (len(errors["miss"]) + len(errors["false reject"]))


def test_evaluate_threshold_is_independent_of_inspect(models_env: Path, isolated: Path) -> None:
    folder = make_plain_set(isolated / "parts")
    # as if the Inspect slider had been moved to 0.5 for this model (what its slider writes)
    at = _app(session={THRESHOLD_KEY: 0.5, "fod_threshold_model": "test-model"})
    _evaluate_folder(at, folder)
    assert at.slider(key="evaluate_threshold_w").value == 1.0
    assert "Confusion matrix at threshold 1.00" in " ".join(c.proto.spec for c in at.get("plotly_chart"))
    at.slider(key="evaluate_threshold_w").set_value(0.8).run()
    _ok(at)
    assert at.session_state[THRESHOLD_KEY] == 0.5  # Inspect's threshold is untouched by Evaluate's
    offer = at.button(key="evaluate_use_f1")
    best = float(offer.label.split()[1])
    offer.click().run()
    _ok(at)
    assert at.slider(key="evaluate_threshold_w").value == pytest.approx(best)
    assert at.session_state[THRESHOLD_KEY] == 0.5


def test_zip_upload_of_plain_folders(models_env: Path, isolated: Path) -> None:
    source = make_plain_set(isolated / "src", good="ok", defect_folders={"ng": "broken_large"})
    at = _app()
    at.radio(key="evaluate_source").set_value("Upload a zip").run()
    at.file_uploader(key="evaluate_upload").set_value(("parts.zip", zip_of(source, "parts"), "application/zip")).run()
    _ok(at)
    assert "6 test images**: 4 good, 2 defective (ng)" in _text(at)
    at.button(key="evaluate_run").click().run()
    _ok(at)
    (record,) = HistoryStore().evaluations("test-model")
    assert (record.dataset_name, record.dataset_path) == ("parts", "parts.zip (uploaded zip)")
    assert record.image_level_only and (record.n_good, record.n_defect) == (4, 2)


def test_folder_without_good_gives_one_clear_line(models_env: Path, isolated: Path) -> None:
    folder = make_plain_set(isolated / "parts", good="reference")  # not a recognised good folder name
    at = _app()
    at.text_input(key="evaluate_path").set_value(str(folder)).run()
    _ok(at)
    (error,) = at.error
    assert "no good/ (or ok/) folder found" in error.value and "\n" not in error.value
    assert not any(b.key == "evaluate_run" for b in at.button)


def test_two_evaluations_are_two_records_on_the_models_page(models_env_copy: Path, isolated: Path) -> None:
    plain = make_plain_set(isolated / "plain_parts")
    mvtec = make_mvtec_set(isolated / "bottle_mvtec")
    at = _app()
    _evaluate_folder(at, mvtec)
    _evaluate_folder(at, plain)
    records = HistoryStore().evaluations("test-model")
    assert [r.dataset_name for r in records] == ["plain_parts", "bottle_mvtec"]  # newest first, first kept
    first = records[1]
    assert (first.n_good, first.n_defect, first.image_level_only) == (3, 2, False)
    assert first.metrics["pixel_auroc"] is not None and first.threshold_units == 1.0
    assert "metrics" not in read_metadata("test-model", models_env_copy)  # no overwritten bundle field

    at.switch_page("pages/6_models.py").run()
    _ok(at)
    text = _text(at)
    assert "**Latest**" in text and "**plain_parts** — 6 images (4 good, 2 defective), image level only" in text
    table = next(df.value for df in at.dataframe if "Data set" in df.value.columns)
    assert list(table["Data set"]) == ["plain_parts", "bottle_mvtec"] and list(table["Good"]) == [4, 3]
    models = at.dataframe[0].value
    assert models.iloc[0]["Image AUROC"] == f"{records[0].metrics['image_auroc']:.3f}"
