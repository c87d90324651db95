"""Side-by-side explorer helpers (``fod_app.compare``, ``fod_app.sigma_check``, ``fod_app.explain_png``) on the real
test model, and the Explore page's side-by-side mode through AppTest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from fod_app import patch_compare as compare
from fod_app import sigma_check
from fod_app.bundle import load_bundle
from fod_app.data import load_image, prepare_image
from fod_app.explain import explain_image
from fod_app.explain_png import comparison_png
from fod_app.ui import charts
from fod_app.visualize import image_to_uint8

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_data" / "inspect"


@pytest.fixture(scope="module")
def explained(trained_models_dir: Path):
    detector = load_bundle("test-model", trained_models_dir, device="cpu")
    image = prepare_image(load_image(SAMPLES / "defect_03.png"), detector.config.image_size)
    return detector, image, explain_image(detector, image)


def test_score_terms_add_up_to_the_final_map_patch_and_image_score(explained) -> None:
    detector, _, explanation = explained
    total = sum(explanation.term_maps.values())
    assert np.allclose(total, explanation.maps["score"], atol=1e-4)
    if detector.score_spec.mode == "standardized":
        assert set(explanation.term_maps) <= {"reconstruction", "intra", "inter", "nearest"}
    terms, (y, x) = compare.image_score_terms(explanation)
    assert sum(terms.values()) == pytest.approx(explanation.image_score, abs=1e-4)
    assert explanation.maps["score"][y, x] == pytest.approx(explanation.maps["score"].max())
    scores = compare.patch_scores(explanation, 0)
    for row, col in [(0, 0), (5, 7), (scores.shape[0] - 1, scores.shape[1] - 1)]:
        assert sum(compare.patch_terms(explanation, 0, row, col).values()) == pytest.approx(scores[row, col], abs=1e-4)


def test_suggested_pair_is_the_most_anomalous_and_a_typical_normal_patch(explained) -> None:
    _, _, explanation = explained
    for level, grid in enumerate(explanation.grids):
        scores = compare.patch_scores(explanation, level)
        pinned = compare.most_anomalous_patch(explanation, level)
        assert scores[pinned] == scores.max()
        normal = compare.typical_normal_patch(explanation, level, pinned)
        assert normal != pinned
        assert np.hypot(normal[0] - pinned[0], normal[1] - pinned[1]) >= max(grid) / 4
        # typical: its score is closer to the median than to the maximum
        assert abs(scores[normal] - np.median(scores)) < abs(scores.max() - np.median(scores))


def test_comparison_shares_one_colour_range_and_exports(explained) -> None:
    detector, image, explanation = explained
    pinned = compare.most_anomalous_patch(explanation, 0)
    normal = compare.typical_normal_patch(explanation, 0, pinned)
    for log in (False, True):
        comparison = compare.compare_patches(explanation, 0, 1, None, [("A", pinned), ("B", normal)], log)
        low, high = comparison.colour_range
        assert high == pytest.approx(max(float(p.max()) for v in comparison.views for p in compare.panels(v.patch)))
        assert low == (detector.config.score_eps if log else 0.0) and (not log or low == 1e-8)
        for view in comparison.views:
            assert sum(view.terms.values()) == pytest.approx(view.score, abs=1e-4)
        assert set(comparison.agreement()) == set(comparison.views[0].terms)
        fig = charts.comparison_figure(comparison)
        heatmaps = [t for t in fig.data if t.type == "heatmap"]
        assert len(heatmaps) == 1  # all eight panels tiled into one heat map: one colour scale by construction
        assert heatmaps[0].colorbar.title.text.startswith("weight") and heatmaps[0].showscale is not False
        weights = np.asarray(heatmaps[0].customdata, dtype=float)
        panels_total = sum(float(p.sum()) for v in comparison.views for p in compare.panels(v.patch))
        assert weights.sum() == pytest.approx(panels_total, rel=1e-3)  # every panel is in the picture
        assert sum(1 for a in fig.layout.annotations if a.text.startswith(("Intra", "Inter"))) == 8
    record = compare.comparison_record(comparison, explanation, "defect_03.png", "test-model", "1", ["a note"])
    text = json.dumps(record)
    assert json.loads(text)["patches"][0]["row"] == pinned[0] + 1
    first = record["patches"][0]
    assert sum(first["score_terms"].values()) == pytest.approx(first["patch_score"], abs=1e-4)
    assert sum(record["image_score_terms"].values()) == pytest.approx(record["image_score"], abs=1e-4)
    png = comparison_png(comparison, image_to_uint8(image), "defect_03.png")
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.width > 1000 and picture.height > 400


def _fake_sigma(explanation, branch: str, value: float):
    states = explanation.inter if branch == "inter" else explanation.intra
    for level in range(len(states)):
        states[level] = [(corr, torch.full_like(sigma, value)) for corr, sigma in states[level]]


def test_sigma_notes_flag_collapsed_saturated_and_untrained_targets(explained) -> None:
    _, _, real = explained
    explanation = compare.ImageExplanation(**{k: getattr(real, k) for k in real.__dataclass_fields__})
    explanation.intra = [list(level) for level in real.intra]
    explanation.inter = [list(level) for level in real.inter]
    _fake_sigma(explanation, "inter", sigma_check.SIGMA_LOW)
    _fake_sigma(explanation, "intra", sigma_check.SIGMA_HIGH)
    notes = sigma_check.sigma_notes(explanation)
    assert any("Inter targets at level 1" in n and "collapsed" in n for n in notes)
    assert any("Intra targets at level 1" in n and "widest" in n for n in notes)
    # each degenerate target says what training does to it (measured: BENCHMARKS.md "Twenty-fourth session")
    assert any(n.startswith("Intra") and sigma_check.INTRA_SATURATED_CAUSE in n for n in notes)
    assert any(n.startswith("Inter") and sigma_check.INTER_COLLAPSED_CAUSE in n for n in notes)
    assert not any(n.startswith("Inter") and sigma_check.INTRA_SATURATED_CAUSE in n for n in notes)
    summary = sigma_check.sigma_summary(explanation)
    assert "inter σ collapsed to a dot" in summary and "intra σ stuck at its maximum" in summary
    _fake_sigma(explanation, "inter", sigma_check.SIGMA_START)
    _fake_sigma(explanation, "intra", 1.0)
    notes = sigma_check.sigma_notes(explanation)
    assert any("not trained" in n for n in notes) and not any("Intra" in n for n in notes)
    assert sigma_check.patch_sigma_note((1e-5, 2e-5), "inter") is not None
    assert sigma_check.patch_sigma_note((0.8, 1.1), "inter") is None


def test_explore_page_side_by_side(models_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOD_DEVICE", "cpu")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    at.switch_page("pages/4_explore.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.selectbox(key="explore_sample").set_value(SAMPLES / "defect_03.png").run()
    assert not at.exception
    pinned, selected = at.session_state["explore_pinned"], at.session_state["explore_patch"]
    assert pinned != selected
    table = at.table[0].value
    assert len(table.columns) == 2 and table.columns[0].startswith(f"A · row {pinned[0] + 1}, col {pinned[1] + 1}")
    terms = [float(v) for v in table.iloc[:, 0][: table.index.get_loc("= Patch score")]]
    assert sum(terms) == pytest.approx(float(table.iloc[:, 0]["= Patch score"]), abs=2e-3)
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any('"coloraxis"' in s and '"colorbar"' in s and "Inter target" in s for s in specs)
    # pin B as A, then swap back
    next(b for b in at.button if b.label == "Pin B as A").click().run()
    assert at.session_state["explore_pinned"] == selected
    at.number_input(key="explore_row_w").set_value(3).run()
    next(b for b in at.button if b.label == "Swap A ↔ B").click().run()
    assert at.session_state["explore_pinned"][0] == 2 and at.session_state["explore_patch"] == selected
    # single-patch mode: one column
    at.toggle(key="explore_compare").set_value(False).run()
    assert len(at.table[0].value.columns) == 1
    assert not at.exception
    assert any("Model-quality" in e.label for e in at.expander) or not at.warning
