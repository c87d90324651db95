"""Wrong-part check on real images: solar cells on a bottle model and bottles on a solar-cell model are flagged,
good images of the trained part mostly are not; old bundles without the reference still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fod_app.bundle import BundleError, load_bundle, save_bundle
from fod_app.config import create_config
from fod_app.data import list_images, load_images
from fod_app.familiarity import MESSAGE, FamiliarityReference, fit_reference, summary
from fod_app.training import train

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
if not DATASETS.is_dir():
    DATASETS = Path("/work/shared/datasets")
BOTTLE = DATASETS / "mvtec_bottle"
TILE = DATASETS / "magnetic_tile"
SOLAR_INSPECT = REPO / "sample_data" / "inspect"


def _images(paths: list[Path], size: int = 256) -> list[tuple[str, np.ndarray]]:
    return load_images(paths, size).images


def _inspect(detector, paths: list[Path]) -> list:
    return list(detector.inspect(_images(paths, detector.config.image_size)))


@pytest.fixture(scope="module")
def bottle_model(tmp_path_factory: pytest.TempPathFactory):
    """A small real bottle model (quick preset, 1 epoch, 28 train/good images: 24 learn + 4 held out)."""
    root = tmp_path_factory.mktemp("bottle-models")
    paths = list_images(BOTTLE / "train" / "good")[:28]
    detector = train([a for _, a in _images(paths)], create_config("quick", epochs=1), device="cpu")
    save_bundle(detector, "bottle", root=root)
    return load_bundle("bottle", root=root, device="cpu")


def test_solar_cells_on_a_bottle_model_are_flagged(bottle_model) -> None:
    solar = _inspect(bottle_model, list_images(SOLAR_INSPECT))
    assert all(r.unfamiliar for r in solar), [(r.name, r.familiarity) for r in solar]
    assert min(r.familiarity for r in solar) > 2.0  # far beyond the limit, not a borderline call
    good = _inspect(bottle_model, list_images(BOTTLE / "test" / "good"))
    flagged = [r.name for r in good if r.unfamiliar]
    assert len(flagged) / len(good) <= 0.10, flagged  # 20 unseen good bottles: at most 2 flagged
    assert summary([r.unfamiliar for r in solar]).startswith(MESSAGE)
    assert summary([r.unfamiliar for r in good if not r.unfamiliar]) is None


def test_bottles_and_tiles_on_a_solar_cell_model_are_flagged(models_env: Path) -> None:
    solar_model = load_bundle("test-model", device="cpu")  # conftest: trained on sample_data/train_good
    bottles = _inspect(solar_model, list_images(BOTTLE / "test" / "good")[:8])
    tiles = _inspect(solar_model, list_images(TILE / "test" / "good")[:4])
    assert all(r.unfamiliar for r in bottles + tiles), [(r.name, r.familiarity) for r in bottles + tiles]
    cells = _inspect(solar_model, list_images(SOLAR_INSPECT))  # 6 good and 10 defective unseen solar cells
    flagged = [r.name for r in cells if r.unfamiliar]
    assert len(flagged) <= 1, flagged
    good = [r for r in cells if r.name.startswith("good")]
    assert good and not any(r.unfamiliar for r in good)
    assert all(0 < r.familiarity < 1 for r in good)


def test_old_bundle_without_reference_loads_and_skips_the_check(trained_models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(trained_models_dir, root)
    meta_path = root / "test-model" / "bundle.json"
    meta = json.loads(meta_path.read_text())
    assert "familiarity" in meta  # new models carry the reference
    meta.pop("familiarity")
    meta_path.write_text(json.dumps(meta))
    detector = load_bundle("test-model", root=root, device="cpu")
    assert detector.familiarity_reference() is None
    result = _inspect(detector, list_images(BOTTLE / "test" / "good")[:1])[0]
    assert result.familiarity is None and result.unfamiliar is False


def test_malformed_reference_is_a_clear_bundle_error(trained_models_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(trained_models_dir, root)
    meta_path = root / "test-model" / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["familiarity"]["spread"] = meta["familiarity"]["spread"][:-1]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="familiarity"):
        load_bundle("test-model", root=root, device="cpu")


def test_reference_round_trip_and_limit_from_held_out() -> None:
    rng = np.random.default_rng(0)
    train_d = torch.as_tensor(rng.normal(0, 1, (40, 16)))
    held_d = torch.as_tensor(rng.normal(0, 1, (8, 16)))
    reference = fit_reference(train_d, held_d)
    assert reference.limit >= 3.0 * max(reference.holdout_distances) - 1e-9
    again = FamiliarityReference.from_dict(json.loads(json.dumps(reference.to_dict())))
    assert np.allclose(again.units(held_d.numpy()), reference.units(held_d.numpy()))
    assert (reference.units(held_d.numpy()) < 1).all()
    assert (reference.units(held_d.numpy() + 5.0) >= 1).all()  # every channel shifted by 5 spreads
    with pytest.raises(ValueError, match="does not match"):
        reference.units(np.zeros((1, 3)))


def test_inspect_page_warns_about_images_of_another_part(models_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FOD_DEVICE", "cpu")
    bottle = list_images(BOTTLE / "test" / "good")[0]
    cell = SOLAR_INSPECT / "good_01.png"
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    at.run()
    at.switch_page("pages/3_inspect.py").run()
    at.file_uploader(key="inspect_uploads").set_value(
        [("bottle.png", bottle.read_bytes(), "image/png"), (cell.name, cell.read_bytes(), "image/png")]
    ).run()
    assert not at.exception, [e.value for e in at.exception]
    warning = " ".join(str(w.value) for w in at.warning)
    assert MESSAGE in warning and "(1 of 2 images)" in warning and "Flagged: bottle.png." in warning
    # a reload (a new session) reopens the run from the history, and the warning with it
    reloaded = AppTest.from_file(str(REPO / "app.py"), default_timeout=180)
    reloaded.run()
    reloaded.switch_page("pages/3_inspect.py").run()
    assert not reloaded.exception, [e.value for e in reloaded.exception]
    assert any("Showing the last inspection" in str(i.value) for i in reloaded.info)
    warning = " ".join(str(w.value) for w in reloaded.warning)
    assert MESSAGE in warning and "(1 of 2 images)" in warning and "Flagged: bottle.png." in warning
