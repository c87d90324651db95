"""Hostile and unlucky cases not covered elsewhere: each one ends in a specific message, and nothing is lost.

The rest of the hardening suite lives next to the code it exercises (test_data, test_archive, test_health,
test_bundle, test_cli_end_to_end, test_jobs, test_app_*); the README's Security section lists the limits.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_app_inspect_explore_evaluate import _app
from test_cli_end_to_end import run_cli as _run_cli

from fod_app.bundle import (
    STALE_AFTER_S,
    WEIGHTS_FILE,
    delete_bundle,
    list_bundles,
    load_bundle,
    remove_stale_temporaries,
    save_bundle,
)
from fod_app.calibration import MIN_LOG_SPREAD, Calibration
from fod_app.data import list_images, load_image, prepare_image
from fod_app.paths import PathNotAllowedError, resolve_data_path

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
SAMPLE_TRAIN = REPO / "sample_data" / "train_good"
SAMPLES = REPO / "sample_data" / "inspect"

run_cli = functools.partial(_run_cli, timeout=600)




# --------------------------------------------------------------------------- kill -9 in the middle of a save

_SLOW_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import fod_app.bundle as bundle

    root, ready, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    detector = bundle.load_bundle("test-model", root=root, device="cpu")
    real_save_file = bundle.save_file

    def half_written_then_hang(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # as if the process died half-way through the write
            handle.truncate(Path(filename).stat().st_size // 2)
        ready.write_text(filename)
        time.sleep(300)

    bundle.save_file = half_written_then_hang
    bundle.save_bundle(detector, name, root=root)
    """
)


@pytest.mark.parametrize("name", ["test-model", "new-model"], ids=["replacing", "new-name"])
def test_kill_9_mid_save_keeps_previous_bundles_and_lists_no_partial_one(
    models_env_copy: Path, tmp_path: Path, name: str
) -> None:
    root = models_env_copy
    weights_before = (root / "test-model" / WEIGHTS_FILE).read_bytes()
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(root), str(ready), name], env=env, cwd=REPO)
    try:
        deadline = time.time() + 180
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), f"the saving process never reached the write (exit code {proc.poll()})"
        partial = Path(ready.read_text()).parent
        assert partial.parent == root and partial.name.startswith(f".tmp-{name}-") and partial.is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL

    # the half-written folder is still there, but it is never listed, and the previous bundle is untouched
    assert partial.is_dir()
    listed = list_bundles(root)
    assert [(b.name, b.error) for b in listed] == [("test-model", None)]
    assert (root / "test-model" / WEIGHTS_FILE).read_bytes() == weights_before
    detector = load_bundle("test-model", root=root, device="cpu")

    # a later save of the same name works; the leftover is harmless and, once stale, removed
    save_bundle(detector, name, root=root)
    assert sorted(b.name for b in list_bundles(root) if b.error is None) == sorted({"test-model", name})
    load_bundle(name, root=root, device="cpu")
    assert partial.is_dir(), "a young temporary folder may belong to a save still running elsewhere: kept"
    old = time.time() - STALE_AFTER_S - 60
    os.utime(partial, (old, old))
    save_bundle(detector, name, root=root)
    assert not partial.exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_stale_temporaries_cleanup_keeps_young_ones_and_possible_only_copies(models_env_copy: Path) -> None:
    root = models_env_copy
    old = time.time() - STALE_AFTER_S - 60
    stale = [".trash-test-model-12345678", ".tmp-test-model-12345678", ".tmp-import-12345678", ".tmp-gone-12345678",
             ".trash-gone-12345678", ".keep-me"]
    for folder in [*stale, ".tmp-test-model-87654321"]:
        (root / folder).mkdir()
        (root / folder / "x").write_bytes(b"x")
    for folder in [*stale, "test-model"]:
        os.utime(root / folder, (old, old))
    removed = remove_stale_temporaries(root)
    assert sorted(removed) == [".tmp-import-12345678", ".tmp-test-model-12345678", ".trash-test-model-12345678"]
    # young, unknown, or (no bundle 'gone' exists) possibly the only copies of a model: kept
    assert sorted(p.name for p in root.iterdir()) == [
        ".keep-me", ".tmp-gone-12345678", ".tmp-test-model-87654321", ".trash-gone-12345678", "test-model"
    ]
    assert [b.name for b in list_bundles(root)] == ["test-model"]
    load_bundle("test-model", root=root, device="cpu")


