"""AppTest tests of the label-free self-check as users see it: Models page details and the training outcome."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest
from test_app_home_train_models import _app, _texts

from fod_app import jobs
from fod_app.bundle import update_metadata
from fod_app.jobs import DONE, JobResult, get_job_manager
from fod_app.selfcheck import describe

MODEL = "test-model"


pytestmark = pytest.mark.usefixtures("fresh_jobs")  # idle job manager, CPU engine (conftest.py)


def _record(auroc: float, **changes: Any) -> dict[str, Any]:
    record = {
        "method": "Cut-and-paste patches, scars and blended foreign texture on held-out good images.",
        "n_good": 12,
        "n_synthetic": 36,
        "auroc": auroc,
        "per_branch": {"reconstruction": 0.874, "intra": 0.912, "inter": None, "combined": auroc},
        "score": {"mode": "weighted", "weights": {"reconstruction": 1.0, "intra": 0.5, "inter": 0.0}},
        "curve": [{"step": 10, "auroc": 0.71, "trained": 0.70}, {"step": 20, "auroc": auroc, "trained": 0.88},
                  {"step": 30, "auroc": auroc - 0.02, "trained": 0.86}],
        "best_step": 20,
        "steps_run": 30,
    }
    record.update(changes)
    return record


def _shown_text(at: AppTest) -> str:
    return " ".join(_texts(at, "markdown") + _texts(at, "caption"))


def test_models_page_shows_self_check_sentence_table_and_curve(models_env_copy: Path) -> None:
    record = _record(0.931)
    update_metadata(MODEL, {"self_check": record}, root=models_env_copy)
    at = _app("pages/6_models.py")
    text = _shown_text(at)
    message, warning = describe(record)
    assert warning is None
    assert message in text and "AUROC 0.93" in message
    assert "no real defect labels" in text
    assert not any("Self-check AUROC" in w for w in _texts(at, "warning"))
    table = at.table[0].value
    rows = dict(zip(table["Branch"], table["Self-check AUROC"], strict=True))
    assert rows["Reconstruction"] == "0.874" and rows["Combined"] == "0.931"
    assert rows["Intra-image (patterns within the image)"] == "0.912"
    assert rows["Inter-image (patterns vs. the reference)"] == "—"  # branch not in this model
    assert "`weighted`" in text and "reconstruction 1.000, intra 0.500, inter 0.000" in text
    assert "weights of step 20" in text and "30 steps run" in text and "early stopping follows" in text
    curve = _self_check_chart(at)
    kept, trained, star = curve["data"]
    assert kept["x"] == [10, 20, 30] and trained["x"] == [10, 20, 30]
    assert trained["y"] == [0.70, 0.88, 0.86], "the curve early stopping followed is drawn"
    assert star["x"] == [20] and star["y"] == [0.88], "the kept step is marked on the curve that chose it"


def _self_check_chart(at: AppTest) -> dict[str, Any]:
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return next(c for c in charts if "Self-check AUROC" in c["layout"].get("title", {}).get("text", ""))


def test_models_page_draws_an_older_models_single_curve(models_env_copy: Path) -> None:
    """Bundles trained before early stopping followed the trained branches have one curve: drawn, starred."""
    record = _record(0.931, curve=[{"step": 10, "auroc": 0.71}, {"step": 20, "auroc": 0.931}])
    update_metadata(MODEL, {"self_check": record}, root=models_env_copy)
    line, star = _self_check_chart(_app("pages/6_models.py"))["data"]
    assert line["x"] == [10, 20] and star["x"] == [20] and star["y"] == [0.931]


def test_models_page_warns_about_a_poor_self_check(models_env_copy: Path) -> None:
    record = _record(0.6)
    update_metadata(MODEL, {"self_check": record}, root=models_env_copy)
    at = _app("pages/6_models.py")
    message, warning = describe(record)
    assert warning is not None and "0.60" in warning
    assert warning in _texts(at, "warning")
    assert message in _shown_text(at)


def test_models_page_without_self_check_says_so(models_env_copy: Path) -> None:
    meta_path = models_env_copy / MODEL / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("self_check", None)  # a model trained before the self-check existed
    meta_path.write_text(json.dumps(meta))
    at = _app("pages/6_models.py")
    assert not at.exception, [e.value for e in at.exception]
    assert "No self-check was recorded for this model" in _shown_text(at)
    assert not at.table, "no per-branch table without a record"
    assert not _texts(at, "warning")


def test_training_outcome_shows_self_check_warning(models_env_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = _record(0.62)

    def fake(job: jobs.Job) -> JobResult:
        return JobResult(job.name, "", 0.1, 0.99, 0.01, 0.0, [0.5, 0.8, 0.9], 60, 51, 9, 12.0, "CPU", self_check=record)

    monkeypatch.setattr(jobs, "_train_and_save", fake)
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Sample data").run()
    at.button(key="train_start").click().run()
    job = get_job_manager().latest()
    assert job is not None and job.wait(10) and job.state == DONE
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("is ready" in s for s in _texts(at, "success"))
    message, warning = describe(record)
    assert "0.62" in message and warning is not None and "0.62" in warning
    assert message in _shown_text(at)
    assert warning in _texts(at, "warning")
