"""Where the nearest good patch is searched (``fod_app.bank_search``, ``memory_bank.place_bank``): the per-position
bank's exact search, the leave-one-out choice on real images, and a positional model end to end (bundle, Explore's
numbers, ONNX parity, tampered files).

Real images: magnetic-tile crops and bottles from ../shared/datasets, the bundled solar cells (sample_data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_memory_bank import _rewrite_weights
from torch.nn import functional as F

from fod_app import bank_search, memory_bank, training
from fod_app.backbone import create_feature_extractor
from fod_app.bundle import BundleError, load_bundle, save_bundle
from fod_app.config import create_config
from fod_app.data import list_images, load_images
from fod_app.model import create_model

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
TILES = DATASETS / "magnetic_tile" / "train" / "good"
BOTTLES = DATASETS / "mvtec_bottle" / "train" / "good"
CELLS = REPO / "sample_data" / "train_good"


def _images(folder: Path, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` good images of ``folder`` (a seeded sample), (3, 256, 256) in [0, 1]."""
    paths = list_images(folder)
    assert len(paths) >= n, f"{folder} is missing (../shared/datasets beside the repository)"
    picked = [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), n, replace=False))]
    return [image for _, image in load_images(picked, 256).images]


@pytest.fixture(scope="module")
def setup():
    """(config, backbone, an untrained cpu-preset model: its bank tokens are PatchCore's raw features)."""
    config = create_config("cpu")
    backbone = create_feature_extractor(config.backbone, device="cpu")
    return config, backbone, create_model(config, backbone.channels, backbone.strides)


def _tokens(setup, images: list[np.ndarray]) -> torch.Tensor:
    """(N, 32, 32, D) bank tokens of ``images``."""
    _, backbone, model = setup
    features = training.extract_features(backbone, images, torch.device("cpu"))
    return model.bank_queries(features)[0].reshape(len(images), 32, 32, -1)


