"""Shared fixtures: one small real model trained once per test session, and FOD_MODELS_DIR pointing at it."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = REPO / "sample_data" / "train_good"
TEST_MODEL = "test-model"


@pytest.fixture(scope="session")
def trained_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A models folder holding ``test-model``: the quick preset, 2 epochs, on sample_data/train_good (CPU).

    Trained once per test session (about 30-70 s on a 2-core CPU). Treat it as read-only; use
    ``models_env_copy`` in tests that rename or delete models.
    """
    from fod_app.bundle import save_bundle
    from fod_app.config import create_config
    from fod_app.data import dataset_fingerprint, list_images, load_images
    from fod_app.training import train

    root = tmp_path_factory.mktemp("models")
    cached = os.environ.get("FOD_TEST_MODELS_CACHE")  # a folder with a test-model from an earlier session
    if cached and (Path(cached) / TEST_MODEL / "bundle.json").is_file():
        shutil.copytree(Path(cached) / TEST_MODEL, root / TEST_MODEL)
        yield root
        return
    paths = list_images(SAMPLE_TRAIN)
    config = create_config("quick", epochs=2)
    report = load_images(paths, config.image_size)
    started = time.perf_counter()
    detector = train(
        [image for _, image in report.images],
        config,
        device="cpu",
        metadata={"data": {"source": str(SAMPLE_TRAIN), "fingerprint": dataset_fingerprint(paths)}},
    )
    save_bundle(detector, TEST_MODEL, root=root)
    print(f"\n[conftest] trained {TEST_MODEL!r} in {time.perf_counter() - started:.1f} s")
    if cached:  # an empty cache folder: fill it for the next session
        shutil.copytree(root / TEST_MODEL, Path(cached) / TEST_MODEL, dirs_exist_ok=True)
    yield root


@pytest.fixture
def models_env(trained_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FOD_MODELS_DIR -> the shared folder with ``test-model`` (do not modify it)."""
    monkeypatch.setenv("FOD_MODELS_DIR", str(trained_models_dir))
    return trained_models_dir


@pytest.fixture
def models_env_copy(trained_models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """FOD_MODELS_DIR -> a private copy of the folder with ``test-model`` (safe to rename/delete/add)."""
    root = tmp_path / "models"
    shutil.copytree(trained_models_dir, root)
    monkeypatch.setenv("FOD_MODELS_DIR", str(root))
    return root


@pytest.fixture
def fresh_jobs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An idle job manager and the CPU engine, before and after the test."""
    from fod_app import jobs

    monkeypatch.setenv("FOD_DEVICE", "cpu")
    monkeypatch.delenv(jobs.DEMO_EPOCHS_ENV, raising=False)
    jobs.reset_job_manager()
    yield
    jobs.reset_job_manager()


@pytest.fixture(autouse=True)
def isolated_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test records inspections in its own history database (never next to the shared test model)."""
    path = tmp_path / "history" / "history.sqlite3"
    monkeypatch.setenv("FOD_HISTORY_DB", str(path))
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Debian Chromium per test module (Playwright), closed at the end of the module."""
    from playwright import sync_api
    from test_browser_explore import ARGS, CHROMIUM

    assert CHROMIUM, "Chromium is not installed: apt-get install chromium (test.sh does this)"
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """AppTest helper: file name -> bytes/str (static downloads) or the callable (deferred downloads), as the app
    registers them with Streamlit's media file manager."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    seen: dict[str, object] = {}
    add, add_deferred = MediaFileManager.add, MediaFileManager.add_deferred

    def record_add(self, path_or_data, mimetype, coordinates, file_name=None, is_for_static_download=False):
        if file_name:
            seen[file_name] = path_or_data
        return add(self, path_or_data, mimetype, coordinates, file_name, is_for_static_download)

    def record_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        if file_name:
            seen[file_name] = data_callable
        return add_deferred(self, data_callable, mimetype, coordinates, file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add", record_add)
    monkeypatch.setattr(MediaFileManager, "add_deferred", record_deferred)
    return seen
