"""Unit tests for the background training job manager (fod_app.jobs)."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest

from fod_app import jobs
from fod_app.bundle import list_bundles
from fod_app.data import list_images
from fod_app.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    MAX_HISTORY,
    BusyError,
    JobError,
    JobResult,
    TrainingJobManager,
    TrainingSpec,
)
from fod_app.training import Progress

SAMPLE_TRAIN = Path(__file__).resolve().parents[1] / "sample_data" / "train_good"


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrainingJobManager:
    monkeypatch.setenv("FOD_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.delenv(jobs.DEMO_EPOCHS_ENV, raising=False)
    return TrainingJobManager()


def _spec(name: str = "job-model", owner: str = "alice", n: int = 12) -> TrainingSpec:
    return TrainingSpec(name=name, sources=list_images(SAMPLE_TRAIN)[:n], preset="quick", owner=owner)


def _fake_result(name: str) -> JobResult:
    return JobResult(name, "", 1.0, 0.99, 0.01, 0.0, [0.5, 0.7], 12, 8, 4, 1.0, "CPU")


@pytest.fixture
def blocking(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Replace the worker body by one that waits for the returned event."""
    release = threading.Event()

    def fake(job: jobs.Job) -> JobResult:
        job._report(Progress("training", epoch=1, epochs=4, step=5, steps=10, fraction=0.5, losses={"a": 1.0}))
        assert release.wait(30)
        return _fake_result(job.name)

    monkeypatch.setattr(jobs, "_train_and_save", fake)
    yield release
    release.set()


def test_second_start_while_running_is_busy(manager: TrainingJobManager, blocking: threading.Event) -> None:
    first = manager.start(_spec(owner="alice"))
    deadline = time.time() + 10
    while first.phase != "training" and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(BusyError) as err:
        manager.start(_spec(name="other-model", owner="bob"))
    message = str(err.value)
    assert re.fullmatch(
        r"A training job is already running \(started by another session at \d\d:\d\d, \d+% done\)\. "
        r"Try again when it finishes\.",
        message,
    ), message
    assert "55% done" in message  # training phase half done: 15% + 0.5 * 80%
    with pytest.raises(BusyError, match="started by you"):
        manager.start(_spec(owner="alice"))
    assert manager.active() is first
    blocking.set()
    assert first.wait(10)
    assert first.state == DONE and first.result is not None
    assert manager.active() is None
    second = manager.start(_spec(name="other-model", owner="bob"))  # free again
    assert second.wait(10) and second.state == DONE
    assert manager.latest("alice") is first and manager.latest("bob") is second and manager.latest() is second


def test_invalid_requests_are_refused_before_starting(manager: TrainingJobManager) -> None:
    with pytest.raises(JobError, match="Invalid model name"):
        manager.start(_spec(name="bad name!"))
    with pytest.raises(JobError, match="at least 10 good images"):
        manager.start(_spec(n=3))
    with pytest.raises(JobError, match="Invalid training settings"):
        manager.start(TrainingSpec(name="x", sources=list_images(SAMPLE_TRAIN)[:12], preset="nope"))
    assert manager.jobs() == []


def test_demo_epochs_env_overrides_every_job(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TrainingSpec(name="x", sources=[], preset="cpu", epochs=50)
    assert spec.build_config().epochs == 50
    monkeypatch.setenv(jobs.DEMO_EPOCHS_ENV, "1")
    assert spec.build_config().epochs == 1
    assert TrainingSpec(name="x", sources=[], preset="paper").build_config().epochs == 1
    monkeypatch.setenv(jobs.DEMO_EPOCHS_ENV, "not-a-number")
    assert spec.build_config().epochs == 50


def test_cancel_during_training_leaves_no_bundle(manager: TrainingJobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real training run, cancelled in the learning phase: nothing is saved, the job says cancelled."""
    monkeypatch.setenv("FOD_DEVICE", "cpu")
    job = manager.start(_spec(name="cancel-me", n=12))
    deadline = time.time() + 180
    while job.phase != "training" and job.active and time.time() < deadline:
        time.sleep(0.05)
    assert job.phase == "training", (job.state, job.error)
    job.cancel()
    assert job.wait(60)
    assert job.state == CANCELLED
    assert job.result is None and job.error is None
    root = Path(jobs.os.environ["FOD_MODELS_DIR"])
    assert list_bundles() == []
    assert not root.exists() or list(root.iterdir()) == []  # no temporary folders either
    assert job.history(), "loss history recorded before the cancel"
    assert job.spec.sources == []  # uploaded bytes are released


def test_cancel_after_training_before_saving(manager: TrainingJobManager, monkeypatch: pytest.MonkeyPatch) -> None:
    import fod_app.training as training

    def fake_train(images, config, *, cancel, **_kwargs):  # noqa: ANN001
        cancel.cancel()  # the user clicks Cancel just as training returns
        return object()

    monkeypatch.setattr(training, "train", fake_train)
    job = manager.start(_spec(name="late-cancel"))
    assert job.wait(30)
    assert job.state == CANCELLED
    assert list_bundles() == []


def test_unexpected_failure_gives_a_clear_message_and_logs_the_traceback(
    manager: TrainingJobManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fod_app.training as training

    def broken_train(*_args, **_kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("CUDA kernel exploded at 0xdeadbeef")

    monkeypatch.setattr(training, "train", broken_train)
    with caplog.at_level(logging.ERROR, logger="fod_app.jobs"):
        job = manager.start(_spec(name="will-fail"))
        assert job.wait(30)
    assert job.state == FAILED
    assert job.error is not None
    assert "Traceback" not in job.error and "0xdeadbeef" not in job.error
    assert "unexpected problem (RuntimeError)" in job.error and "Nothing was saved" in job.error
    assert "Traceback" in caplog.text and "0xdeadbeef" in caplog.text
    assert list_bundles() == []
    assert manager.active() is None


def test_unreadable_images_fail_with_the_engine_message(manager: TrainingJobManager) -> None:
    sources = [(f"broken_{i}.png", b"not an image") for i in range(9)] + list_images(SAMPLE_TRAIN)[:3]
    job = manager.start(TrainingSpec(name="bad-data", sources=sources, preset="quick", owner="alice"))
    assert job.wait(30)
    assert job.state == FAILED
    assert job.error is not None and job.error.startswith("Need at least 10 good images to train; got 3.")
    assert len(job.failures) == 9 and job.failures[0][0] == "broken_0.png"


def test_history_is_thinned_and_fraction_spans_phases() -> None:
    job = jobs.Job(_spec(), jobs.create_config("quick"))
    assert job.fraction == 0.0
    job._report(Progress("features", step=6, steps=12, fraction=0.5))
    assert job.fraction == pytest.approx(0.10)
    total = 3 * MAX_HISTORY
    for step in range(1, total):
        job._report(Progress("training", epoch=1, epochs=1, step=step, steps=total, fraction=step / total,
                             losses={"reconstruction": 1.0 / step}))
    history = job.history()
    assert len(history) <= MAX_HISTORY
    assert history[0].step < history[-1].step
    assert 0.9 < job.fraction < 0.95
    job._report(Progress("done", fraction=1.0))
    assert job.phase == "saving"


def test_singleton_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs.reset_job_manager()
    first = jobs.get_job_manager()
    assert jobs.get_job_manager() is first
    jobs.reset_job_manager()
    assert jobs.get_job_manager() is not first