def test_place_distance_is_the_nearest_good_patch_within_one_cell(setup):
    tokens = _tokens(setup, _images(TILES, 6))
    good, query = tokens[:5], tokens[5:].flatten(1, 2)  # (5, 32, 32, D) good, (1, 1024, D) an unseen tile
    complete = memory_bank.place_bank(good, rows=1000, seed=0)  # fewer candidates (5 x 9) than rows: all kept
    assert complete.shape == (1024, 45, good.shape[-1])
    padded = F.pad(good.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate").permute(0, 2, 3, 1)
    expected = torch.stack([torch.cdist(query[0, p : p + 1].double(), padded[:, i : i + 3, j : j + 3].reshape(
        -1, good.shape[-1]).double()).min() for p, (i, j) in enumerate(np.ndindex(32, 32))]).float()
    torch.testing.assert_close(memory_bank.place_distance(query, complete)[0], expected, rtol=1e-4, atol=1e-4)
    # never nearer than the global search over the same images, often farther (the place matters)
    global_distance = memory_bank.nearest_distance(query, good.reshape(-1, good.shape[-1]))[0]
    assert (expected >= global_distance - 1e-3).all() and (expected > global_distance + 1e-3).float().mean() > 0.5
    # a coreset of 16 rows per position: rows of that position's neighbourhood, farther than all 45, seeded
    small = memory_bank.place_bank(good, rows=16, seed=0)
    assert small.shape == (1024, 16, good.shape[-1])
    torch.testing.assert_close(small, memory_bank.place_bank(good, rows=16, seed=0))
    assert torch.isin(small[33].flatten(), complete[33].flatten()).all()
    coarse = memory_bank.place_distance(query, small)[0]
    assert (coarse >= expected - 1e-4).all() and coarse.mean() < 1.3 * expected.mean()


def test_leave_one_out_choice_positional_on_tiles_global_where_the_place_means_nothing(setup):
    """Magnetic-tile crops, where the benchmark measured the positional search better: it is chosen. Bottles whose
    photos were moved at random (up to 96 px each way) have no meaningful place: the global search is chosen, and
    the positional one separates the leave-one-out defects far worse."""
    config, backbone, model = setup
    device = torch.device("cpu")
    tiles = _images(TILES, 16)
    choice = training.choose_search(model, backbone, tiles, training.extract_features(backbone, tiles, device),
                                    config, device)
    assert choice.search == "positional" and choice.n_images == 16
    # several defects per image, each on its own image, image 0's first (the AUROC's labels rely on that order)
    per_image = bank_search.DEFECTS_PER_IMAGE
    defects = bank_search.defect_images(tiles[:2], config.seed, per_image)
    assert per_image > 1 and len(defects) == 2 * per_image
    for k, defect in enumerate(defects):
        changed = np.abs(defect - tiles[k // per_image]).max(0) > 1e-6
        assert 0 < changed.mean() < 0.5 and not np.array_equal(defect, defects[k - 1])
    assert choice.auroc["positional"] > choice.auroc["global"]
    # larger sets keep PatchCore's search without a choice (a place bank from a subset of the images lost)
    many = bank_search.MAX_POSITIONAL_IMAGES
    bank_search.MAX_POSITIONAL_IMAGES = 15
    try:
        large = training.choose_search(model, backbone, tiles, None, config, device)
    finally:
        bank_search.MAX_POSITIONAL_IMAGES = many
    assert large.search == "global" and not large.auroc and "more than 15 training images" in large.describe()

    moved = [np.roll(image, tuple(np.random.default_rng(i).integers(-96, 97, 2)), axis=(1, 2)).copy()
             for i, image in enumerate(_images(BOTTLES, 16))]
    choice = training.choose_search(model, backbone, moved, training.extract_features(backbone, moved, device),
                                    config, device)
    assert choice.search == "global" and choice.auroc["global"] - choice.auroc["positional"] > 0.1
    assert "anywhere" in choice.describe() and "leave-one-out" in choice.describe()
    # the choice reads only the training images it is given: more than MAX_CHOICE_IMAGES -> a seeded subset of them
    assert bank_search.MAX_CHOICE_IMAGES <= 32
    assert bank_search.choose({"global": 0.8, "positional": 0.8}, 20).search == "global"  # a tie keeps PatchCore's


@pytest.fixture(scope="module")
def positional_model(tmp_path_factory):
    """(models root, detector) of a quick positional model (1 pass) on the bundled solar cells, saved and loaded."""
    images = [image for _, image in load_images(list_images(CELLS), 256).images]
    config = create_config("quick", epochs=1, nearest_search="positional")
    detector = training.train(images, config, device="cpu")
    root = tmp_path_factory.mktemp("models")
    save_bundle(detector, "positional", root=root)
    return root, detector


def test_a_positional_model_scores_with_its_place_bank_and_survives_the_bundle(positional_model):
    root, trained = positional_model
    level = trained.model.levels[0]
    # 51 of the 60 cells trained, 9 held out; then all 60 join the banks: one row per image
    n_train, n_bank = (trained.metadata["training"][key] for key in ("n_train", "n_bank_images"))
    assert (n_train, n_bank) == (51, 60) and tuple(level.place_bank.shape) == (1024, n_bank, 152)
    assert level.nearest_search == "positional" and memory_bank.place_rows(n_bank) == n_bank
    assert memory_bank.place_rows(12) == 32 and memory_bank.place_rows(648) == 256  # between 32 and 256 rows
    assert trained.metadata["self_check"]["nearest_search"]["search"] == "positional"
    assert trained.metadata["training"]["place_bank_rows"] == [n_bank, 0]
    loaded = load_bundle("positional", root=root, device="cpu")
    torch.testing.assert_close(loaded.model.levels[0].place_bank, level.place_bank)
    named = load_images(list_images(REPO / "sample_data" / "inspect"), 256).images
    images = [image for _, image in named]
    np.testing.assert_allclose(loaded.raw_scores(images), trained.raw_scores(images), rtol=1e-5)
    # the nearest branch is the place bank's distance: bank tokens searched in their own position's rows
    batch = loaded.to_batch(images[:2])
    features = loaded.backbone(batch)
    outputs = loaded.model([f.float() for f in features], with_reconstruction=False)
    queries = loaded.model.bank_queries([f.float() for f in features])[0]
    torch.testing.assert_close(outputs[0].nearest, memory_bank.place_distance(queries, level.place_bank))
    labels = np.array([name.startswith("defect") for name, _ in named], dtype=int)
    nearest = loaded.score_batch(loaded.to_batch(images), with_branches=True).branch_image_scores["nearest"]
    from fod_app.metrics import image_auroc

    assert image_auroc(labels, nearest.numpy()) >= 0.8  # cracked cells are far from their place's good patches


def test_a_positional_model_exports_to_onnx_with_parity(positional_model, tmp_path):
    from fod_app.export import export_onnx, read_onnx_metadata

    root, _ = positional_model
    detector = load_bundle("positional", root=root, device="cpu")
    result = export_onnx(detector, tmp_path / "positional.onnx", use_calibration=False,
                         images=load_images(list_images(REPO / "sample_data" / "inspect"), 256).images)
    assert result.parity.passed and result.path.is_file()
    assert read_onnx_metadata(result.path)["fod.nearest_search"] == "positional"


@pytest.mark.parametrize("change", [
    lambda t: t.update({"levels.0.place_bank": t["levels.0.place_bank"][:, :1].repeat(1, 300, 1)}),  # > 256 rows
    lambda t: t.update({"levels.0.place_bank": t["levels.0.place_bank"][:1000]}),  # not one row per position
    lambda t: t.update({"levels.0.place_bank": t["levels.0.place_bank"][:1000, :0]}),  # an empty, misshapen bank
])
def test_a_tampered_place_bank_is_refused_with_one_line(positional_model, tmp_path, change):
    import shutil

    root, _ = positional_model
    shutil.copytree(root / "positional", tmp_path / "positional")
    _rewrite_weights(tmp_path / "positional", change)
    with pytest.raises(BundleError, match="per-position bank"):
        load_bundle("positional", root=tmp_path, device="cpu")


def test_the_user_is_told_where_the_nearest_good_patch_is_searched(positional_model):
    """The self-check sentence (CLI, Train and Models pages) and the Explore page's note name the positional search;
    a global model's note does not."""
    from fod_app.explain import unused_correlations_note
    from fod_app.scoring import ScoreSpec
    from fod_app.selfcheck import describe

    root, _ = positional_model
    detector = load_bundle("positional", root=root, device="cpu")
    message, _ = describe(detector.metadata["self_check"])
    assert "searched near its own position (set in the configuration)" in message
    detector.score_spec = ScoreSpec("standardized", {"reconstruction": 0.0, "intra": 0.0, "inter": 0.0,
                                                     "nearest": 1.0}, detector.score_spec.statistics)
    assert "near the patch's own position" in unused_correlations_note(detector)
    detector.model.set_place_banks([torch.zeros(0, 0, 152), torch.zeros(0, 0, 152)])  # back to the global search
    assert detector.model.levels[0].nearest_search == "global"
    assert "own position" not in unused_correlations_note(detector)
    chosen = bank_search.SearchChoice("positional", {"global": 0.71, "positional": 0.74}, 20).to_dict()
    message, _ = describe({"auroc": 0.9, "n_good": 5, "n_synthetic": 40, "nearest_search": chosen})
    assert ("leave-one-out self-check on 20 training images (AUROC anywhere 0.71, near its own position 0.74)"
            in message)


def test_uint8_images_train_the_same_model_and_the_join_builds_the_place_bank_without_a_joined_copy(
        positional_model):
    """The CLI and the app load training images as uint8 (``load_images(compact=True)``: a quarter of the memory);
    the model, its banks and its threshold are those of float images (the fixture's), bit for bit. The held-out
    join builds the per-position bank from two feature sets as from their concatenation."""
    from fod_app.data import to_unit_float

    _, from_floats = positional_model
    paths = list_images(CELLS)
    floats = [image for _, image in load_images(paths, 256).images]
    compact = [image for _, image in load_images(paths, 256, compact=True).images]
    assert all(c.dtype == np.uint8 and np.array_equal(to_unit_float(c), f) for c, f in zip(compact, floats))
    config = create_config("quick", epochs=1, nearest_search="positional")
    from_uint8 = training.train(compact, config, device="cpu")
    for a, b in zip(from_floats.model.levels, from_uint8.model.levels):
        assert torch.equal(a.patch_bank, b.patch_bank) and torch.equal(a.place_bank, b.place_bank)
    assert from_uint8.calibration.threshold == from_floats.calibration.threshold
    np.testing.assert_array_equal(from_uint8.raw_scores(floats[:4]), from_floats.raw_scores(floats[:4]))
    np.testing.assert_array_equal(from_uint8.raw_scores(compact[:4]), from_floats.raw_scores(floats[:4]))  # same input

    features = training.extract_features(from_uint8.backbone, compact[:16], torch.device("cpu"))
    first, more = [f[:10] for f in features], [f[10:] for f in features]
    split = training.place_banks(from_uint8.model, first, config, more=more)
    assert torch.equal(split[0], training.place_banks(from_uint8.model, features, config)[0])
