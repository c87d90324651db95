"""Hardening, round two (issue 9): nine hostile and fault cases from an independent suite, one test each.

Each asserts what the user sees: one line, the file named, exit status 2, nothing lost. The CLI is run as a
subprocess where the exact terminal experience matters (file names, pickles, restart after a kill) and in-process
through ``fod_app.cli.main`` where a fault must be injected (a full disk) or where the point is that no work is
done (training is replaced by a stub that fails the test if reached).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from streamlit.testing.v1 import AppTest
from test_cli_end_to_end import run_cli as _run_cli

from fod_app import cli
from fod_app.bundle import (
    METADATA_FILE,
    WEIGHTS_FILE,
    list_bundles,
    load_bundle,
    read_metadata,
    save_bundle,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = REPO / "sample_data" / "train_good"
SAMPLES = REPO / "sample_data" / "inspect"

run_cli = functools.partial(_run_cli, timeout=600)


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in-process: (exit status, stdout, stderr)."""
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the CLI starts any real work (reading images, training)."""

    def forbidden(*_args, **_kwargs):
        raise AssertionError("work was started before the error was reported")

    monkeypatch.setattr("fod_app.training.train", forbidden)
    monkeypatch.setattr("fod_app.data.resolve_training_images", forbidden)


def _stub_training(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[int]:
    """Training replaced by loading the session's trained model (fast); returns a call counter."""
    calls: list[int] = []

    def fake_train(images, config, **_kwargs):
        calls.append(len(images))
        return load_bundle("test-model", root=root, device="cpu")

    monkeypatch.setattr("fod_app.training.train", fake_train)
    return calls


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- 1. file names that are not UTF-8


