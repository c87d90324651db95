"""AppTest tests of the router and the Home, Train and Models pages."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from fod_app import jobs
from fod_app.bundle import export_bundle_zip, list_bundles
from fod_app.config import create_config
from fod_app.data import list_images
from fod_app.jobs import DONE, JobResult, TrainingSpec, get_job_manager
from fod_app.training import Progress

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
SAMPLE_TRAIN = REPO / "sample_data" / "train_good"
TIMEOUT = 120


pytestmark = pytest.mark.usefixtures("fresh_jobs")  # idle job manager, CPU engine (conftest.py)


def _app(page: str | None = None) -> AppTest:
    """Run the router, then (optionally) switch to ``page``.

    Note: after ``switch_page`` AppTest 1.67 runs the page file on its own (Streamlit's legacy ``pages/`` mode, see
    ``ensure_router``), so the router's sidebar is checked in ``test_direct_page_visit_runs_through_router``.
    """
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(at: AppTest, kind: str) -> list[str]:
    return [str(element.value) for element in getattr(at, kind)]


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _png(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


@pytest.fixture
def blocking_worker(monkeypatch: pytest.MonkeyPatch):
    """Jobs run a fake worker that waits until released (to keep a job 'running')."""
    release = threading.Event()

    def fake(job: jobs.Job) -> JobResult:
        job._report(Progress("training", epoch=1, epochs=4, step=1, steps=4, fraction=0.25, losses={"x": 1.0}))
        release.wait(60)
        raise jobs._Cancelled()

    monkeypatch.setattr(jobs, "_train_and_save", fake)
    yield release
    release.set()


# --------------------------------------------------------------------------- router and Home


def test_home_explains_and_offers_the_demo(models_env: Path) -> None:
    at = _app()
    text = " ".join(_texts(at, "markdown"))
    assert "photos of good parts only" in text
    assert "heat map" in text
    demo = at.button(key="home_demo")
    assert demo.label == "Train demo model on sample data" and not demo.disabled
    sidebar = " ".join(_texts(at.sidebar, "caption"))
    assert "Device: **CPU" in sidebar
    assert "Active model: **test-model**" in sidebar


def test_home_demo_starts_a_standard_job(models_env_copy: Path, blocking_worker: threading.Event) -> None:
    at = _app()
    at.button(key="home_demo").click().run()
    assert not at.exception
    job = get_job_manager().active()
    assert job is not None and job.name == "demo-solar-cells" and job.config.preset == "cpu"
    assert len(job.spec.sources) == 60
    assert at.get("progress"), "progress bar shown while the demo trains"
    assert any(b.label == "Cancel training" for b in at.button)


def test_direct_page_visit_runs_through_router(models_env: Path) -> None:
    """A first visit straight to a page URL (legacy pages/ mode) is rerun through app.py's router."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.switch_page("pages/2_train.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["fod_router_seen"] is True
    assert any(t.value == "Train a model" for t in at.title)
    sidebar = " ".join(_texts(at.sidebar, "caption"))
    assert "Device: **CPU" in sidebar and "Active model: **test-model**" in sidebar


