"""Jobs that belong to the server, honest ETA, the explicit active model, and the Models page calibration summary.

Unit tests of the job manager (a job outlives the session that started it; anyone may cancel; the result is
visible to every session) and AppTest tests of the sidebar, the Train and Models pages.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fod_app import jobs
from fod_app.active import read_active_model, write_active_model
from fod_app.bundle import models_dir, read_metadata
from fod_app.calibration import Calibration, rule_text
from fod_app.config import create_config
from fod_app.data import list_images
from fod_app.jobs import CANCELLED, DONE, JobResult, TrainingJobManager, TrainingSpec, get_job_manager
from fod_app.training import Progress
from fod_app.ui.training_view import percent

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
SAMPLE_TRAIN = REPO / "sample_data" / "train_good"
TIMEOUT = 120

pytestmark = pytest.mark.usefixtures("fresh_jobs")  # idle job manager, CPU engine (conftest.py)


def _spec(name: str = "job-model", owner: str = "tab-1") -> TrainingSpec:
    return TrainingSpec(name=name, sources=list_images(SAMPLE_TRAIN)[:12], preset="quick", owner=owner)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch):
    """A fake worker that reports training progress, then waits; set ``finish`` to end it with a result."""
    release, finish = threading.Event(), {"result": True}

    def fake(job: jobs.Job) -> JobResult:
        job._report(Progress("training", epoch=1, epochs=4, step=1, steps=40, fraction=0.025, losses={"x": 1.0}))
        assert release.wait(60)
        if job.cancel_requested:
            raise jobs._Cancelled()
        root = models_dir()
        if (root / "test-model").is_dir():  # a real bundle under the job's name, as a real job leaves one
            _newer_copy(root, job.name)
        return JobResult(job.name, "", 0.1, 0.99, 0.01, 0.0, [0.5, 0.8, 0.9, 1.01], 60, 51, 9, 12.0, "CPU")

    monkeypatch.setattr(jobs, "_train_and_save", fake)
    yield release, finish
    release.set()


def _wait_phase(job: jobs.Job, phase: str = "training") -> None:
    deadline = time.time() + 10
    while job.phase != phase and time.time() < deadline:
        time.sleep(0.01)
    assert job.phase == phase


# --------------------------------------------------------------------------- job manager (unit)


def test_job_survives_its_session_and_anyone_can_cancel(tmp_path: Path, monkeypatch, gated) -> None:
    monkeypatch.setenv("FOD_MODELS_DIR", str(tmp_path / "models"))
    release, _ = gated
    manager = TrainingJobManager()
    job = manager.start(_spec(owner="tab-1"))
    _wait_phase(job)
    # the tab reloads: a new session id; the job is still the server's running job
    assert manager.active() is job and job.owned_by("tab-1") and not job.owned_by("tab-2")
    assert manager.latest(owner="tab-2") is None and manager.latest() is job
    job.cancel(by="tab-2")  # a non-owner, after confirming in the UI
    assert job.cancel_requested and job.cancelled_by == "tab-2"
    job.cancel(by="tab-1")  # a later request does not overwrite who asked first
    assert job.cancelled_by == "tab-2"
    release.set()
    assert job.wait(10) and job.state == CANCELLED


def test_finished_result_is_visible_to_every_session(tmp_path: Path, monkeypatch, gated) -> None:
    monkeypatch.setenv("FOD_MODELS_DIR", str(tmp_path / "models"))
    release, _ = gated
    manager = TrainingJobManager()
    job = manager.start(_spec(owner="tab-1"))
    release.set()
    assert job.wait(10) and job.state == DONE
    for session in ("tab-1", "tab-2", None):
        latest = manager.latest() if session != "tab-1" else manager.latest(owner=session)
        assert latest is job and latest.result is not None and latest.result.n_calibration == 9


def test_eta_uses_the_measured_recent_pace_and_says_what_it_assumes(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 1000.0}
    monkeypatch.setattr(jobs.time, "time", lambda: clock["now"])
    job = jobs.Job(_spec(), create_config("cpu"))  # 170 steps > the floor: self-checks during training
    job._set(phase="features")
    assert job.eta_s is None and "once the learning step has run a few steps" in job.eta_note()
    # 10 steps at 0.5 s, then the machine gets busy: 60 steps at 2 s (the window holds the last 50)
    step = 0
    for dt, n in ((0.5, 10), (2.0, 60)):
        for _ in range(n):
            clock["now"] += dt
            step += 1
            job._report(Progress("training", epoch=1, epochs=1, step=step, steps=170, losses={"x": 1.0}))
    pace, measured = job.pace_s
    assert measured == jobs.ETA_WINDOW_STEPS and pace == pytest.approx(2.0)
    assert job.eta_s == pytest.approx(2.0 * 100)  # 100 steps left at the recent pace, not the early 0.5 s
    clock["now"] += 10  # time passes without a new step: the estimate counts down
    assert job.eta_s == pytest.approx(190)
    note = job.eta_note()
    assert "remaining 100 of 170 learning steps" in note and "last 50 (2.00 s per step; self-checks included)" in note
    assert "machine stays as busy as now" in note
    # a budget at the step floor cannot stop early: no self-check during training, one at the end
    floor = job.config.min_steps
    job._report(Progress("training", epoch=1, epochs=1, step=step + 1, steps=floor, losses={"x": 1.0}))
    note = job.eta_note()
    assert "the self-check at the end comes on top" in note and "may stop earlier" not in note


def test_job_result_from_bundle_metadata(models_env: Path) -> None:
    meta = read_metadata("test-model")
    result = JobResult.from_metadata(meta)
    cal = meta["calibration"]
    assert result.model_name == "test-model" and result.threshold == cal["threshold"]
    assert result.n_calibration == len(cal["good_scores"]) == meta["training"]["n_calibration"]
    assert result.expected_false_reject_rate == pytest.approx(1 - cal["quantile"])
    assert max(result.good_scores) == pytest.approx(max(cal["good_scores"]) / cal["threshold"])


def test_remembered_active_model_is_written_atomically(tmp_path: Path) -> None:
    assert read_active_model(tmp_path) is None
    assert write_active_model("line-2", by="s1", root=tmp_path)
    assert read_active_model(tmp_path) == "line-2"
    assert [p.name for p in tmp_path.iterdir()] == ["active_model.json"]  # no temporary left behind
    (tmp_path / "active_model.json").write_text("{not json")
    assert read_active_model(tmp_path) is None  # unreadable: ignored (logged), not an error
    assert write_active_model(None, root=tmp_path) and not (tmp_path / "active_model.json").exists()


# --------------------------------------------------------------------------- app (AppTest)


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(at, kind: str) -> list[str]:
    return [str(element.value) for element in getattr(at, kind)]


def _newer_copy(root: Path, name: str) -> None:
    """A second, newer model (a copy of test-model with a later creation time)."""
    shutil.copytree(root / "test-model", root / name)
    meta_path = root / name / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["name"], meta["created"] = name, "2099-01-01T00:00:00+00:00"
    meta_path.write_text(json.dumps(meta))


def test_models_page_shows_the_calibration_summary_of_every_model(models_env_copy: Path) -> None:
    at = _app("pages/6_models.py")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Threshold"] == "1.0" and metrics["Expected false rejects"] == "1%"
    n_cal = read_metadata("test-model")["training"]["n_calibration"]
    assert metrics["Held-back good images above the threshold"].startswith(tuple(f"{k} of {n_cal} (" for k in (0, 1)))
    assert any("How strict is the model?" in m for m in _texts(at, "markdown"))
    assert at.get("plotly_chart"), "the held-back good-score histogram is drawn"
    assert any("**Wrong-part check**: on." in c for c in _texts(at, "caption"))
    calibration = Calibration.from_dict(read_metadata("test-model")["calibration"])
    caught = f"**Synthetic defects caught at this threshold: {percent(calibration.synthetic_catch_rate())}** ("
    assert any(m.startswith(caught) for m in _texts(at, "markdown")), "the label-free catch rate is shown"
    how = f"**How the threshold was set**: {rule_text(calibration.rule, calibration.quantile)}."
    assert calibration.rule and how in _texts(at, "caption"), "the rule that set the threshold is said in words"
    # an old model without the wrong-part reference: the summary still shows, the check is "not available"
    _newer_copy(models_env_copy, "old-model")
    meta_path = models_env_copy / "old-model" / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("familiarity")
    meta["calibration"].pop("synthetic_scores")
    meta["calibration"].pop("threshold_rule")
    meta_path.write_text(json.dumps(meta))
    at.run()
    at.selectbox(key="models_selected").set_value("old-model").run()
    assert not at.exception, [e.value for e in at.exception]
    assert {m.label: m.value for m in at.metric}["Threshold"] == "1.0"
    assert any("**Wrong-part check**: not available" in c for c in _texts(at, "caption"))
    assert not any("Synthetic defects caught" in m for m in _texts(at, "markdown"))
    assert not any(c.startswith("**How the threshold was set**") for c in _texts(at, "caption"))


def test_reload_keeps_the_chosen_model_not_the_newest(models_env_copy: Path) -> None:
    _newer_copy(models_env_copy, "zz-newer")
    write_active_model(None, root=models_env_copy)  # nothing chosen yet on this workstation
    first = _app()
    assert "Active model: **zz-newer** (the newest model: none was chosen yet" in " ".join(
        _texts(first.sidebar, "caption")
    )
    first.switch_page("pages/6_models.py").run()
    first.selectbox(key="models_selected").set_value("test-model").run()
    first.button(key="models_activate_test-model").click().run()
    assert first.session_state["active_model"] == "test-model"
    reloaded = _app()  # a new session: the remembered choice, said so
    assert reloaded.session_state["active_model"] == "test-model"
    sidebar = " ".join(_texts(reloaded.sidebar, "caption"))
    assert "Active model: **test-model** (the model last chosen on this workstation)" in sidebar


def test_reloaded_tab_follows_cancels_and_gets_the_result(models_env_copy: Path, gated) -> None:
    release, _ = gated
    write_active_model("test-model")  # chosen earlier on this workstation
    job = get_job_manager().start(_spec(name="new-model", owner="the-tab-before-reload"))
    _wait_phase(job)
    at = _app()  # the reloaded tab: another session id
    sidebar_md = " ".join(_texts(at.sidebar, "markdown"))
    assert "**Training “new-model”**" in sidebar_md
    assert at.sidebar.get("progress")
    assert "Started in another tab or by another user." in " ".join(_texts(at.sidebar, "caption"))
    # the Train page shows the running job (not a form), with a cancel that asks first
    at.switch_page("pages/2_train.py").run()
    assert any(s.value == "Training “new-model”" for s in at.subheader)
    assert not any(r.key == "train_source" for r in at.radio)
    at.button(key=f"cancel_{job.id}").click().run()
    assert not job.cancel_requested, "a non-owner is asked to confirm first"
    assert "Stop the training of “new-model”?" in " ".join(_texts(at, "warning"))
    at.button(key=f"cancel_no_{job.id}").click().run()
    assert not job.cancel_requested
    release.set()
    assert job.wait(10) and job.state == DONE
    # every session is told the outcome and asked before the active model changes
    other = _app()
    assert other.session_state["active_model"] == "test-model"
    assert any("Model **new-model** is ready" in s for s in _texts(other.sidebar, "success"))
    assert "**Use “new-model” now?** The active model is still **test-model**" in " ".join(
        _texts(other.sidebar, "markdown")
    )
    other.sidebar.button(key=f"activate_side_{job.id}").click().run()
    assert not other.exception, [e.value for e in other.exception]
    assert other.session_state["active_model"] == "new-model"
    assert read_active_model() == "new-model"


def test_non_owner_cancel_after_confirmation(models_env_copy: Path, gated) -> None:
    release, _ = gated
    job = get_job_manager().start(_spec(name="other-job", owner="someone-else"))
    _wait_phase(job)
    at = _app("pages/2_train.py")
    at.button(key=f"cancel_{job.id}").click().run()
    at.button(key=f"cancel_yes_{job.id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert job.cancel_requested and job.cancelled_by == at.session_state["fod_session_id"]
    release.set()
    assert job.wait(10) and job.state == CANCELLED