def test_1_detect_csv_with_a_non_utf8_file_name_writes_every_row(models_env: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    odd = folder / os.fsdecode(b"caf\xe9_\xff.png")  # Latin-1 bytes from an old camera or a Windows share
    shutil.copy(SAMPLES / "defect_01.png", odd)
    shutil.copy(SAMPLES / "good_01.png", folder / "plain.png")
    out = tmp_path / "results.csv"
    result = run_cli("detect", "--model", "test-model", str(folder), "--csv", str(out), models=models_env)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr and "Traceback" not in result.stderr
    escaped = str(folder / "caf\\xe9_\\xff.png")
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [f"note: file name is not valid UTF-8; its undecodable bytes are shown as \\xNN here and in "
                     f"the CSV: {escaped}"]
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert sorted(r["file"] for r in rows) == sorted([escaped, str(folder / "plain.png")])
    assert all(r["verdict"] in ("OK", "REVIEW", "NG") and float(r["score"]) > 0 for r in rows)
    assert escaped in result.stdout
    assert "2 images:" in result.stderr


# --------------------------------------------------------------------------- 2. a malicious pickle as --weights


def test_2_train_with_a_malicious_pickle_as_weights_is_one_line_and_never_runs_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv_stem.weight": Exploit()}))
    models = tmp_path / "models"
    result = run_cli("train", str(SAMPLE_TRAIN), "--name", "evil", "--weights", str(evil), models=models)
    assert result.returncode == 2
    line = _one_error_line(result.stderr)
    assert line.startswith(f"error: Cannot read weights file {str(evil)!r}: it is not a plain weights file")
    assert "weights_only" not in result.stderr and "False" not in result.stderr
    assert not marker.exists()
    assert list_bundles(models) == []


# --------------------------------------------------------------------------- 3. an existing name


def test_3_train_refuses_an_existing_name_unless_replace(
    models_env_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = models_env_copy
    before = (root / "test-model" / WEIGHTS_FILE).read_bytes()
    created = read_metadata("test-model", root)["created"]
    _no_training(monkeypatch)
    code, out, err = _main(capsys, "train", str(SAMPLE_TRAIN), "--name", "test-model")
    assert code == 2 and out == ""
    assert _one_error_line(err) == (
        f"error: A model named 'test-model' already exists in {root}; nothing was trained. Use --replace to "
        "replace it (the old one is then deleted), or choose another --name."
    )
    assert (root / "test-model" / WEIGHTS_FILE).read_bytes() == before

    calls = _stub_training(monkeypatch, root)
    monkeypatch.setattr("fod_app.data.resolve_training_images", lambda _data: sorted(SAMPLE_TRAIN.glob("*.png"))[:12])
    code, out, err = _main(capsys, "train", str(SAMPLE_TRAIN), "--name", "test-model", "--replace", "--quiet")
    assert code == 0, err
    assert calls == [12] and "saved model 'test-model'" in out
    assert [b.name for b in list_bundles(root)] == ["test-model"] and _hidden(root) == []
    assert read_metadata("test-model", root)["created"] == created  # the stub re-saved the same model
    load_bundle("test-model", root=root, device="cpu")
    # --force is the same switch
    assert cli.build_parser().parse_args(["train", "d", "--name", "n", "--force"]).replace is True


# --------------------------------------------------------------------------- 4. thresholds


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "0", "-1"])
def test_4_threshold_must_be_finite_and_positive_in_the_cli(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FOD_MODELS_DIR", str(tmp_path / "models"))
    code, out, err = _main(capsys, "detect", "--model", "test-model", str(SAMPLES / "good_01.png"),
                           f"--threshold={value}")
    assert code == 2 and out == ""
    assert _one_error_line(err) == (
        "error: --threshold must be a positive finite number in threshold units (1.0 = the calibrated threshold); "
        f"got {float(value)!r}."
    )


def _threshold_script() -> None:
    import streamlit as st

    from fod_app.ui.pickers import THRESHOLD_KEY, current_decision, set_threshold

    st.session_state[THRESHOLD_KEY] = 1.25
    for bad in (float("nan"), float("inf"), 0.0, -1.0, "nan"):
        set_threshold(bad)
    st.text(f"after refused values: {st.session_state[THRESHOLD_KEY]}")
    st.session_state[THRESHOLD_KEY] = float("nan")  # however a NaN got into the session
    st.text(f"decision: {current_decision().threshold}")
    set_threshold(1.5)
    st.text(f"valid: {current_decision().threshold}")


def test_4_threshold_must_be_finite_and_positive_in_the_app() -> None:
    at = AppTest.from_function(_threshold_script, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    assert [t.value for t in at.text] == ["after refused values: 1.25", "decision: 1.0", "valid: 1.5"]


# --------------------------------------------------------------------------- 5 and 6. evaluation sets


def _layout(root: Path, good: int, defects: dict[str, tuple[int, int]]) -> Path:
    """An MVTec-layout folder: 10 train/good, ``good`` test/good, one crack image per entry with a mask of that size."""
    (root / "train" / "good").mkdir(parents=True)
    for path in sorted(SAMPLE_TRAIN.glob("*.png"))[:10]:
        shutil.copy(path, root / "train" / "good" / path.name)
    (root / "test" / "good").mkdir(parents=True)
    for path in sorted(SAMPLES.glob("good_*.png"))[:good]:
        shutil.copy(path, root / "test" / "good" / path.name)
    if defects:
        (root / "test" / "crack").mkdir(parents=True)
        (root / "ground_truth" / "crack").mkdir(parents=True)
    for (stem, size), source in zip(defects.items(), sorted(SAMPLES.glob("defect_*.png")), strict=False):
        shutil.copy(source, root / "test" / "crack" / f"{stem}.png")  # 256 x 256
        mask = np.zeros((size[1], size[0]), np.uint8)
        mask[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = 255
        Image.fromarray(mask, "L").save(root / "ground_truth" / "crack" / f"{stem}_mask.png")
    return root


def test_5_evaluate_refuses_masks_of_another_size_naming_them(
    models_env_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _layout(tmp_path / "set", 2, {"a": (256, 96), "b": (256, 256), "c": (128, 128)})
    code, out, err = _main(capsys, "evaluate", "--model", "test-model", str(data), "--device", "cpu")
    assert code == 2 and out == ""
    assert _one_error_line(err) == (
        "error: 2 ground-truth mask(s) do not have the size of their image: ground_truth/crack/a_mask.png is "
        "256 x 96 but test/crack/a.png is 256 x 256; ground_truth/crack/c_mask.png is 128 x 128 but "
        "test/crack/c.png is 256 x 256. Masks are not stretched (that would move the defect outlines); save each "
        "mask at its image's exact size."
    )
    assert "metrics" not in read_metadata("test-model", models_env_copy)  # nothing half-evaluated was stored


def test_6_evaluate_on_only_good_images_reports_the_false_reject_rate(
    models_env_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _layout(tmp_path / "set", 4, {})
    out_json = tmp_path / "metrics.json"
    code, out, err = _main(capsys, "evaluate", "--model", "test-model", str(data), "--json", str(out_json),
                           "--device", "cpu")
    assert code == 0, err
    assert "nan" not in out.lower() and "Traceback" not in err
    metrics = json.loads(out_json.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    at = metrics["at_threshold"]
    assert metrics["image_auroc"] is None and metrics["n_good"] == 4 and metrics["n_defective"] == 0
    assert at["threshold"] == 1.0 and at["detection_rate"] is None
    assert at["false_reject_rate"] == pytest.approx(at["good_rejected"] / 4)
    assert out.splitlines()[:2] == [
        "image AUROC, pixel AUROC, AUPRO and F1-max need both good and defective test images; this set has only "
        "good ones, so they are not reported",
        f"at the threshold (1.0): {at['good_rejected']} of 4 good images rejected "
        f"(false-reject rate {100 * at['false_reject_rate']:.1f}%)",
    ]
    from fod_app.history import HistoryStore

    (record,) = HistoryStore().evaluations("test-model")  # stored as an evaluation record, not in the bundle
    assert record.metrics["at_threshold"] == at and (record.n_good, record.n_defect) == (4, 0)
    assert "metrics" not in read_metadata("test-model", models_env_copy)


# --------------------------------------------------------------------------- 7. FOD_MODELS_DIR is a file


def test_7_models_dir_that_is_a_file_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fod_app.jobs import JobError, TrainingJobManager, TrainingSpec

    not_a_folder = tmp_path / "models.txt"
    not_a_folder.write_text("I am a file")
    monkeypatch.setenv("FOD_MODELS_DIR", str(not_a_folder))
    _no_training(monkeypatch)
    expected = (f"error: The models folder {not_a_folder} (FOD_MODELS_DIR) is a file, not a folder. "
                "Point FOD_MODELS_DIR at a folder.")
    for argv in (["train", str(SAMPLE_TRAIN), "--name", "x"], ["models"],
                 ["detect", "--model", "x", str(SAMPLES / "good_01.png")]):
        code, out, err = _main(capsys, *argv)
        assert code == 2 and out == "", argv
        assert _one_error_line(err) == expected, argv
    assert not_a_folder.read_text() == "I am a file"

    below = not_a_folder / "models"
    monkeypatch.setenv("FOD_MODELS_DIR", str(below))
    code, _, err = _main(capsys, "train", str(SAMPLE_TRAIN), "--name", "x")
    assert code == 2
    assert _one_error_line(err) == (f"error: The models folder {below} (FOD_MODELS_DIR) cannot be created: "
                                    f"{not_a_folder} is a file, not a folder. Point FOD_MODELS_DIR at a folder.")
    # the app checks it when training is started, not after the run
    spec = TrainingSpec("x", [str(p) for p in sorted(SAMPLE_TRAIN.glob("*.png"))[:12]])
    with pytest.raises(JobError, match="is a file, not a folder"):
        TrainingJobManager().start(spec)


# --------------------------------------------------------------------------- 8. kill -9 between the two renames


def _interrupted_replace(root: Path, staging: Path) -> tuple[bytes, str]:
    """Leave ``root`` as a replacing save of 'test-model' killed between its two renames would; returns
    (the old weights, the new model's version)."""
    old_weights = (root / "test-model" / WEIGHTS_FILE).read_bytes()
    detector = load_bundle("test-model", root=root, device="cpu")
    with torch.no_grad():  # the new model differs from the old one
        next(detector.model.parameters()).add_(0.01)
    new = save_bundle(detector, "test-model", root=staging, extra={"generation": "new"})
    old_time = time.time() - 7200
    os.utime(root / "test-model" / METADATA_FILE, (old_time, old_time))
    os.rename(root / "test-model", root / ".trash-test-model-1a2b3c4d")  # first rename done
    os.rename(new, root / ".tmp-test-model-5e6f7a8b")  # complete, fsynced, not yet renamed: then kill -9
    # an unrelated save killed while writing its weights: incomplete, never restored
    partial = root / ".tmp-test-model-0badf00d"
    shutil.copytree(root / ".tmp-test-model-5e6f7a8b", partial)
    with open(partial / WEIGHTS_FILE, "r+b") as handle:
        handle.truncate(100)
    return old_weights, read_metadata(root / ".tmp-test-model-5e6f7a8b")["model_version"]


def test_8_kill_9_between_the_two_renames_is_recovered_on_the_next_start(
    models_env_copy: Path, tmp_path: Path
) -> None:
    root = models_env_copy
    old_weights, new_version = _interrupted_replace(root, tmp_path / "staging")
    assert not (root / "test-model").exists()  # the state the kill left: no model of that name

    result = run_cli("models", models=root)  # the next start of the CLI
    assert result.returncode == 0, result.stderr
    [previous] = [p.name for p in root.iterdir() if p.name.startswith("test-model.previous-")]
    assert result.stderr.strip().splitlines() == [
        "note: Model 'test-model' was restored after a save was interrupted (its newest complete copy); the "
        f"other copy is kept as model {previous!r}."
    ]
    assert sorted(line.split()[0] for line in result.stdout.splitlines()) == sorted(["test-model", previous])
    restored = load_bundle("test-model", root=root, device="cpu")
    assert restored.metadata["generation"] == "new" and restored.metadata["model_version"] == new_version
    kept = load_bundle(previous, root=root, device="cpu")
    assert kept.metadata["name"] == previous and "generation" not in kept.metadata
    assert kept.metadata["model_version"] != new_version
    assert (root / previous / WEIGHTS_FILE).read_bytes() == old_weights
    assert _hidden(root) == [".tmp-test-model-0badf00d"]  # young and incomplete: left for the stale clean-up

    # the app's path (every page lists the models): only the old copy was complete -> it comes back as it was
    shutil.rmtree(root / "test-model")
    shutil.rmtree(root / ".tmp-test-model-0badf00d")
    os.rename(root / previous, root / ".trash-test-model-99aa88bb")
    (root / ".trash-test-model-99aa88bb" / METADATA_FILE).write_text(
        json.dumps({**read_metadata(root / ".trash-test-model-99aa88bb"), "name": "test-model"}), encoding="utf-8"
    )
    (root / ".tmp-test-model-77cc66dd").mkdir()  # the new copy had not been written yet
    assert [(b.name, b.error) for b in list_bundles(root)] == [("test-model", None)]
    assert (root / "test-model" / WEIGHTS_FILE).read_bytes() == old_weights
    assert _hidden(root) == [".tmp-test-model-77cc66dd"]
    # a complete first save not yet renamed (perhaps still running in another process) is never taken over
    fresh = root / ".tmp-fresh-12345678"
    shutil.copytree(root / "test-model", fresh)
    (fresh / METADATA_FILE).write_text(json.dumps({**read_metadata(fresh), "name": "fresh"}), encoding="utf-8")
    assert [b.name for b in list_bundles(root)] == ["test-model"] and fresh.is_dir()
    # a delete killed after its rename is never undone
    os.rename(root / "test-model", root / ".deleted-test-model-12345678")
    assert list_bundles(root) == [] and not (root / "test-model").exists()


# --------------------------------------------------------------------------- 9. disk full while writing weights


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
        OSError(28, "No space left on device"),
    ],
    ids=["SafetensorError", "OSError-28"],
)
def test_9_disk_full_while_writing_the_weights_is_one_line(
    error: Exception, models_env_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = models_env_copy
    before = {p.name: p.read_bytes() for p in (root / "test-model").iterdir()}
    _stub_training(monkeypatch, root)
    monkeypatch.setattr("fod_app.data.resolve_training_images", lambda _data: sorted(SAMPLE_TRAIN.glob("*.png"))[:12])

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # part of the file got written
        raise error

    monkeypatch.setattr("fod_app.bundle.save_file", full_disk)
    code, out, err = _main(capsys, "train", str(SAMPLE_TRAIN), "--name", "test-model", "--replace", "--quiet")
    assert code == 2 and "saved model" not in out
    assert _one_error_line(err) == (
        "error: Could not save model 'test-model': the disk is full. Existing models are unchanged."
    )
    assert {p.name: p.read_bytes() for p in (root / "test-model").iterdir()} == before
    assert _hidden(root) == [] and [b.name for b in list_bundles(root)] == ["test-model"]
    assert math.isfinite(load_bundle("test-model", root=root, device="cpu").calibration.threshold)
