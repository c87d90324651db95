"""Evening out each photo's exposure (``exposure="even"``): what it promises on real photos, end to end.

The promise: a part photographed brighter/darker or with more/less contrast (one gain and offset over the photo, as
when a line's lighting drifts) gets the same features, score and verdict; the photos as taken are the default and
what models saved before the switch get. Real images: magnetic-tile crops from ../shared/datasets (their exposure
differs from crop to crop) and the bundled solar cells (sample_data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fod_app.backbone import create_feature_extractor
from fod_app.config import FODConfig, create_config
from fod_app.data import list_images, load_images
from fod_app.exposure import LIGHTING_SPREAD, choose_exposure, describe

REPO = Path(__file__).resolve().parents[1]
TILES = REPO.parent / "shared" / "datasets" / "magnetic_tile" / "train" / "good"
BOTTLES = REPO.parent / "shared" / "datasets" / "mvtec_bottle" / "train" / "good"
CELLS = REPO / "sample_data" / "train_good"
TEST_MODEL = "test-model"  # trained by conftest.trained_models_dir (exposure as taken)


def _relight(images: torch.Tensor, gain: float, offset: float) -> torch.Tensor:
    """The same photos under other light: one gain and offset, kept inside [0, 1] (nothing clipped)."""
    out = images * gain + offset
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    return out


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    paths = list_images(TILES)[:4]
    return torch.as_tensor(np.stack([image for _, image in load_images(paths, 256).images]))


@pytest.mark.parametrize("gain, offset", [(0.6, 0.1), (1.3, -0.05)])
def test_even_exposure_features_do_not_change_with_the_light(tiles: torch.Tensor, gain: float, offset: float) -> None:
    photos = 0.2 + 0.5 * tiles  # room for brighter and darker light without clipping
    even = create_feature_extractor(exposure="even")
    as_taken = create_feature_extractor()
    relit = _relight(photos, gain, offset)
    for level, other in zip(even(photos), even(relit)):
        assert float((level - other).abs().max() / level.abs().max()) < 1e-4
    # as taken, the same change of light moves the features by several per cent of their range
    changes = [float((level - other).abs().max() / level.abs().max())
               for level, other in zip(as_taken(photos), as_taken(relit))]
    assert min(changes) > 0.02


def test_exposure_is_validated_and_the_standard_preset_decides_it_from_the_good_photos() -> None:
    assert create_config("cpu").exposure == "auto" and create_config("quick").exposure == "auto"
    assert create_config("paper").exposure == "as_taken"  # the paper's method: photos as taken
    assert FODConfig.from_dict({k: v for k, v in create_config("cpu").to_dict().items() if k != "exposure"}
                               ).exposure == "as_taken"  # models saved before the switch existed
    with pytest.raises(ValueError, match="exposure must be one of"):
        create_config("cpu", exposure="bright")
    with pytest.raises(ValueError, match="exposure must be one of"):
        create_feature_extractor(exposure="auto")  # decided at training, before the extractor is made


def test_auto_exposure_follows_the_good_photos_light() -> None:
    """Bottles photographed under controlled light keep their exposure; magnetic-tile crops, whose light differs
    from crop to crop, get it evened out. Good training images only."""
    bottles = [image for _, image in load_images(list_images(BOTTLES)[:16], 256, compact=True).images]
    chosen, spread = choose_exposure(bottles)
    assert chosen == "as_taken" and max(spread.values()) < LIGHTING_SPREAD / 2
    crops = [image for _, image in load_images(list_images(TILES)[:16], 256, compact=True).images]
    chosen, spread = choose_exposure(crops)
    assert chosen == "even" and min(spread.values()) > 2 * LIGHTING_SPREAD


def test_a_model_trained_with_auto_exposure_keeps_its_choice_and_scores_relit_parts_alike(tmp_path: Path) -> None:
    """Train with "auto" on the bundled cells (their light differs from photo to photo), save, load: the bundle
    keeps "even" and the record of why, and cells photographed darker, or brighter with less contrast, get the
    scores of the photos as taken."""
    from fod_app.bundle import load_bundle, save_bundle
    from fod_app.training import train

    cells = [image for _, image in load_images(list_images(CELLS)[:12], 256).images]
    config = create_config("quick", max_steps=2, exposure="auto")
    detector = train(cells, config, device="cpu")
    record = detector.metadata["training"]["exposure"]
    assert record["requested"] == "auto" and record["used"] == "even"
    assert max(record["lighting_spread"].values()) > LIGHTING_SPREAD
    assert "chosen automatically" in describe(record) and describe(None) == "photos used as taken"
    save_bundle(detector, "even", root=tmp_path)
    loaded = load_bundle("even", root=tmp_path, device="cpu")
    assert loaded.config.exposure == "even" and loaded.backbone.exposure == "even"

    inspect = [image for _, image in load_images(list_images(REPO / "sample_data" / "inspect")[:4], 256).images]
    batch = loaded.to_batch(inspect)
    scores = loaded.score_batch(batch).image_score
    assert torch.allclose(scores, detector.score_batch(batch).image_score, rtol=1e-5)
    for gain, offset in ((0.7, 0.0), (0.6, 0.3)):
        relit = loaded.score_batch(_relight(batch, gain, offset)).image_score
        assert torch.allclose(relit, scores, rtol=1e-3)


def test_cli_train_takes_the_exposure_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from fod_app.bundle import read_metadata
    from fod_app.cli import main

    monkeypatch.setenv("FOD_MODELS_DIR", str(tmp_path))
    code = main(["train", str(CELLS), "--name", "cli-even", "--preset", "quick", "--max-steps", "1",
                 "--exposure", "even", "--device", "cpu"])
    assert code == 0
    assert read_metadata("cli-even", root=tmp_path)["config"]["exposure"] == "even"
    assert "exposure: each photo's brightness and contrast evened out" in capsys.readouterr().out


def test_even_exposure_is_part_of_the_exported_graph(trained_models_dir: Path, tmp_path: Path) -> None:
    """Exported with the switch on, the ONNX file scores like PyTorch (parity) and a relit photo like the photo."""
    from fod_app.bundle import load_bundle
    from fod_app.export import export_onnx, onnx_session, run_onnx

    detector = load_bundle(TEST_MODEL, root=trained_models_dir, device="cpu")
    detector.backbone.exposure = "even"
    images = load_images(list_images(REPO / "sample_data" / "inspect"), detector.config.image_size).images
    result = export_onnx(detector, tmp_path / "even.onnx", use_calibration=False, images=images)
    assert result.parity.passed
    photos = np.stack([image for _, image in images])[:4]
    session = onnx_session(result.path)
    _, scores = run_onnx(session, photos)
    _, relit = run_onnx(session, (photos * 0.8 + 0.1).astype(np.float32))
    assert np.allclose(relit, scores, rtol=1e-3)
