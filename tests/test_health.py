"""Tests for fod_app.health on the real training sets plus injected problems."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fod_app.data import list_images, load_image
from fod_app.exposure import LIGHTING_SPREAD
from fod_app.health import HealthReport, check_training_set, outlier_limit

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BOTTLE = DATASETS / "mvtec_bottle"
TILE = DATASETS / "magnetic_tile"

# The real data sets are required: a missing folder fails the tests instead of skipping them.
assert BOTTLE.is_dir() and TILE.is_dir(), f"real data sets not found in {DATASETS}"

Named = list[tuple[str, Image.Image]]


def _load(folder: Path) -> Named:
    return [(p.name, load_image(p)) for p in list_images(folder)]


@pytest.fixture(scope="module")
def bottles() -> Named:
    return _load(BOTTLE / "train" / "good")


@pytest.fixture(scope="module")
def tiles() -> Named:
    return _load(TILE / "train" / "good")


@pytest.fixture(scope="module")
def bottle_report(bottles: Named) -> HealthReport:
    return check_training_set(bottles)


@pytest.fixture(scope="module")
def tile_report(tiles: Named) -> HealthReport:
    return check_training_set(tiles)


def _noise(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))


def _reasons(report: HealthReport) -> dict[str, str]:
    return dict(report.outliers)


def test_real_bottle_set_is_healthy(bottle_report: HealthReport) -> None:
    r = bottle_report
    assert r.count == 209
    assert r.outliers == []
    assert r.near_duplicates == []
    assert r.warnings == []
    assert r.ok and r.enough_images
    assert r.sizes == {(256, 256): 209}
    assert r.modes == {"RGB": 209}
    assert r.kinds == {"colour": 209}
    assert max(r.outlier_scores.values()) < outlier_limit(r.count)
    # photographed under controlled light: no suggestion to even out the exposure
    assert max(r.lighting_spread.values()) < LIGHTING_SPREAD and r.notes == []


def test_real_tile_set_is_healthy(tile_report: HealthReport) -> None:
    r = tile_report
    assert r.count == 762
    assert r.outliers == []  # false-flag rate 0 / 762
    assert r.near_duplicates == []
    assert r.warnings == []
    assert r.modes == {"L": 762}
    assert r.kinds == {"grayscale": 762}
    # the crops' exposure differs from photo to photo: the report suggests evening it out, without calling it a problem
    assert min(r.lighting_spread.values()) > 0.2
    assert len(r.notes) == 1 and "evening out each photo's brightness and contrast" in r.notes[0]


def test_bottle_photo_among_tiles_is_flagged(tiles: Named) -> None:
    bottle = load_image(BOTTLE / "test" / "good" / "000.png")
    report = check_training_set([*tiles, ("stray_bottle.png", bottle)])
    assert [name for name, _ in report.outliers] == ["stray_bottle.png"]
    assert _reasons(report)["stray_bottle.png"].startswith("in colour while 762 of the other images are grayscale")
    assert any(w.startswith("1 image(s) look very different from the rest: stray_bottle.png") for w in report.warnings)
    assert any(w.startswith("Mixed colour and grayscale images: 1 in colour") for w in report.warnings)

    grey_bottle = bottle.convert("L").convert("RGB")
    report = check_training_set([*tiles, ("grey_bottle.png", grey_bottle)])
    assert [name for name, _ in report.outliers] == ["grey_bottle.png"]
    assert "its content looks unlike the other images" in _reasons(report)["grey_bottle.png"]


def test_noise_and_blank_images_are_flagged(bottles: Named) -> None:
    report = check_training_set([*bottles, ("noise.png", _noise()), ("black.png", Image.new("RGB", (256, 256)))])
    reasons = _reasons(report)
    assert sorted(reasons) == ["black.png", "noise.png"]
    assert reasons["noise.png"].startswith("much more fine detail or noise than the others")
    assert "almost uniform (a blank frame, lens cap" in reasons["black.png"]


def test_grey_image_among_colour_images(bottles: Named) -> None:
    grey = bottles[5][1].convert("L").convert("RGB")
    report = check_training_set([*bottles[:60], ("grey.png", grey)])
    assert _reasons(report) == {"grey.png": "grayscale while 60 of the other images are colour"}
    # the same shot in another colour mode is still the same photo
    assert report.near_duplicates == [["005.png", "grey.png"]]


def test_small_real_subsets_raise_no_false_flags(tiles: Named, bottles: Named) -> None:
    rng = np.random.default_rng(7)
    flagged = 0
    for pool in (tiles, bottles):
        for size in (12, 25, 60):
            for _ in range(3):
                subset = [pool[i] for i in rng.choice(len(pool), size, replace=False)]
                flagged += len(check_training_set(subset).outliers)
    assert flagged == 0


def test_duplicates_and_reencoded_copies(bottles: Named) -> None:
    name, img = bottles[0]
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=60)
    copy = load_image(buf.getvalue(), name="copy.jpg")
    report = check_training_set([*bottles[:40], ("exact_copy.png", img.copy()), ("copy.jpg", copy)])
    assert report.near_duplicates == [[name, "exact_copy.png", "copy.jpg"]]
    assert any(
        w.startswith("1 group(s) of identical or near-identical images (2 extra copies), e.g. 000.png")
        for w in report.warnings
    )


def test_all_identical(bottles: Named) -> None:
    img = bottles[0][1]
    report = check_training_set([(f"{i}.png", img.copy()) for i in range(12)])
    assert report.near_duplicates == [[f"{i}.png" for i in range(12)]]
    assert "All 12 images are identical or nearly identical." in " ".join(report.warnings)
    assert report.outliers == []


def test_too_few_images_and_failures(bottles: Named) -> None:
    report = check_training_set(bottles[:3], failures=[("bad.png", "the file is empty (0 bytes)")])
    assert not report.enough_images
    assert report.warnings[0] == (
        "1 file(s) could not be read and will be left out: bad.png (the file is empty (0 bytes))."
    )
    assert report.warnings[1].startswith(
        "Only 3 usable good image(s); at least 10 are needed to train (50 or more recommended)."
    )
    assert report.outlier_scores == {}  # too few to judge outliers

    fewer = check_training_set(bottles[:20])
    assert fewer.enough_images
    assert fewer.warnings == [
        "20 good images is enough to train, but 50 or more give a model that is less likely to "
        "flag normal variation as a defect."
    ]


def test_empty_set() -> None:
    report = check_training_set([])
    assert report.count == 0
    assert report.warnings[0].startswith("Only 0 usable good image(s)")


def test_mixed_sizes_and_shapes(bottles: Named) -> None:
    base = bottles[:50]
    bigger = [(f"big{i}.png", img.resize((300, 300))) for i, (_, img) in enumerate(bottles[50:53])]
    report = check_training_set(base + bigger)
    assert report.sizes == {(256, 256): 50, (300, 300): 3}
    assert any(
        w.startswith("Images come in 2 different sizes (e.g. 256x256 (50), 300x300 (3))") for w in report.warnings
    )
    wide = [(f"wide{i}.png", img.resize((512, 256))) for i, (_, img) in enumerate(bottles[50:53])]
    report = check_training_set(base + wide)
    assert any(w.startswith("Images have different shapes (2 sizes") for w in report.warnings)


def test_mixed_colour_and_grey_halves(bottles: Named, tiles: Named) -> None:
    report = check_training_set(bottles[:30] + tiles[:30])
    assert report.kinds == {"colour": 30, "grayscale": 30}
    assert report.modes == {"RGB": 30, "L": 30}
    assert any(
        w.startswith("Mixed colour and grayscale images: 30 in colour (e.g. 000.png, 001.png") for w in report.warnings
    )


def test_outlier_limit_shrinks_with_more_images() -> None:
    assert outlier_limit(10) == pytest.approx(10.0)
    assert outlier_limit(50) == pytest.approx(6.0)
    assert outlier_limit(10_000) == pytest.approx(5.005)
