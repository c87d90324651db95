"""Batch scoring on Ray Data: a local Ray with 2 workers gives exactly the local path's results, and resumes."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_MODEL = "test-model"  # trained by conftest.trained_models_dir


def _csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def _assert_same_results(rows: list[list[str]], expected: list[list[str]]) -> None:
    """Same header, files, verdicts, threshold, model and version in the same order; the same scores as printed
    (4 decimals; Ray's 1-thread actors may round the last digit differently when a score lies within ~1e-6 of a
    rounding boundary, so one unit in the 4th decimal is allowed)."""
    assert rows[0] == expected[0]
    assert [r[:1] + r[2:] for r in rows] == [r[:1] + r[2:] for r in expected]
    for row, want in zip(rows[1:], expected[1:]):
        assert abs(float(row[1]) - float(want[1])) <= 1.0001e-4, (row, want)


def test_ray_scores_like_the_local_path_and_a_rerun_skips_scored_images(
    models_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fod_app.cli import main
    from fod_app.history import HistoryStore

    folder = tmp_path / "images"  # 40 real images (solar cells) and one broken file
    folder.mkdir()
    for src in sorted((REPO / "sample_data" / "train_good").glob("*.png"))[:24]:
        shutil.copy(src, folder / src.name)
    for src in sorted((REPO / "sample_data" / "inspect").glob("*.png")):
        shutil.copy(src, folder / src.name)
    (folder / "broken.png").write_bytes(b"not an image")

    local_csv, ray_csv, rerun_csv = tmp_path / "local.csv", tmp_path / "ray.csv", tmp_path / "rerun.csv"
    local_db, ray_db = tmp_path / "local.sqlite3", tmp_path / "ray.sqlite3"
    assert main(["detect", "--model", TEST_MODEL, str(folder), "--csv", str(local_csv), "--db", str(local_db),
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["detect", "--model", TEST_MODEL, str(folder), "--csv", str(ray_csv), "--db", str(ray_db),
                 "--device", "cpu", "--engine", "ray", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "broken.png: unreadable" in err and "scored 41/41" in err

    local_rows, ray_rows = _csv_rows(local_csv), _csv_rows(ray_csv)
    assert len(local_rows) == 41  # header + 40 images
    _assert_same_results(ray_rows, local_rows)

    local_run = HistoryStore(local_db).run(HistoryStore(local_db).runs()[0].run_id)
    ray_runs = HistoryStore(ray_db).runs()
    assert [r.source for r in ray_runs] == ["ray"] and ray_runs[0].n_images == 40
    ray_images = {i.content_sha256: i for i in HistoryStore(ray_db).run(ray_runs[0].run_id).images}
    for image in local_run.images:
        twin = ray_images[image.content_sha256]
        assert twin.verdict == image.verdict
        assert twin.raw_score == pytest.approx(image.raw_score, rel=1e-5, abs=1e-5)  # z-scores near 0
        assert twin.heatmap_path is not None and twin.heatmap_path.is_file()

    # a rerun (e.g. after a crash) scores nothing again: every image is already in the history
    (folder / "broken.png").unlink()  # (an unreadable file would be tried again)
    assert main(["detect", "--model", TEST_MODEL, str(folder), "--csv", str(rerun_csv), "--db", str(ray_db),
                 "--device", "cpu", "--engine", "ray", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "40 of 40 images were already scored" in err and "starting Ray" not in err
    assert len(HistoryStore(ray_db).runs()) == 1
    # rows taken from the history carry score, verdict and the wrong-part figure, like the first run's rows
    rerun_rows = _csv_rows(rerun_csv)
    assert all(r[-1] for r in rerun_rows[1:]), "the wrong-part figure is kept in the history"
    _assert_same_results(rerun_rows, local_rows)
