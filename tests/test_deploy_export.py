"""ONNX export with its parity guarantee, on the session's real model and real images (sample_data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_MODEL = "test-model"  # trained by conftest.trained_models_dir
INSPECT = REPO / "sample_data" / "inspect"


@pytest.fixture(scope="module")
def exported(trained_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``test-model`` exported once for this module: (detector, result)."""
    from fod_app.bundle import load_bundle
    from fod_app.export import export_onnx

    detector = load_bundle(TEST_MODEL, root=trained_models_dir, device="cpu")
    out = tmp_path_factory.mktemp("onnx") / "test-model.onnx"
    return detector, export_onnx(detector, out)


def _inspect_images(size: int) -> list[tuple[str, np.ndarray]]:
    from fod_app.data import list_images, load_images

    return load_images(list_images(INSPECT), size).images


def test_export_writes_a_file_that_scores_like_pytorch(exported) -> None:
    from fod_app.export import onnx_session, read_onnx_metadata, run_onnx

    detector, result = exported
    assert result.path.is_file() and result.parity.passed
    assert result.parity.n_images >= 8  # the calibration images and their synthetic defects
    assert "calibration images" in result.parity.sources[0]
    assert not list(result.path.parent.glob(".*.tmp"))  # no temporary file left
    # On images the check never saw (sample_data/inspect: good and defective solar cells), ONNX = PyTorch.
    named = _inspect_images(detector.config.image_size)
    reference = list(detector.inspect(named))
    maps, scores = run_onnx(onnx_session(result.path, device="cpu"), np.stack([img for _, img in named]))
    expected = np.array([r.score for r in reference])
    np.testing.assert_allclose(scores, expected, rtol=1e-3)
    np.testing.assert_allclose(maps, np.stack([r.anomaly_map for r in reference]), atol=1e-3)
    review = detector.calibration.review_threshold / detector.calibration.threshold
    from fod_app.calibration import verdict

    assert [verdict(float(s), 1.0, review) for s in scores] == [r.verdict for r in reference]
    meta = read_onnx_metadata(result.path)
    assert meta["fod.model_name"] == TEST_MODEL
    assert meta["fod.model_version"] == detector.metadata["model_version"]
    assert meta["fod.weights_sha256"] == detector.metadata["weights"]["sha256"]
    assert float(meta["fod.threshold_raw"]) == pytest.approx(detector.calibration.threshold)
    assert meta["fod.score_mode"] == detector.score_spec.mode
    assert "[B, 3, 256, 256]" in meta["fod.input"] and "threshold units" in meta["fod.outputs"]


def test_parity_check_detects_a_graph_that_scores_differently(exported) -> None:
    """The same file compared with a model whose threshold moved by 1 %: the check fails (and says why)."""
    from fod_app.export import ScoringGraph, calibration_images, parity_check

    detector, result = exported
    graph = ScoringGraph(detector).eval()
    graph.threshold *= 1.01
    report = parity_check(graph, result.path, calibration_images(detector), ["calibration"], 0.8)
    assert not report.passed
    assert report.max_relative_score_diff == pytest.approx(0.01, rel=0.05)
    assert "tolerance 0.001" in report.describe()


def test_failed_parity_writes_nothing(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fod_app import export as export_module

    detector, result = exported
    failing = export_module.ParityReport(3, 0.02, 0.5, ["x: PyTorch OK 0.5, ONNX NG 1.2"], ["test"])
    monkeypatch.setattr(export_module, "parity_check", lambda *a, **k: failing)
    monkeypatch.setattr(export_module, "_trace_to_onnx", lambda graph, path, exporter: path.write_bytes(b"onnx"))
    out = tmp_path / "refused.onnx"
    with pytest.raises(export_module.ExportError, match="parity check failed, nothing was written"):
        export_module.export_onnx(detector, out)
    assert list(tmp_path.iterdir()) == []


def test_product_score_mode_exports_with_parity(exported, tmp_path: Path) -> None:
    """A bundle scoring with the paper's product formula exports that path (not the standardised one)."""
    from fod_app.export import export_onnx, read_onnx_metadata
    from fod_app.scoring import ScoreSpec

    detector, _ = exported
    saved = detector.score_spec
    try:
        detector.score_spec = ScoreSpec()  # product (paper Eq. 12)
        result = export_onnx(detector, tmp_path / "product.onnx", use_calibration=False,
                             images=_inspect_images(detector.config.image_size))
    finally:
        detector.score_spec = saved
    assert result.parity.passed and result.parity.n_images == 16
    assert read_onnx_metadata(result.path)["fod.score_mode"] == "product"


def test_cli_export_refuses_without_parity_images(models_env_copy: Path, tmp_path: Path, capsys) -> None:
    from fod_app.bundle import update_metadata
    from fod_app.cli import main

    update_metadata(TEST_MODEL, {"data": {"source": str(tmp_path / "moved-away")}})
    code = main(["export", "--model", TEST_MODEL, "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no images for the parity check" in err and "--images DIR" in err
    assert not (tmp_path / "m.onnx").exists()
    assert main(["export", "--model", TEST_MODEL, "--out", str(tmp_path / "m.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_ignore_regions_are_part_of_the_exported_graph(exported, tmp_path: Path) -> None:
    """A model with ignore regions exports them: parity holds and the ONNX map is 0 inside them."""
    from fod_app.export import export_onnx, onnx_session, read_onnx_metadata, run_onnx
    from fod_app.ignore_regions import create_ignore_regions

    detector, _ = exported
    size = detector.config.image_size
    detector.ignore_regions = create_ignore_regions("0,0,0.5,0.3", size=size)
    try:
        images = _inspect_images(size)
        result = export_onnx(detector, tmp_path / "ignore.onnx", use_calibration=False, images=images)
        maps, scores = run_onnx(onnx_session(result.path), np.stack([img for _, img in images]))
        ignored = detector.ignore_regions.ignored(size)
    finally:
        detector.ignore_regions = None
    assert result.parity.passed
    assert np.all(maps[:, ignored] == 0)
    assert np.allclose(scores, maps.reshape(len(images), -1).max(axis=1), rtol=1e-5)
    assert "0.3" in read_onnx_metadata(result.path)["fod.ignore_regions"]