# --------------------------------------------------------------------------- training sets through the CLI


def test_calibration_of_identical_scores_keeps_a_margin() -> None:
    cal = Calibration.from_scores([4.31] * 4)
    k = 4.5407 * np.sqrt(1 + 1 / 4)  # Student t (3 dof) 99 % quantile, prediction interval for one new image
    assert cal.threshold == pytest.approx(4.31 * np.exp(k * MIN_LOG_SPREAD), rel=1e-3)
    assert cal.false_reject_rate(1.0) == 0.0  # the held-out images themselves are not rejected


def test_cli_train_on_identical_images_warns_and_accepts_that_photo(tmp_path: Path) -> None:
    folder, models = tmp_path / "same", tmp_path / "models"
    folder.mkdir()
    photo = list_images(SAMPLE_TRAIN)[0]
    for i in range(12):
        shutil.copy(photo, folder / f"copy_{i:02d}.png")
    result = run_cli("train", str(folder), "--name", "same", "--preset", "quick", "--epochs", "1",
                     "--device", "cpu", models=models)
    assert result.returncode == 0, result.stderr
    assert "warning: all 12 training images are identical; the model cannot learn how good parts vary" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "saved model 'same'" in result.stdout
    detector = load_bundle("same", root=models, device="cpu")
    [verdict] = detector.inspect([("again.png", prepare_image(load_image(photo), detector.config.image_size))])
    assert verdict.score < 1.0 and verdict.verdict != "NG", "the training photo itself must not be rejected"


def test_cli_train_on_mixed_sizes_and_aspect_ratios(tmp_path: Path) -> None:
    folder, models = tmp_path / "mixed", tmp_path / "models"
    folder.mkdir()
    shapes = [(256, 256), (400, 300), (128, 512), (640, 480), (300, 300), (200, 150), (512, 128), (1024, 768),
              (96, 96), (333, 251), (700, 200), (256, 256)]
    for i, (path, shape) in enumerate(zip(list_images(SAMPLE_TRAIN), shapes, strict=False)):
        img = Image.open(path).convert("RGB" if i % 2 else "L").resize(shape)
        img.save(folder / f"img_{i:02d}.{'jpg' if i % 3 == 0 else 'png'}")
    result = run_cli("train", str(folder), "--name", "mixed", "--preset", "quick", "--epochs", "1",
                     "--device", "cpu", models=models)
    assert result.returncode == 0, result.stderr
    assert "skipped" not in result.stderr and "Traceback" not in result.stderr
    assert "saved model 'mixed'" in result.stdout and "trained on" in result.stdout
    assert [b.name for b in list_bundles(models)] == ["mixed"]


