"""Ignore regions: parsing, storage in the bundle, scoring, evaluation metrics and the CLI, on real images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from fod_app import metrics
from fod_app.bundle import BundleError, load_bundle, read_metadata, set_ignore_regions
from fod_app.data import list_images, load_images
from fod_app.ignore_regions import IgnoreRegions, IgnoreRegionsError, create_ignore_regions, parse_rectangles

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DEFECTS = REPO / "sample_data" / "inspect"


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def test_rectangles_are_fractions_of_the_image_and_bad_ones_are_refused() -> None:
    regions = create_ignore_regions("0,0,0.25,1; 0.5,0.5,1,1", size=8)
    ignored = regions.ignored(8)
    assert ignored[:, :2].all() and not ignored[:4, 2:].any()  # left quarter, then nothing above the middle
    assert ignored[4:, 4:].all() and ignored.sum() == 16 + 16 - 0
    for bad in ("0,0,1", "0.5,0,0.2,1", "0,0,1.5,1", "a,b,c,d"):
        with pytest.raises(IgnoreRegionsError):
            parse_rectangles(bad)
    with pytest.raises(IgnoreRegionsError, match="at most 90%"):
        create_ignore_regions("0,0,1,0.95")
    assert create_ignore_regions("", None) is None


def test_mask_image_any_size_white_is_ignored_and_garbage_is_refused() -> None:
    mask = np.zeros((100, 50), bool)
    mask[:, :25] = True  # left half of a non-square photo
    regions = create_ignore_regions(mask_image=_png(mask), size=16)
    assert regions.ignored(16)[:, :8].all() and not regions.ignored(16)[:, 8:].any()
    with pytest.raises(IgnoreRegionsError, match="not a readable image"):
        create_ignore_regions(mask_image=b"not an image")
    round_trip = IgnoreRegions.from_dict(json.loads(json.dumps(regions.to_dict())))
    assert np.array_equal(round_trip.ignored(16), regions.ignored(16))


def _hot_spot_image(detector) -> tuple[str, np.ndarray, tuple[int, int]]:
    size = detector.config.image_size
    report = load_images(list_images(SAMPLE_DEFECTS), size)
    results = list(detector.inspect(report.images))
    worst = max(results, key=lambda r: r.score)
    y, x = np.unravel_index(np.argmax(worst.anomaly_map), worst.anomaly_map.shape)
    image = dict(report.images)[worst.name]
    return worst.name, image, (int(y), int(x))


def test_ignoring_the_defect_area_lowers_the_score_and_zeroes_the_map(models_env_copy: Path) -> None:
    detector = load_bundle("test-model", root=models_env_copy, device="cpu")
    name, image, (y, x) = _hot_spot_image(detector)
    before = next(detector.inspect([(name, image)]))
    size = detector.config.image_size
    box = (max(0, x - 40) / size, max(0, y - 40) / size, min(size, x + 40) / size, min(size, y + 40) / size)
    set_ignore_regions("test-model", create_ignore_regions((box,), size=size), root=models_env_copy)
    meta = read_metadata("test-model", root=models_env_copy)
    assert meta["ignore_regions"]["calibrated"] is False  # threshold kept from training, and it says so
    masked = load_bundle("test-model", root=models_env_copy, device="cpu")
    after = next(masked.inspect([(name, image)]))
    ignored = masked.ignore_regions.ignored(size)
    assert ignored[y, x]
    assert np.all(after.anomaly_map[ignored] == 0)
    assert after.score < before.score
    # the score is the largest map value outside the ignored pixels
    assert after.score == pytest.approx(float(before.anomaly_map[~ignored].max()), rel=1e-4)
    set_ignore_regions("test-model", None, root=models_env_copy)
    assert load_bundle("test-model", root=models_env_copy, device="cpu").ignore_regions is None


def test_a_tampered_mask_in_the_bundle_is_refused(models_env_copy: Path) -> None:
    path = models_env_copy / "test-model" / "bundle.json"
    meta = json.loads(path.read_text())
    meta["ignore_regions"] = {"rectangles": [], "mask_png": "!!not base64!!"}
    path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="ignore_regions"):
        load_bundle("test-model", root=models_env_copy, device="cpu")


def test_pixel_metrics_leave_ignored_pixels_out() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:5] = masks[1, 7:10, 1:4] = True
    maps = rng.random((3, 12, 12)) + 0.3 * masks
    ignore = np.zeros((12, 12), bool)
    ignore[:, 8:] = True
    maps[:, ignore] += 1.0  # a fixture on the right that always looks anomalous
    result = metrics.evaluate(np.array([1, 1, 0]), np.array([2.0, 1.5, 0.3]), masks, maps, ignore=ignore)
    keep = ~ignore
    expected = roc_auc_score(masks[:, keep].ravel(), maps[:, keep].ravel())
    assert result.pixel_auroc == pytest.approx(expected)
    assert result.pixel_auroc > metrics.pixel_auroc(masks, maps) + 0.1  # the fixture no longer counts
    assert 0.0 < result.aupro <= 1.0


def test_cli_sets_and_clears_ignore_regions(models_env_copy: Path, tmp_path: Path) -> None:
    from fod_app.cli import main

    mask = np.zeros((64, 64), bool)
    mask[:, :10] = True
    mask_file = tmp_path / "mask.png"
    mask_file.write_bytes(_png(mask))
    assert main(["ignore", "--model", "test-model", "--rect", "0.8,0,1,1", "--mask", str(mask_file)]) == 0
    regions = load_bundle("test-model", root=models_env_copy, device="cpu").ignore_regions
    assert regions is not None and regions.ignored(256)[:, -1].all() and regions.ignored(256)[:, 0].all()
    assert main(["ignore", "--model", "test-model", "--rect", "1,0,0,1"]) == 2  # one-line error, nothing changed
    assert load_bundle("test-model", root=models_env_copy, device="cpu").ignore_regions is not None
    assert main(["ignore", "--model", "test-model", "--clear"]) == 0
    assert load_bundle("test-model", root=models_env_copy, device="cpu").ignore_regions is None
