"""End to end through the CLI on a real subset of ../shared/datasets/mvtec_bottle, plus CLI user errors."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "datasets" / "mvtec_bottle"


def run_cli(*args: str, models: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "FOD_MODELS_DIR": str(models), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fod_app", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def bottle_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout copy: 40 train/good, 8 test/good, 4 of each defect type with masks."""
    assert BOTTLE.is_dir(), f"the real test data is missing: {BOTTLE}"
    root = tmp_path_factory.mktemp("data") / "bottle"
    (root / "train" / "good").mkdir(parents=True)
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:40]:
        shutil.copy(path, root / "train" / "good" / path.name)
    (root / "test" / "good").mkdir(parents=True)
    for path in sorted((BOTTLE / "test" / "good").glob("*.png"))[:8]:
        shutil.copy(path, root / "test" / "good" / path.name)
    for defect in ("broken_large", "broken_small", "contamination"):
        (root / "test" / defect).mkdir(parents=True)
        (root / "ground_truth" / defect).mkdir(parents=True)
        for path in sorted((BOTTLE / "test" / defect).glob("*.png"))[:4]:
            shutil.copy(path, root / "test" / defect / path.name)
            mask = BOTTLE / "ground_truth" / defect / f"{path.stem}_mask.png"
            shutil.copy(mask, root / "ground_truth" / defect / mask.name)
    return root


@pytest.fixture(scope="module")
def trained(bottle_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    result = run_cli("train", str(bottle_subset), "--name", "bottle-e2e", "--preset", "quick", "--epochs", "3",
                     "--device", "cpu", models=models)
    assert result.returncode == 0, result.stderr
    assert "saved model 'bottle-e2e'" in result.stdout
    # 6 held-out good images of 40: the prediction bound, said in words
    assert "threshold set by a bell curve (in log) through the few held-back good scores" in result.stdout
    return models


def test_train_evaluate_detect_models(bottle_subset: Path, trained: Path, tmp_path: Path):
    out = tmp_path / "metrics.json"
    result = run_cli("evaluate", "--model", "bottle-e2e", str(bottle_subset), "--json", str(out), models=trained)
    assert result.returncode == 0, result.stderr
    assert re.search(r"inspecting one image takes \d+ ms", result.stdout), result.stdout  # batch 1, no branch maps
    metrics = json.loads(out.read_text())
    assert metrics["n_good"] == 8 and metrics["n_defective"] == 12
    assert metrics["verdict_ms_batch1"] > 0
    # defective images score above good ones, even after a 3-epoch training on 40 images
    assert metrics["image_auroc"] >= 0.85, metrics
    assert metrics["pixel_auroc"] >= 0.85, metrics
    assert set(metrics["per_type_image_auroc"]) == {"broken_large", "broken_small", "contamination"}
    assert 0.0 <= metrics["aupro"] <= 1.0
    # the metrics are stored on the model
    listing = run_cli("models", models=trained)
    assert "bottle-e2e" in listing.stdout and "image_auroc=" in listing.stdout

    csv_path, maps = tmp_path / "results.csv", tmp_path / "maps"
    defect = sorted((bottle_subset / "test" / "broken_large").glob("*.png"))[0]
    good = sorted((bottle_subset / "test" / "good").glob("*.png"))[0]
    result = run_cli("detect", "--model", "bottle-e2e", str(defect), str(good), "--csv", str(csv_path),
                     "--maps", str(maps), models=trained)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["file"] for r in rows] == [str(defect), str(good)]
    columns = {"file", "score", "verdict", "threshold", "model", "model_version", "unfamiliar", "familiarity"}
    assert set(rows[0]) == columns
    assert rows[1]["unfamiliar"] == "false", "a good bottle on a bottle model looks familiar"
    by_file = {r["file"]: float(r["score"]) for r in rows}
    assert by_file[str(defect)] > by_file[str(good)]
    assert rows[0]["verdict"] == "NG" and rows[0]["model"] == "bottle-e2e"
    # both inputs are called 000.png: the heat maps must not overwrite each other
    assert sorted(p.name for p in maps.iterdir()) == ["broken_large_000_heatmap.png", "good_000_heatmap.png"]


def test_detect_reports_unreadable_files_and_keeps_going(trained: Path, bottle_subset: Path, tmp_path: Path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    good = sorted((bottle_subset / "test" / "good").glob("*.png"))[0]
    result = run_cli("detect", "--model", "bottle-e2e", str(bad), str(good), models=trained)
    assert result.returncode == 0
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    assert good.name in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["detect", "--model", "missing-model", "x.png"], "No model named 'missing-model'"),
        (["train", "/nonexistent/folder", "--name", "x"], "/nonexistent/folder"),
        (["train", ".", "--name", "../evil"], "Invalid model name"),
        (["evaluate", "--model", "missing-model", "."], "No model named"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message, tmp_path: Path):
    result = run_cli(*args, models=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_too_few_images_is_a_clear_error(tmp_path: Path):
    folder = tmp_path / "few"
    folder.mkdir()
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:3]:
        shutil.copy(path, folder / path.name)
    result = run_cli("train", str(folder), "--name", "few", models=tmp_path / "models")
    assert result.returncode == 2
    assert "Need at least 10 good images" in result.stderr and "got 3" in result.stderr
    assert not (tmp_path / "models" / "few").exists()


def test_the_paper_preset_on_a_cpu_is_announced_with_its_time(tmp_path: Path, monkeypatch, capsys):
    """The paper-sized model trains at ~1.8 s per step on 2 CPU cores (BENCHMARKS.md "Thirty-third session"): the
    CLI says so, with the time for this set, before any training starts; other presets say nothing."""
    from fod_app import cli, training
    from fod_app.config import create_config

    paper = create_config("paper")
    assert training.cpu_time_warning(create_config("cpu"), 16, "cpu") is None
    assert training.cpu_time_warning(create_config("quick"), 200, "cpu") is None
    # 16 images: 4 held out, 100 passes over 12 at batch 1 = 1200 steps; 200 images: 30 held out, 17000 steps
    assert "its 1200 training steps take about 37 minutes" in training.cpu_time_warning(paper, 16, "cpu")
    assert "its 17000 training steps take about 8.7 hours" in training.cpu_time_warning(paper, 200, "cpu")
    assert "1100 training steps" in training.cpu_time_warning(paper.with_overrides(epochs=100, min_holdout=5), 16,
                                                                "cpu")

    folder = tmp_path / "good"
    folder.mkdir()
    for path in sorted((BOTTLE / "train" / "good").glob("*.png"))[:12]:
        shutil.copy(path, folder / path.name)

    class TrainingStarted(Exception):
        pass

    def no_training(*args, **kwargs):
        raise TrainingStarted

    monkeypatch.setattr(training, "train", no_training)
    monkeypatch.setenv("FOD_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(TrainingStarted):
        cli.main(["train", str(folder), "--name", "paper-cpu", "--preset", "paper", "--device", "cpu"])
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warning == ["warning: The paper preset is meant for a GPU: on this computer's CPU its 800 training steps "
                       "take about 25 minutes (2 cores). On two few-shot sets of the benchmark it was less accurate "
                       "than the Standard preset (`cpu`), which takes minutes."]
    with pytest.raises(TrainingStarted):
        cli.main(["train", str(folder), "--name", "cpu-cpu", "--preset", "cpu", "--device", "cpu"])
    assert "warning: " not in capsys.readouterr().err