def test_home_demo_done_asks_before_using_the_new_model(
    models_env_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake(job: jobs.Job) -> JobResult:
        shutil.copytree(models_env_copy / "test-model", models_env_copy / job.name)  # the saved model
        return JobResult(job.name, "", 0.1, 0.99, 0.01, 0.0, [0.5, 0.8, 0.9, 1.01], 60, 51, 9, 12.0, "CPU")

    monkeypatch.setattr(jobs, "_train_and_save", fake)
    (models_env_copy / "active_model.json").unlink(missing_ok=True)
    at = _app()
    at.button(key="home_demo").click().run()
    job = get_job_manager().latest()
    assert job is not None and job.wait(10) and job.state == DONE
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["active_model"] == "test-model", "never switched silently"
    prompt = " ".join(str(m.value) for m in at.markdown)
    assert "**Use “demo-solar-cells” now?** The active model is still **test-model**" in prompt
    assert at.button(key="home_go_inspect").label == "Inspect the sample images with the demo model"
    assert _metrics(at)["Held-back good images above the threshold"] == "0 of 9 (0%)"
    assert at.button(key=f"keep_home_{job.id}").label == "No, keep test-model"
    at.button(key=f"activate_home_{job.id}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["active_model"] == "demo-solar-cells"
    assert json.loads((models_env_copy / "active_model.json").read_text())["name"] == "demo-solar-cells"


def test_failed_job_shows_the_reason(models_env_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fod_app.data import DatasetError

    def fake(job: jobs.Job) -> JobResult:
        raise DatasetError("Need at least 10 good images to train; got 4.")

    monkeypatch.setattr(jobs, "_train_and_save", fake)
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Sample data").run()
    at.button(key="train_start").click().run()
    job = get_job_manager().latest()
    assert job is not None and job.wait(10)
    at.run()
    errors = " ".join(_texts(at, "error"))
    assert "Training of “solar-cells” failed: Need at least 10 good images to train; got 4." in errors
    assert "Traceback" not in errors


# --------------------------------------------------------------------------- Train: choosing good images


def test_train_sample_data_shows_health_summary(models_env: Path) -> None:
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Sample data").run()
    assert not at.exception
    metrics = _metrics(at)
    assert metrics["Usable good images"] == "60"
    assert metrics["Image sizes"] == "256×256"
    assert metrics["Unreadable files"] == "0"
    assert at.image, "thumbnail grid"
    assert at.text_input(key="train_model_name").value == "solar-cells"
    assert at.selectbox(key="train_preset").value == "cpu"
    assert at.number_input(key="train_epochs_cpu").value == create_config("cpu").epochs
    assert not at.button(key="train_start").disabled
    assert not [w for w in _texts(at, "warning") if "meant for a GPU" in w]


def test_train_paper_preset_on_a_cpu_warns_with_its_time(models_env: Path) -> None:
    """60 sample images: 9 held out, 100 passes over 51 at batch 1 = 5100 steps at ~1.84 s on 2 cores."""
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Sample data").run()
    at.selectbox(key="train_preset").set_value("paper").run()
    assert not at.exception
    slow = [w for w in _texts(at, "warning") if "meant for a GPU" in w]
    if torch.cuda.is_available():
        assert not slow
    else:
        assert len(slow) == 1 and "its 5100 training steps take about 2.6 hours" in slow[0]
    at.number_input(key="train_epochs_paper").set_value(10).run()
    assert torch.cuda.is_available() or "its 510 training steps take about 16 minutes" in _texts(at, "warning")[0]
    assert not at.button(key="train_start").disabled, "a warning, not a block"


def test_train_upload_images_lists_unreadable_file(models_env: Path) -> None:
    at = _app("pages/2_train.py")
    files = [_png(p) for p in list_images(SAMPLE_TRAIN)[:11]]
    files.append(("scratched_lens.png", b"this is not a png", "image/png"))
    at.file_uploader(key="train_upload_images").set_value(files).run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = _metrics(at)
    assert metrics["Usable good images"] == "11"
    assert metrics["Unreadable files"] == "1"
    warnings = " ".join(_texts(at, "warning"))
    assert "scratched_lens.png" in warnings and "could not be read" in warnings
    listed = " ".join(_texts(at, "markdown"))
    assert "**scratched_lens.png**: not a readable image" in listed
    assert not at.button(key="train_start").disabled


def test_train_zip_upload(models_env: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in list_images(SAMPLE_TRAIN)[:12]:
            archive.write(path, f"good_parts/{path.name}")
        archive.writestr("good_parts/notes.txt", "taken on line 2")
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Upload a zip").run()
    at.file_uploader(key="train_upload_zip").set_value(("line2.zip", buffer.getvalue(), "application/zip")).run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = _metrics(at)
    assert metrics["Usable good images"] == "12"
    assert "notes.txt" in " ".join(_texts(at, "markdown"))  # skipped entry listed
    assert at.text_input(key="train_model_name").value == "line2"


def test_train_bad_zip_shows_error(models_env: Path) -> None:
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Upload a zip").run()
    at.file_uploader(key="train_upload_zip").set_value(("x.zip", b"garbage", "application/zip")).run()
    assert not at.exception
    assert any("not a valid zip file" in e for e in _texts(at, "error"))


def test_train_too_few_images_disables_start(models_env: Path) -> None:
    at = _app("pages/2_train.py")
    at.file_uploader(key="train_upload_images").set_value([_png(p) for p in list_images(SAMPLE_TRAIN)[:3]]).run()
    assert not at.exception
    assert _metrics(at)["Usable good images"] == "3"
    errors = " ".join(_texts(at, "error"))
    assert "Training cannot start: Need at least 10 good images to train; got 3." in errors
    assert at.button(key="train_start").disabled


def test_train_server_folder(models_env: Path) -> None:
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Folder on the server").run()
    at.text_input(key="train_server_folder").set_value("/etc").run()
    assert not at.exception
    errors = " ".join(_texts(at, "error"))
    assert "outside the allowed data folders" in errors
    assert not at.metric and not any(b.key == "train_start" for b in at.button)
    at.text_input(key="train_server_folder").set_value("sample_data/train_good").run()
    assert _metrics(at)["Usable good images"] == "60"
    assert at.text_input(key="train_model_name").value == "train_good"


def test_invalid_model_name_disables_start(models_env: Path) -> None:
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Sample data").run()
    at.text_input(key="train_model_name").set_value("my model!").run()
    assert any("Invalid model name" in e for e in _texts(at, "error"))
    assert at.button(key="train_start").disabled
    at.text_input(key="train_model_name").set_value("test-model").run()  # exists: needs confirmation
    assert at.button(key="train_start").disabled
    at.checkbox(key="train_replace").check().run()
    assert not at.button(key="train_start").disabled


# --------------------------------------------------------------------------- Train: running a job


def test_training_job_runs_in_background_and_shows_calibration(
    models_env_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(jobs.DEMO_EPOCHS_ENV, "1")
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Sample data").run()
    assert any("Demo mode" in c for c in _texts(at, "caption"))
    at.text_input(key="train_model_name").set_value("app-trained").run()
    at.selectbox(key="train_preset").set_value("quick").run()
    started = time.perf_counter()
    at.button(key="train_start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert time.perf_counter() - started < 30, "the page returns at once; training runs in the background"
    job = get_job_manager().active()
    assert job is not None and job.name == "app-trained" and job.config.epochs == 1
    assert at.get("progress") and any(b.label == "Cancel training" for b in at.button)
    assert job.wait(600), "training did not finish"
    assert job.state == DONE, job.error
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = _metrics(at)
    assert metrics["Threshold"] == "1.0"
    assert metrics["Expected false rejects"] == "1%"
    assert metrics["Held-back good images above the threshold"].endswith(")")
    assert any("Model **app-trained** is ready" in s for s in _texts(at, "success"))
    assert (models_env_copy / "app-trained" / "bundle.json").is_file()
    meta = json.loads((models_env_copy / "app-trained" / "bundle.json").read_text())
    assert meta["data"]["fingerprint"] and meta["config"]["epochs"] == 1 and meta["config"]["preset"] == "quick"
    at.button(key=f"activate_train_{job.id}").click().run()
    assert at.session_state["active_model"] == "app-trained"
    at.button(key="train_again").click().run()
    assert at.radio(key="train_source") is not None  # back to the form


def test_second_session_gets_busy_message(models_env: Path, blocking_worker: threading.Event) -> None:
    other = _app("pages/2_train.py")  # rendered before the job starts: its Start button is enabled
    other.radio(key="train_source").set_value("Sample data").run()
    assert not other.button(key="train_start").disabled

    first = _app("pages/2_train.py")
    first.radio(key="train_source").set_value("Sample data").run()
    first.text_input(key="train_model_name").set_value("first-job").run()
    first.button(key="train_start").click().run()
    assert get_job_manager().active() is not None

    other.button(key="train_start").click().run()  # too late: the page now shows the running job instead
    assert not other.exception
    assert any(s.value == "Training “first-job”" for s in other.subheader)
    assert get_job_manager().active().name == "first-job"
    with pytest.raises(jobs.BusyError, match=r"A training job is already running \(started by another session at"):
        get_job_manager().start(TrainingSpec(name="second", sources=list_images(SAMPLE_TRAIN), owner="other"))

    running = get_job_manager().active()
    third = _app("pages/2_train.py")  # a new visitor (or a reloaded tab) sees the running job, not a form
    assert any(s.value == "Training “first-job”" for s in third.subheader)
    assert "in another browser tab or by another user" in " ".join(_texts(third, "caption"))
    assert third.get("progress") and third.button(key=f"cancel_{running.id}").label == "Cancel training…"
    home = _app()
    assert home.button(key="home_demo").disabled
    assert "is running" in " ".join(_texts(home, "info"))
    first.button(key=f"cancel_{running.id}").click().run()
    assert not first.exception, [e.value for e in first.exception]
    assert running.cancel_requested
    assert any("Stopping" in i for i in _texts(first, "info"))
    blocking_worker.set()
    assert running.wait(10) and running.state == "cancelled"
    first.run()
    assert any("was cancelled. Nothing was saved." in i for i in _texts(first, "info"))


# --------------------------------------------------------------------------- Models page


def test_models_page_lists_the_test_model(models_env: Path, downloads: dict[str, object]) -> None:
    at = _app("pages/6_models.py")
    table = at.dataframe[0].value
    assert list(table["Name"]) == ["test-model"]
    row = table.iloc[0]
    assert row["Preset"] == "Quick (quick)" and row["Backbone"] == "efficientnet_lite0" and row["Good images"] == 60
    assert row["Active"] == "✔" and len(row["Data fingerprint"]) == 12
    assert at.selectbox(key="models_selected").value == "test-model"
    assert at.get("download_button"), "download button present"
    with zipfile.ZipFile(io.BytesIO(downloads["test-model.zip"]())) as archive:  # the bytes a click downloads
        assert sorted(archive.namelist()) == ["test-model/bundle.json", "test-model/model.safetensors"]
    details = " ".join(_texts(at, "markdown"))
    assert "not evaluated yet" in details and row["Image AUROC"] == "not evaluated"
    assert "**Exposure**: " in details  # what the model does to each photo's brightness and contrast


def test_models_rename_and_delete(models_env_copy: Path) -> None:
    at = _app("pages/6_models.py")
    # Inside a form, the typed value is sent with the submit click (as in the browser).
    at.text_input(key="models_new_name_test-model").set_value("line-2 model")
    at.button(key="FormSubmitter:models_rename_form_test-model-Rename").click().run()
    assert any("Invalid model name" in e for e in _texts(at, "error"))
    at.text_input(key="models_new_name_test-model").set_value("line2-model")
    at.button(key="FormSubmitter:models_rename_form_test-model-Rename").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert [b.name for b in list_bundles()] == ["line2-model"]
    assert any("Renamed" in s for s in _texts(at, "success"))
    assert at.session_state["active_model"] == "line2-model"

    delete = at.button(key="models_delete_line2-model")
    assert delete.disabled, "delete needs the confirmation first"
    at.checkbox(key="models_confirm_delete_line2-model").check().run()
    at.button(key="models_delete_line2-model").click().run()
    assert not at.exception
    assert list_bundles() == []
    assert at.session_state["active_model"] is None
    assert any("Deleted" in s for s in _texts(at, "success"))
    assert any("No models yet" in i for i in _texts(at, "info"))


def test_models_upload_validates_zip(models_env_copy: Path) -> None:
    at = _app("pages/6_models.py")
    at.file_uploader(key="models_upload").set_value(("model.zip", b"garbage bytes", "application/zip")).run()
    at.button(key="models_upload_go").click().run()
    assert not at.exception
    assert any("This model was not added: The uploaded file is not a zip" in e for e in _texts(at, "error"))

    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("m/bundle.json", json.dumps({"format": "something-else"}))
        archive.writestr("m/model.safetensors", b"\0" * 16)
    at.file_uploader(key="models_upload").set_value(("m.zip", broken.getvalue(), "application/zip")).run()
    at.button(key="models_upload_go").click().run()
    assert any("not an FOD Inspector bundle" in e for e in _texts(at, "error"))
    assert [b.name for b in list_bundles()] == ["test-model"]

    good = export_bundle_zip("test-model")
    at.file_uploader(key="models_upload").set_value(("test-model.zip", good, "application/zip")).run()
    at.text_input(key="models_upload_name").set_value("copy-of-test").run()
    at.button(key="models_upload_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert sorted(b.name for b in list_bundles()) == ["copy-of-test", "test-model"]
    assert any("Added model “copy-of-test”" in s for s in _texts(at, "success"))


def test_models_lists_unreadable_bundles(models_env_copy: Path) -> None:
    (models_env_copy / "half-copied").mkdir()
    (models_env_copy / "half-copied" / "bundle.json").write_text("{not json")
    at = _app("pages/6_models.py")
    assert not at.exception
    errors = " ".join(_texts(at, "error"))
    assert "half-copied" in errors and "not valid JSON" in errors
    at.checkbox(key="models_confirm_delete_broken_half-copied").check().run()
    at.button(key="models_delete_broken_half-copied").click().run()
    assert [b.name for b in list_bundles()] == ["test-model"]


def test_job_spec_copies_uploads_so_the_session_can_go(models_env_copy: Path, blocking_worker) -> None:
    at = _app("pages/2_train.py")
    files = [_png(p) for p in list_images(SAMPLE_TRAIN)[:10]]
    at.file_uploader(key="train_upload_images").set_value(files).run()
    at.button(key="train_start").click().run()
    job = get_job_manager().active()
    assert job is not None
    assert all(isinstance(s, tuple) and isinstance(s[1], bytes) for s in job.spec.sources)
    assert isinstance(job.spec, TrainingSpec) and job.spec.source_label == "upload (10 files)"


def test_train_suggests_and_passes_the_exposure_setting(models_env_copy: Path, blocking_worker) -> None:
    """The bundled cells' light differs from photo to photo: the page says so and points at the setting, which
    starts at the preset's (Automatic) and, once changed, reaches the training job's config."""
    at = _app("pages/2_train.py")
    at.radio(key="train_source").set_value("Sample data").run()
    notes = [n for n in _texts(at, "info") if "The light differs between these photos" in n]
    assert len(notes) == 1 and "evening out each photo's brightness and contrast" in notes[0]
    assert at.selectbox(key="train_exposure").value == "auto" == create_config("cpu").exposure
    at.selectbox(key="train_exposure").set_value("as_taken").run()
    at.button(key="train_start").click().run()
    job = get_job_manager().active()
    assert job is not None and job.spec.exposure == "as_taken"
    assert job.spec.build_config().exposure == "as_taken"
