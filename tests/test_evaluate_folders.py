"""Evaluation from the folders engineers have: plain good/ + defect/ folders (with or without masks), a zip of
them, the MVTec layout; downloads (CSV, JSON, HTML); the CLI. Real images from the shared MVTec bottle set."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fod_app.archive import extract_images_from_zip
from fod_app.bundle import load_bundle
from fod_app.data import DatasetError, load_image, prepare_image
from fod_app.evaluation import FALSE_REJECT, MISS, evaluate_detector, outcome
from fod_app.evaluation_data import find_labelled_root, load_labelled_set
from fod_app.evaluation_report import evaluation_csv, evaluation_html, evaluation_json

REPO = Path(__file__).resolve().parents[1]
BOTTLE = (REPO / ".." / "shared" / "datasets" / "mvtec_bottle").resolve()
if not BOTTLE.is_dir():  # worktrees live beside the main checkout
    BOTTLE = Path("/work/shared/datasets/mvtec_bottle")


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copy(source, target)


def make_plain_set(root: Path, good: str = "good", defect_folders: dict[str, str] | None = None,
                   n_good: int = 4, n_each: int = 2, masks_for: tuple[str, ...] = ()) -> Path:
    """good/ + defect folders of real bottle images; ``defect_folders`` maps our folder name -> bottle type.

    Masks (``ground_truth/<folder>/<stem>_mask.png``) only for the folders in ``masks_for``.
    """
    defect_folders = defect_folders or {"defect": "broken_large"}
    for i in range(n_good):
        _link(BOTTLE / "test" / "good" / f"{i:03d}.png", root / good / f"good_{i:03d}.png")
    for folder, bottle_type in defect_folders.items():
        for i in range(n_each):
            _link(BOTTLE / "test" / bottle_type / f"{i:03d}.png", root / folder / f"{bottle_type}_{i:03d}.png")
            if folder in masks_for:
                _link(BOTTLE / "ground_truth" / bottle_type / f"{i:03d}_mask.png",
                      root / "ground_truth" / folder / f"{bottle_type}_{i:03d}_mask.png")
    return root


def make_mvtec_set(root: Path) -> Path:
    """test/good (3) + test/broken_large (2) + ground_truth, no train/ folder at all."""
    for i in range(3):
        _link(BOTTLE / "test" / "good" / f"{i:03d}.png", root / "test" / "good" / f"{i:03d}.png")
    for i in range(2):
        _link(BOTTLE / "test" / "broken_large" / f"{i:03d}.png", root / "test" / "broken_large" / f"{i:03d}.png")
        _link(BOTTLE / "ground_truth" / "broken_large" / f"{i:03d}_mask.png",
              root / "ground_truth" / "broken_large" / f"{i:03d}_mask.png")
    return root


def zip_of(folder: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, f"{top}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


# --------------------------------------------------------------------------- layouts (no model)


def test_plain_good_defect_folders_without_masks(tmp_path: Path) -> None:
    data = load_labelled_set(make_plain_set(tmp_path / "parts"))
    assert data.layout == "folders" and (data.n_good, data.n_defect) == (4, 2)
    assert data.defect_types == ["defect"] and data.image_level_only


def test_ok_ng_folders_and_type_folders_next_to_good(tmp_path: Path) -> None:
    ok_ng = load_labelled_set(make_plain_set(tmp_path / "a", good="OK", defect_folders={"NG": "broken_large"}))
    assert (ok_ng.n_good, ok_ng.n_defect, ok_ng.defect_types) == (4, 2, ["NG"])
    types = load_labelled_set(make_plain_set(
        tmp_path / "b", defect_folders={"broken_large": "broken_large", "contamination": "contamination"},
        masks_for=("contamination",)))
    assert types.defect_types == ["broken_large", "contamination"] and types.n_defect == 4
    assert types.n_defect_with_mask == 2 and not types.image_level_only
    with_mask = {t.path.name: t.mask_path for t in types.test_items if t.label}
    assert with_mask["contamination_000.png"].name == "contamination_000_mask.png"
    assert with_mask["broken_large_000.png"] is None


def test_the_set_is_found_inside_a_top_folder_and_mvtec_needs_no_train(tmp_path: Path) -> None:
    make_plain_set(tmp_path / "wrap" / "inner" / "parts")
    assert find_labelled_root(tmp_path / "wrap") == tmp_path / "wrap" / "inner" / "parts"
    mvtec = load_labelled_set(make_mvtec_set(tmp_path / "bottle"))
    assert mvtec.layout == "mvtec" and (mvtec.n_good, mvtec.n_defect, mvtec.n_defect_with_mask) == (3, 2, 2)
    assert not (tmp_path / "bottle" / "train").exists()


def test_clear_one_line_errors_for_unusable_folders(tmp_path: Path) -> None:
    only_defect = tmp_path / "nogood"
    _link(BOTTLE / "test" / "broken_large" / "000.png", only_defect / "defect" / "000.png")
    with pytest.raises(DatasetError) as err:
        load_labelled_set(only_defect)
    assert "no good/ (or ok/) folder found" in str(err.value) and "\n" not in str(err.value)
    only_good = tmp_path / "onlygood"
    _link(BOTTLE / "test" / "good" / "000.png", only_good / "good" / "000.png")
    (only_good / "defect").mkdir()  # an empty defect folder does not count
    with pytest.raises(DatasetError) as err:
        load_labelled_set(only_good)
    assert "no defect folder with images next to it" in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- evaluation with the real test model


@pytest.fixture(scope="module")
def detector(trained_models_dir: Path):
    return load_bundle("test-model", root=trained_models_dir, device="cpu")


def test_evaluate_plain_folders_gives_image_level_metrics_only(detector, tmp_path: Path) -> None:
    data = load_labelled_set(make_plain_set(tmp_path / "parts"))
    report = evaluate_detector(detector, data)
    result = report.result
    assert (result.n_good, result.n_defective) == (4, 2) and len(report.records) == 6
    assert report.image_level_only and report.layout == "folders" and report.dataset_name == "parts"
    assert 0.0 <= result.image_auroc <= 1.0 and 0.0 <= result.f1_max <= 1.0
    assert math.isnan(result.pixel_auroc) and math.isnan(result.aupro)
    metrics = report.to_dict()
    assert metrics["image_level_only"] is True and metrics["pixel_auroc"] is None
    # the scores are the detector's own (the same as Inspect gives)
    first = report.records[0]
    image = prepare_image(load_image(first["path"]), detector.config.image_size)
    inspected = next(detector.inspect([("x", image)]))
    assert first["score"] == pytest.approx(inspected.score, abs=1e-3)
    # per-branch AUROC for educators; "combined" is the model's own score
    assert "combined" in report.branch_auroc and "reconstruction" in report.branch_auroc
    assert report.branch_auroc["combined"] == pytest.approx(result.image_auroc)
    assert all(0.0 <= v <= 1.0 for v in report.branch_auroc.values())
    assert report.maps is not None and report.maps.shape == (6, detector.config.image_size, detector.config.image_size)


def test_the_reported_latency_is_the_verdict_alone_at_batch_1(detector, tmp_path: Path, monkeypatch) -> None:
    """Evaluation scores in batches with every branch's map (for per-branch AUROC); what it reports as the time to
    inspect one image is the verdict alone at batch 1, as Inspect, detect and the REST server score."""
    calls: list[tuple[int, bool]] = []
    score_batch = type(detector).score_batch

    def recording(self, batch, with_branches=False):
        calls.append((int(batch.shape[0]), with_branches))
        return score_batch(self, batch, with_branches)

    monkeypatch.setattr(type(detector), "score_batch", recording)
    report = evaluate_detector(detector, load_labelled_set(make_plain_set(tmp_path / "parts")), batch_size=4)
    scoring, timing = calls[:2], calls[2:]
    assert scoring == [(4, True), (2, True)]  # 6 images in batches of 4, with the branches
    assert timing == [(1, False)] * 7  # one warm-up, then each of the 6 images alone, no branch maps
    assert report.verdict_ms > 0 and report.to_dict()["verdict_ms_batch1"] == round(report.verdict_ms, 1)


def test_masks_are_used_where_present(detector, tmp_path: Path) -> None:
    root = make_plain_set(tmp_path / "parts", defect_folders={"broken_large": "broken_large",
                                                              "contamination": "contamination"},
                          masks_for=("contamination",))
    report = evaluate_detector(detector, load_labelled_set(root))
    assert report.n_defect_with_mask == 2 and not report.image_level_only
    assert 0.0 <= report.result.pixel_auroc <= 1.0 and 0.0 <= report.result.aupro <= 1.0
    assert report.result.n_defective == 4
    assert sum(r["has_mask"] for r in report.records) == 2


def test_zip_of_plain_folders(detector, tmp_path: Path) -> None:
    source = make_plain_set(tmp_path / "src", good="ok", defect_folders={"ng": "broken_large"})
    target = tmp_path / "unzipped"
    extract_images_from_zip(zip_of(source, "my_parts"), target, keep_structure=True, name="parts.zip")
    data = load_labelled_set(target)
    assert data.name == "my_parts" and (data.n_good, data.n_defect) == (4, 2)
    report = evaluate_detector(detector, data, dataset_path="parts.zip")
    assert report.dataset_path == "parts.zip" and report.result.n_good == 4 and report.image_level_only


def test_mvtec_layout_keeps_working(detector, tmp_path: Path) -> None:
    report = evaluate_detector(detector, load_labelled_set(make_mvtec_set(tmp_path / "bottle")))
    assert (report.result.n_good, report.result.n_defective) == (3, 2)
    assert not report.image_level_only and math.isfinite(report.result.pixel_auroc)
    assert {r["file"] for r in report.records} >= {"test/good/000.png", "test/broken_large/001.png"}


def test_downloads_contain_every_row_and_the_errors(detector, tmp_path: Path) -> None:
    report = evaluate_detector(detector, load_labelled_set(make_plain_set(tmp_path / "parts")))
    threshold = float(np.median(report.scores))  # a threshold with errors on both sides is likely
    rows = list(csv.DictReader(io.StringIO(evaluation_csv(report, threshold, "test-model", "v1"))))
    assert len(rows) == 6 and {r["truth"] for r in rows} == {"good", "defective"}
    assert {"file", "score", "verdict", "outcome", "combined_score", "threshold", "dataset"} <= set(rows[0])
    for row in rows:
        assert row["outcome"] == outcome(row["truth"] == "defective", float(row["score"]), threshold)
    summary = json.loads(evaluation_json(report, threshold, "test-model", "v1"))
    assert summary["dataset"]["n_good"] == 4 and summary["dataset"]["n_defective"] == 2
    assert summary["image_level_only"] is True and summary["threshold"] == threshold
    assert set(summary["metrics"]["branch_image_auroc"]) >= {"reconstruction", "combined"}
    page = evaluation_html(report, threshold, "test-model", "v1")
    errors = report.errors(threshold)
    assert page.count("data:image/jpeg;base64,") == 2 * (len(errors[MISS]) + len(errors[FALSE_REJECT]))
    assert "Image-level metrics only" in page and "http://" not in page and "https://" not in page
    for record in report.records:
        assert record["file"] in page


# --------------------------------------------------------------------------- CLI and records


def test_cli_evaluate_plain_folders_and_zip_keeps_every_record(
    models_env_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fod_app import cli
    from fod_app.bundle import read_metadata
    from fod_app.history import HistoryStore

    monkeypatch.setenv("FOD_HISTORY_DB", str(tmp_path / "history.sqlite3"))
    monkeypatch.setenv("FOD_DEVICE", "cpu")
    folder = make_plain_set(tmp_path / "parts")
    files = {kind: tmp_path / f"out.{kind}" for kind in ("json", "csv", "html")}
    code = cli.main(["evaluate", "--model", "test-model", str(folder), "--device", "cpu", "--threshold", "1.5",
                     *[arg for kind, path in files.items() for arg in (f"--{kind}", str(path))]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "(image level only: no defect masks, so no pixel AUROC or AUPRO)" in out
    assert "image AUROC per branch: reconstruction" in out and "combined" in out
    assert "at the threshold (1.5):" in out and "4 good, 2 defective" in out
    metrics = json.loads(files["json"].read_text())
    assert metrics["n_good"] == 4 and metrics["image_level_only"] is True and metrics["threshold"] == 1.5
    assert len(list(csv.DictReader(io.StringIO(files["csv"].read_text())))) == 6
    assert files["html"].read_text().startswith("<!DOCTYPE html>")

    zipped = tmp_path / "more_parts.zip"
    zipped.write_bytes(zip_of(make_plain_set(tmp_path / "src", good="OK", defect_folders={"NG": "broken_large"},
                                             n_good=3), "more_parts"))
    assert cli.main(["evaluate", "--model", "test-model", str(zipped), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "3 good, 2 defective" in out and "recorded as evaluation" in err

    records = HistoryStore().evaluations("test-model")
    assert [(r.dataset_name, r.n_good, r.n_defect, r.threshold_units) for r in records] == [
        ("more_parts", 3, 2, 1.0), ("parts", 4, 2, 1.5)]  # newest first; the first is kept, not overwritten
    assert records[1].dataset_path == str(folder.resolve()) and records[0].dataset_path == str(zipped.resolve())
    assert records[1].image_level_only and records[1].metrics["image_auroc"] == metrics["image_auroc"]
    assert "metrics" not in read_metadata("test-model", models_env_copy)
    assert cli.main(["models"]) == 0
    assert f"image_auroc={records[0].metrics['image_auroc']:.4f}" in capsys.readouterr().out


def test_cli_evaluate_refuses_a_folder_without_defects_in_one_line(
    models_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fod_app import cli

    only_good = tmp_path / "only_good"
    _link(BOTTLE / "test" / "good" / "000.png", only_good / "good" / "000.png")
    assert cli.main(["evaluate", "--model", "test-model", str(only_good), "--no-history"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: only_good: good/ has images but there is no defect folder") and "\n" not in err