def _unreadable_files(folder: Path, marker: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file, not a picture")
    (folder / "pickled.png").write_bytes(pickle.dumps(Exploit()))
    good = (SAMPLES / "good_01.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])


def test_cli_train_on_a_folder_of_only_unreadable_files(tmp_path: Path) -> None:
    folder, models, marker = tmp_path / "junk", tmp_path / "models", tmp_path / "pwned"
    _unreadable_files(folder, marker)
    result = run_cli("train", str(folder), "--name", "junk", models=models)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert sorted(line.split(":")[0] for line in lines[:-1]) == [
        "skipped empty.png", "skipped notes.png", "skipped pickled.png", "skipped truncated.png"
    ]
    assert lines[-1].startswith("error: Need at least 10 good images to train; got 0.")
    assert not marker.exists() and list_bundles(models) == []


def test_cli_detect_on_only_unreadable_files_exits_1_with_one_line_each(models_env: Path, tmp_path: Path) -> None:
    folder, marker = tmp_path / "junk", tmp_path / "pwned"
    _unreadable_files(folder, marker)
    result = run_cli("detect", "--model", "test-model", str(folder), models=models_env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert sum(": unreadable: " in line for line in result.stderr.splitlines()) == 4
    assert "0 images: 0 NG, 0 OK/REVIEW; 4 unreadable" in result.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------- server paths


def test_server_path_escapes_through_dotdot_and_symlinks_are_refused(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    (root / "line1").mkdir(parents=True)
    (root / "to-etc").symlink_to("/etc")
    monkeypatch.setenv("FOD_DATA_ROOTS", str(root))
    assert resolve_data_path(root / "line1") == (root / "line1").resolve()
    for sneaky in (root / "to-etc", root / "line1" / ".." / ".." / "data-other", "sample_data/../fod_app", "~"):
        with pytest.raises(PathNotAllowedError, match="outside the allowed data folders"):
            resolve_data_path(sneaky)
    with pytest.raises(PathNotAllowedError, match="no such folder on the server"):
        resolve_data_path(root / "missing")


# --------------------------------------------------------------------------- the app


@pytest.fixture
def cpu_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOD_DEVICE", "cpu")
    monkeypatch.delenv("FOD_DATA_ROOTS", raising=False)


def _png(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


@pytest.mark.parametrize("other_model", [True, False], ids=["another-model-left", "no-model-left"])
def test_deleting_the_active_model_while_a_session_uses_it(models_env_copy: Path, cpu_app, other_model: bool) -> None:
    if other_model:
        shutil.copytree(models_env_copy / "test-model", models_env_copy / "other-model")
    at = _app("pages/3_inspect.py")
    at.selectbox(key="inspect_model_choice").set_value("test-model").run()
    at.file_uploader(key="inspect_uploads").set_value([_png(SAMPLES / "good_01.png")]).run()
    assert not at.exception and at.session_state["active_model"] == "test-model"
    assert at.session_state["inspection"]["model"] == "test-model"

    delete_bundle("test-model")  # as another session (or the CLI) would
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    warning = " ".join(str(w.value) for w in at.warning)
    assert "Model 'test-model' no longer exists (it was deleted or renamed, perhaps in another session)." in warning
    if other_model:
        assert "Now using 'other-model'" in warning
        assert at.selectbox(key="inspect_model_choice").value == "other-model"
        assert at.session_state["inspection"]["model"] == "other-model"  # re-inspected with the model in use
    else:
        assert any("There is no trained model yet" in str(i.value) for i in at.info)
        assert at.session_state["active_model"] is None
    at.run()  # said once, not on every rerun
    assert not any("no longer exists" in str(w.value) for w in at.warning)


def test_inspect_page_refuses_a_decompression_bomb_and_a_pickle_named_png(models_env: Path, cpu_app, tmp_path) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    at = _app("pages/3_inspect.py")
    at.file_uploader(key="inspect_uploads").set_value([
        ("bomb.png", bomb, "image/png"), ("model.png", pickle.dumps(Exploit()), "image/png"),
    ]).run()
    assert not at.exception, [e.value for e in at.exception]
    failures = next(df.value for df in at.dataframe if "Reason" in df.value.columns)
    reasons = dict(zip(failures["File"], failures["Reason"], strict=True))
    assert reasons["bomb.png"].startswith("the image is too large (900 megapixels; the limit is 80 megapixels)")
    assert "not a readable image" in reasons["model.png"]
    assert any("None of the uploaded files could be read as an image" in str(e.value) for e in at.error)
    assert not marker.exists()


def test_upload_limit_is_configured_parsed_by_streamlit_and_documented() -> None:
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    limit = config["server"]["maxUploadSize"]
    assert isinstance(limit, int) and 0 < limit <= 2048
    # Streamlit itself reads that file (from the working directory) and enforces the limit on every upload
    code = "import streamlit.config as c; print(c.get_option('server.maxUploadSize'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(limit)
    assert f"Upload limit: {limit} MB (`.streamlit/config.toml`)" in (REPO / "README.md").read_text(encoding="utf-8")
