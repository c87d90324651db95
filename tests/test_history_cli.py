"""``detect`` records every run in the inspection history (--db, $FOD_HISTORY_DB, default; --no-history)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fod_app.cli import main
from fod_app.history import HistoryStore
from fod_app.records import decode_map_png, read_rgb

REPO = Path(__file__).resolve().parents[1]
INSPECT = REPO / "sample_data" / "inspect"


def test_detect_records_a_run(models_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "h.sqlite3"
    files = sorted(INSPECT.glob("*.png"))[:3]
    assert main(["detect", "--model", "test-model", "--device", "cpu", "--db", str(db), *map(str, files)]) == 0
    err = capsys.readouterr().err
    assert "recorded in the history as run" in err
    store = HistoryStore(db)
    (summary,) = store.runs()
    run = store.run(summary.run_id)
    meta = __import__("fod_app.bundle", fromlist=["read_metadata"]).read_metadata("test-model")
    assert (run.source, run.model_name, run.model_version) == ("cli", "test-model", meta["model_version"])
    assert run.weights_sha256 == meta["weights"]["sha256"]
    assert run.threshold == pytest.approx(meta["calibration"]["threshold"]) and run.threshold_units == 1.0
    assert [Path(i.file_name).name for i in run.images] == [f.name for f in files]
    for image, path in zip(run.images, files):
        assert image.content_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert image.raw_score == pytest.approx(image.score * run.threshold, rel=1e-5)
        assert image.verdict == ("NG" if image.score >= 1.0 else "REVIEW" if image.score >= 0.8 else "OK")
        size = meta["config"]["image_size"]
        assert read_rgb(image.thumbnail_path).shape == (size, size, 3)
        assert decode_map_png(image.map_path).shape == (size, size)
        assert image.heatmap_path.is_file()


def test_detect_env_default_and_opt_out(models_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "env.sqlite3"
    monkeypatch.setenv("FOD_HISTORY_DB", str(db))
    one = str(sorted(INSPECT.glob("*.png"))[0])
    assert main(["detect", "--model", "test-model", "--device", "cpu", one]) == 0
    assert main(["detect", "--model", "test-model", "--device", "cpu", "--no-history", one]) == 0
    assert main(["detect", "--model", "test-model", "--device", "cpu", "--threshold", "2.5", one]) == 0
    runs = HistoryStore(db).runs()
    assert len(runs) == 2 and runs[0].threshold_units == 2.5


def test_detect_with_a_corrupt_history_still_inspects(models_env: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    db = tmp_path / "bad.sqlite3"
    db.write_bytes(b"garbage" * 1000)
    one = str(sorted(INSPECT.glob("*.png"))[0])
    assert main(["detect", "--model", "test-model", "--device", "cpu", "--db", str(db), one]) == 0
    out = capsys.readouterr()
    assert "not recorded in the history" in out.err and "damaged" in out.err
    assert Path(one).name in out.out
