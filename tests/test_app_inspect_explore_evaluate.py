"""AppTest tests of the Inspect, Explore correlations and Evaluate pages, with the real test model."""

from __future__ import annotations

import csv
import io
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from fod_app.bundle import load_bundle, read_metadata
from fod_app.calibration import Calibration
from fod_app.data import load_image, prepare_image
from fod_app.explain import explain_image

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
SAMPLES = REPO / "sample_data" / "inspect"
BOTTLE = (REPO / ".." / "shared" / "datasets" / "mvtec_bottle").resolve()
TIMEOUT = 120
THRESHOLD_LABEL = "NG threshold (1.00 = the model's calibrated threshold)"


@pytest.fixture(autouse=True)
def cpu_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOD_DEVICE", "cpu")
    monkeypatch.delenv("FOD_DATA_ROOTS", raising=False)


def _app(page: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _markdown(at: AppTest) -> str:
    return "\n".join(str(m.value) for m in at.markdown)


def _png(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


def _results_table(at: AppTest):
    tables = [df.value for df in at.dataframe if "Verdict" in df.value.columns]
    assert len(tables) == 1
    return tables[0]


def _sample_button(at: AppTest):
    return next(b for b in at.button if b.label == "Try the sample images")


def _inspect_samples(at: AppTest, extra: list[tuple[str, bytes, str]] = ()) -> None:
    files = [_png(SAMPLES / n) for n in ("good_01.png", "good_03.png", "defect_01.png", "defect_03.png")]
    at.file_uploader(key="inspect_uploads").set_value(files + list(extra)).run()
    _ok(at)


# --------------------------------------------------------------------------- Inspect


def test_inspect_upload_shows_sorted_results_and_lists_unreadable_file(models_env: Path) -> None:
    at = _app("pages/3_inspect.py")
    _inspect_samples(at, [("scratched.png", b"definitely not a png", "image/png")])
    table = _results_table(at)
    assert len(table) == 4
    assert set(table["File"]) == {"good_01.png", "good_03.png", "defect_01.png", "defect_03.png"}
    assert list(table["Score"]) == sorted(table["Score"], reverse=True)
    assert set(table["Verdict"]) <= {"OK", "NG"}
    assert all(str(v).startswith("data:image/jpeg;base64,") for v in table["Image"])
    assert all(str(v).startswith("data:image/jpeg;base64,") for v in table["Heat map"])
    failures = [df.value for df in at.dataframe if "Reason" in df.value.columns]
    assert failures and list(failures[0]["File"]) == ["scratched.png"]
    assert "not a readable image" in failures[0]["Reason"][0]
    metrics = _metrics(at)
    assert metrics["Images"] == "4"
    assert int(metrics["NG"]) + int(metrics["OK"]) == 4
    assert "This threshold rejects" in _markdown(at)
    assert at.get("plotly_chart"), "heat-map overlay shown"


def test_threshold_slider_rejudges_without_rerunning_the_model(models_env: Path, monkeypatch) -> None:
    at = _app("pages/3_inspect.py")
    _inspect_samples(at)
    calls = []
    from fod_app.inference import Detector

    original = Detector.inspect
    monkeypatch.setattr(Detector, "inspect", lambda *a, **k: calls.append(1) or original(*a, **k))

    at.slider(key="inspect_threshold_w").set_value(0.1).run()
    _ok(at)
    assert at.slider(key="inspect_threshold_w").label == THRESHOLD_LABEL
    strict = _metrics(at)
    strict_text = _markdown(at)
    assert strict["NG"] == "4" and strict["OK"] == "0"
    assert "rejects 100.0% of good parts" in strict_text
    assert set(_results_table(at)["Verdict"]) == {"NG"}

    at.slider(key="inspect_threshold_w").set_value(3.0).run()
    _ok(at)
    lenient = _metrics(at)
    table = _results_table(at)  # scores in units of the calibrated threshold
    n_ng = int((table["Score"] >= 3.0).sum())
    assert n_ng < 4, "the samples include good cells: three times the threshold passes them"
    assert lenient["NG"] == str(n_ng) and lenient["OK"] == str(4 - n_ng)
    assert set(table.loc[table["Score"] < 3.0, "Verdict"]) == {"OK"}
    assert set(table.loc[table["Score"] >= 3.0, "Verdict"]) <= {"NG"}
    assert "rejects 0.0% of good parts" in _markdown(at)
    assert calls == [], "changing the threshold must not run the model again"
    # beside the false rejects: the share of the self-check's synthetic defects this threshold flags
    calibration = Calibration.from_dict(read_metadata("test-model")["calibration"])
    for value, text in ((0.1, strict_text), (3.0, _markdown(at))):
        expected = f"It flags **{100 * calibration.synthetic_catch_rate(value):.0f}% of the synthetic defects**"
        assert expected in text, (value, expected)

    # the review band adds a third verdict between the two thresholds
    at.slider(key="inspect_threshold_w").set_value(1.0).run()
    at.checkbox(key="inspect_review_on_w").check().run()
    _ok(at)
    review = at.slider(key="inspect_review_w")
    assert review.value == pytest.approx(0.8, abs=0.011)  # calibration review_threshold / threshold
    review.set_value(0.1).run()
    _ok(at)
    metrics = _metrics(at)
    assert "REVIEW" in metrics
    assert int(metrics["REVIEW"]) + int(metrics["NG"]) == 4 and int(metrics["OK"]) == 0
    assert "would go to manual review" in _markdown(at)


def test_csv_and_html_downloads(models_env: Path, downloads: dict) -> None:
    at = _app("pages/3_inspect.py")
    _inspect_samples(at)
    at.slider(key="inspect_threshold_w").set_value(1.2).run()
    _ok(at)
    csv_name = next(n for n in downloads if n.endswith(".csv") and "test-model" in n)
    text = downloads[csv_name].decode("utf-8") if isinstance(downloads[csv_name], bytes) else downloads[csv_name]
    lines = text.splitlines()
    assert lines[0] == "file,score,verdict,threshold,model,model_version,review_threshold"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4
    version = read_metadata("test-model", models_env)["model_version"]
    for row in rows:
        assert row["threshold"] == "1.2000" and row["model"] == "test-model" and row["model_version"] == version
        assert row["verdict"] == ("NG" if float(row["score"]) >= 1.2 else "OK")
    table = _results_table(at)
    assert {r["file"]: r["verdict"] for r in rows} == dict(zip(table["File"], table["Verdict"]))

    html_name = next(n for n in downloads if n.endswith(".html"))
    page = downloads[html_name]()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("data:image/jpeg;base64,") == 8  # photo and heat map per image
    assert "test-model" in page and version in page and "defect_03.png" in page


def test_zip_upload_extracts_images_and_reports_skipped_entries(models_env: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(SAMPLES / "good_02.png", "batch/good_02.png")
        archive.write(SAMPLES / "defect_05.png", "batch/defect_05.png")
        archive.writestr("batch/notes.txt", "line 3")
    at = _app("pages/3_inspect.py")
    at.file_uploader(key="inspect_uploads").set_value(("batch.zip", buffer.getvalue(), "application/zip")).run()
    _ok(at)
    assert set(_results_table(at)["File"]) == {"batch.zip/batch/good_02.png", "batch.zip/batch/defect_05.png"}
    failures = [df.value for df in at.dataframe if "Reason" in df.value.columns][0]
    assert "notes.txt" in failures["File"][0] and "not an image" in failures["Reason"][0]


def test_inspect_sample_button_and_heat_map_opacity(models_env: Path) -> None:
    at = _app("pages/3_inspect.py")
    _sample_button(at).click().run()
    _ok(at)
    assert len(_results_table(at)) == 16
    at.slider(key="inspect_opacity").set_value(0.9).run()
    _ok(at)
    at.selectbox(key="inspect_view").set_value("good_01.png").run()
    _ok(at)


# --------------------------------------------------------------------------- Explore correlations


def _kl(at: AppTest) -> tuple[str, str]:
    """Intra and inter KL of the selected patch (B, the last column of the explorer's table)."""
    column = at.table[0].value.iloc[:, -1]
    return column["Intra KL"], column["Inter KL"]


def test_explore_sample_row_col_and_selectors_change_the_view(models_env: Path) -> None:
    at = _app("pages/4_explore.py")
    assert at.radio(key="explore_source").value == "A sample image"
    at.selectbox(key="explore_sample").set_value(SAMPLES / "defect_03.png").run()
    _ok(at)
    assert "defect_03.png" in _markdown(at)
    start = _kl(at)
    assert at.number_input(key="explore_row_w").max == 32  # level 1: 32x32 patches of a 256 px image

    at.number_input(key="explore_row_w").set_value(2)
    at.number_input(key="explore_col_w").set_value(30)
    at.run()
    _ok(at)
    assert at.session_state["explore_patch"] == (1, 29)
    corner = _kl(at)
    assert corner != start
    assert "Patch row 2, column 30" in _markdown(at)

    at.number_input(key="explore_row_w").set_value(20).run()
    _ok(at)
    assert _kl(at) != corner
    assert at.session_state["explore_patch"] == (19, 29)

    before = _kl(at)
    at.selectbox(key="explore_head").set_value(1).run()
    _ok(at)
    assert _kl(at) != before and "head 2" in _markdown(at)
    before = _kl(at)
    at.selectbox(key="explore_layer").set_value(1).run()
    _ok(at)
    assert _kl(at) != before and "layer 2" in _markdown(at)
    at.selectbox(key="explore_head").set_value(-1).run()
    assert "average of all heads" in _markdown(at)

    # coarser level: the grid is 16x16 and the selection moves to the same place of the image
    at.selectbox(key="explore_level_w").set_value(1).run()
    _ok(at)
    assert at.number_input(key="explore_row_w").max == 16
    assert at.session_state["explore_patch"] == (9, 14)
    assert "level 2" in _markdown(at)

    jump = next(b for b in at.button if b.label == "Most anomalous patch")
    jump.click().run()
    _ok(at)
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("Intra target" in spec for spec in titles)
    assert any("Final score" in spec for spec in titles) and any("Inter divergence" in spec for spec in titles)


def test_explore_says_when_the_score_leaves_the_correlations_out(models_env_copy: Path) -> None:
    """A model whose self-check kept the nearest-good-patch branch alone: the page says the correlation charts
    explain the method, not the verdict; a model whose score uses them does not get that note."""
    from fod_app.bundle import update_metadata
    from fod_app.explain import unused_correlations_note
    from fod_app.scoring import ScoreSpec

    detector = load_bundle("test-model", root=models_env_copy, device="cpu")
    spec = detector.score_spec
    assert spec.mode == "standardized"
    uses_all = ScoreSpec("standardized", {"reconstruction": 0.3, "intra": 0.2, "inter": 0.2, "nearest": 0.3},
                         spec.statistics)
    nearest_only = ScoreSpec("standardized", {"reconstruction": 0.0, "intra": 0.0, "inter": 0.0, "nearest": 1.0},
                             spec.statistics)
    detector.score_spec = uses_all
    assert unused_correlations_note(detector) is None
    detector.score_spec = ScoreSpec("product")
    assert unused_correlations_note(detector) is None
    detector.score_spec = nearest_only
    note = unused_correlations_note(detector)
    assert note is not None and "intra and inter correlations" in note and "nearest good patch" in note

    update_metadata("test-model", {"score": nearest_only.to_dict()}, root=models_env_copy)
    at = _app("pages/4_explore.py")
    at.selectbox(key="explore_sample").set_value(SAMPLES / "defect_03.png").run()
    _ok(at)
    infos = " ".join(str(i.value) for i in at.info)
    assert "does not use the intra and inter correlations" in infos
    assert "nearest good patch" in " ".join(str(c.value) for c in at.caption)  # what the score is made of


def test_explore_offers_the_last_inspection(models_env: Path) -> None:
    at = _app("pages/3_inspect.py")
    _inspect_samples(at)
    at.switch_page("pages/4_explore.py").run()
    _ok(at)
    assert at.radio(key="explore_source").value == "From the last inspection"
    options = at.selectbox(key="explore_inspected").options
    assert len(options) == 4
    at.selectbox(key="explore_inspected").set_value("good_03.png").run()
    _ok(at)
    assert "good_03.png" in _markdown(at)
    assert "Intra KL" in at.table[0].value.index


def test_explore_upload_unreadable_image_shows_error(models_env: Path) -> None:
    at = _app("pages/4_explore.py")
    at.radio(key="explore_source").set_value("Upload an image").run()
    at.file_uploader(key="explore_upload").set_value(("part.png", b"garbage", "image/png")).run()
    _ok(at)
    assert any("part.png" in e.value and "not a readable image" in e.value for e in at.error)


def test_explanation_timings_on_cpu(models_env: Path) -> None:
    """Prints how long the model run and a patch query take (no assertion on time)."""
    detector = load_bundle("test-model", models_env, device="cpu")
    image = prepare_image(load_image(SAMPLES / "defect_01.png"), detector.config.image_size)
    explain_image(detector, image)  # warm-up
    started = time.perf_counter()
    explanation = explain_image(detector, image)
    explain_s = time.perf_counter() - started
    grid = explanation.grids[0]
    started = time.perf_counter()
    n = 50
    for i in range(n):
        patch = explanation.patch(0, i % explanation.n_layers, None if i % 2 else 0, i % grid[0], (3 * i) % grid[1])
    patch_ms = 1000 * (time.perf_counter() - started) / n
    print(f"\n[timing] explain_image {explain_s:.2f} s on CPU; patch() {patch_ms:.2f} ms per query "
          f"(grid {grid}, {explanation.n_layers} layers, {explanation.n_heads} heads)")
    assert np.isclose(patch.intra_correlation.sum(), 1.0, atol=1e-3)


# --------------------------------------------------------------------------- Evaluate


@pytest.fixture
def small_bottle(tmp_path: Path) -> Path:
    """A small MVTec-layout subset of the real bottle category: 4 train/good, 4 test/good, 4 defective."""
    root = tmp_path / "data" / "bottle_small"
    files = [f"train/good/00{i}.png" for i in range(4)] + [f"test/good/00{i}.png" for i in range(4)]
    for defect in ("broken_large", "contamination"):
        for i in range(2):
            files += [f"test/{defect}/00{i}.png", f"ground_truth/{defect}/00{i}_mask.png"]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(BOTTLE / rel, root / rel)
    return root


def test_evaluate_refuses_folders_outside_the_data_roots(models_env: Path) -> None:
    at = _app("pages/5_evaluate.py")
    at.text_input(key="evaluate_path").set_value("../shared/datasets/mvtec_bottle").run()
    _ok(at)
    errors = " ".join(e.value for e in at.error)
    assert "outside the allowed data folders" in errors
    assert not any(b.label == "Evaluate" for b in at.button)


def test_evaluate_server_path_with_data_root_shows_dataset(models_env: Path, monkeypatch) -> None:
    monkeypatch.setenv("FOD_DATA_ROOTS", str(BOTTLE.parent))
    at = _app("pages/5_evaluate.py")
    at.text_input(key="evaluate_path").set_value("../shared/datasets/mvtec_bottle").run()
    _ok(at)
    assert not at.error
    assert "83 test images" in _markdown(at) and "20 good, 63 defective" in _markdown(at)


def test_evaluate_small_subset_shows_metrics(models_env_copy: Path, small_bottle: Path, monkeypatch) -> None:
    monkeypatch.setenv("FOD_DATA_ROOTS", str(small_bottle.parent))
    at = _app("pages/5_evaluate.py")
    at.text_input(key="evaluate_path").set_value(str(small_bottle)).run()
    _ok(at)
    assert "8 test images" in _markdown(at)
    at.button(key="evaluate_run").click().run()
    _ok(at)
    metrics = _metrics(at)
    for name in ("Image AUROC", "Pixel AUROC", "AUPRO (FPR ≤ 30%)", "F1-max"):
        value = metrics[name]
        assert value == "n/a" or 0.0 <= float(value) <= 1.0, (name, value)
    assert metrics["Image AUROC"] != "n/a" and metrics["Pixel AUROC"] != "n/a"
    assert re.fullmatch(r"\d of 4 \(\d+%\)", metrics["Good parts rejected"])
    assert re.fullmatch(r"\d of 4 \(\d+%\)", metrics["Defects missed"])
    done = " ".join(s.value for s in at.success)
    assert re.search(r"Evaluated 8 images in .* inspecting one image takes \d+ ms", done), done
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    for title in ("ROC curve", "Precision-recall curve", "Scores of good vs defective", "Confusion matrix at"):
        assert any(title in spec for spec in specs), title
    types = next(df.value for df in at.dataframe if "Type" in df.value.columns)
    assert list(types["Type"]) == ["good", "broken_large", "contamination"]
    assert list(types["Images"]) == [4, 2, 2]
    from fod_app.history import HistoryStore

    (saved,) = HistoryStore().evaluations("test-model")  # an evaluation record; the bundle is not touched
    assert (saved.n_good, saved.n_defect, saved.dataset_path) == (4, 4, str(small_bottle))
    assert "metrics" not in read_metadata("test-model", models_env_copy)

    # the F1-optimal threshold is offered, labelled, and applied only on request
    assert at.slider(key="evaluate_threshold_w").value == 1.0
    assert "F1-optimal threshold on this labelled set" in _markdown(at)
    offer = at.button(key="evaluate_use_f1")
    best = float(offer.label.split()[1])
    offer.click().run()
    _ok(at)
    assert at.slider(key="evaluate_threshold_w").value == pytest.approx(best)
    assert f"Confusion matrix at threshold {best:.2f}" in " ".join(c.proto.spec for c in at.get("plotly_chart"))

    # the Evaluate threshold is this page's own: Inspect keeps the calibrated threshold
    at.switch_page("pages/3_inspect.py").run()
    _ok(at)
    _sample_button(at).click().run()
    assert at.slider(key="inspect_threshold_w").value == pytest.approx(1.0)


def test_evaluate_zip_upload(models_env_copy: Path, small_bottle: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(small_bottle.rglob("*.png")):
            archive.write(path, f"bottle_small/{path.relative_to(small_bottle).as_posix()}")
    at = _app("pages/5_evaluate.py")
    at.radio(key="evaluate_source").set_value("Upload a zip").run()
    at.file_uploader(key="evaluate_upload").set_value(("bottle.zip", buffer.getvalue(), "application/zip")).run()
    _ok(at)
    assert "8 test images" in _markdown(at)
    at.button(key="evaluate_run").click().run()
    _ok(at)
    assert "Image AUROC" in _metrics(at)
    # another zip replaces the first: its unpacked images are removed at once (not left in the temporary folder)
    first = at.session_state["evaluate_zip"]["folder"].path
    assert (first / "bottle_small").is_dir()
    smaller = io.BytesIO()
    with zipfile.ZipFile(smaller, "w") as archive:
        for path in sorted(small_bottle.rglob("*.png"))[:6]:
            archive.write(path, f"bottle_small/{path.relative_to(small_bottle).as_posix()}")
    at.file_uploader(key="evaluate_upload").set_value(("smaller.zip", smaller.getvalue(), "application/zip")).run()
    _ok(at)
    assert not first.exists() and at.session_state["evaluate_zip"]["folder"].path.is_dir()


# --------------------------------------------------------------------------- chart builders (no model)


def test_chart_builders_make_valid_figures() -> None:
    import json
    from types import SimpleNamespace

    from fod_app.ui import charts

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    amap = rng.random((64, 64)).astype(np.float32) * 2
    grid_fig = charts.patch_grid_figure(image, (8, 8), selected=(2, 3), patch_scores=rng.random((8, 8)),
                                        map_units=amap, opacity=0.4)
    spec = json.loads(grid_fig.to_json())
    patches = next(t for t in spec["data"] if t.get("name") == "patches")
    # plain [row, col, score] lists: typed arrays would reach the click handler as {"0": row, "1": col}
    assert patches["customdata"][8 * 2 + 3][:2] == [2, 3] and patches["x"][8 * 2 + 3] == 4
    assert spec["layout"]["clickmode"] == "event+select"
    for g in [(32, 32), (16, 16), (7, 9)]:
        dist = rng.random(g)
        dist /= dist.sum()
        patch = SimpleNamespace(intra_correlation=dist, intra_target=dist, inter_correlation=dist,
                                inter_target=dist, grid=g, row=1, col=2, log_floor=1e-8)
        for log in (False, True):
            figure = charts.correlation_figure(patch, log_colours=log)
            assert len(figure.data) == 8
            if log:  # logarithmic colours start at the KL's own log floor (``PatchExplanation.log_floor``)
                assert figure.layout.coloraxis.cmin == pytest.approx(-8.0)
    bar = charts.overlay_figure(image, amap, 0.5, threshold=1.3).to_dict()["data"][-1]["marker"]["colorbar"]
    assert any("1.30 your threshold" in t for t in bar["ticktext"]) and any("calibrated" in t for t in bar["ticktext"])
    charts.branch_map_figure(amap, "score", fixed_scale=True)
    charts.branch_map_figure(np.zeros((64, 64)), "flat")  # constant map must not break the colour range
    charts.score_histogram([("good", [0.2, 0.5], charts.GOOD_COLOUR), ("bad", [], charts.DEFECT_COLOUR)], 1.0, 0.8)
    charts.roc_figure({"fpr": [0, 0.5, 1], "tpr": [0, 1, 1], "thresholds": [2, 1, 0]}, 0.75)
    charts.roc_figure({"fpr": [], "tpr": [], "thresholds": []}, float("nan"))
    charts.pr_figure({"precision": [0.5, 1, 1], "recall": [1, 0.5, 0], "thresholds": [0.1, 0.9]}, 0.8)
    charts.confusion_figure({"tp": 3, "fp": 1, "tn": 5, "fn": 0}, 1.0)
