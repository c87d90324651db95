"""Tests for fod_app.metrics (AUROC, AUPRO, F1-max, curves, evaluate)."""

from __future__ import annotations

import bisect
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from fod_app import metrics as M

GT_DIR = (
    Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile" / "ground_truth"
)


# --------------------------------------------------------------------------- helpers


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Slow, literal AUPRO: one pass per distinct threshold (MVTec AD definition)."""
    regions = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(float(np.mean(normal >= t)))
        pros.append(float(np.mean([np.mean(maps[i][r] >= t) for i, r in regions])))
    fprs.append(1.0)
    pros.append(1.0)
    x, y = np.array(fprs), np.array(pros)
    # MVTec's trapezoid(x, y, x_max): interpolate the curve at x_max
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect.bisect(x.tolist(), fpr_limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (
            x[ins] - x[ins - 1]
        )
        correction = 0.5 * (y_interp + y[ins - 1]) * (fpr_limit - x[ins - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return float((0.5 * np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) + correction) / fpr_limit)


def random_masks(
    rng: np.random.Generator, n: int, h: int, w: int, empty_every: int = 3
) -> np.ndarray:
    """Masks [n, h, w] with several rectangles each; every ``empty_every``-th mask is empty."""
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        if i % empty_every == 0:
            continue
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, h - 2), rng.integers(0, w - 2)
            dr, dc = rng.integers(1, max(2, h // 4)), rng.integers(1, max(2, w // 4))
            masks[i, r : r + dr, c : c + dc] = True
    return masks


def load_real_masks(n: int = 20, size: int = 256) -> np.ndarray:
    from PIL import Image as image_mod

    assert GT_DIR.is_dir(), f"dataset not found: {GT_DIR}"
    out = []
    for path in sorted(GT_DIR.rglob("*.png")):
        with image_mod.open(path) as img:
            m = np.asarray(img.convert("L").resize((size, size), image_mod.NEAREST)) > 127
        if m.any():
            out.append(m)
    assert len(out) >= n, "not enough non-empty masks"
    idx = np.linspace(0, len(out) - 1, n).astype(int)  # spread over the defect classes
    return np.stack([out[i] for i in idx])


# --------------------------------------------------------------------------- image level


def test_image_auroc_perfect_inverted_random() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    assert M.image_auroc(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == 1.0
    assert M.image_auroc(labels, np.array([0.9, 0.8, 0.7, 0.2, 0.1])) == 0.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 4000)
    assert abs(M.image_auroc(y, rng.random(4000)) - 0.5) < 0.05


def test_image_auroc_matches_sklearn_and_single_class_nan() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # ties
    assert M.image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert math.isnan(M.image_auroc(np.ones(4), np.arange(4.0)))
    assert math.isnan(M.image_auroc(np.zeros(4), np.arange(4.0)))


def test_f1_max_known_case_and_confusion() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    f1, thr = M.f1_max(labels, scores)
    assert f1 == pytest.approx(0.8)
    assert thr == pytest.approx(0.35)
    c = M.confusion_at(labels, scores, thr)
    assert c == {"tp": 2, "fp": 1, "tn": 1, "fn": 0}
    assert 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) == pytest.approx(f1)
    assert M.confusion_at(labels, scores, 0.8) == {"tp": 1, "fp": 0, "tn": 2, "fn": 1}
    assert M.f1_max(np.array([1, 1]), np.array([0.2, 0.9])) == (1.0, 0.2)
    assert all(math.isnan(v) for v in M.f1_max(np.zeros(3), np.arange(3.0)))


def test_roc_and_pr_points_are_plot_ready() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 50)
    s = rng.random(50) + y
    roc = M.roc_points(y, s)
    assert set(roc) == {"fpr", "tpr", "thresholds"}
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"])
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    assert all(math.isfinite(t) for t in roc["thresholds"]) and roc["thresholds"][0] > s.max()
    pr = M.pr_points(y, s)
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["thresholds"]) + 1
    json.dumps({"roc": roc, "pr": pr}, allow_nan=False)
    assert M.roc_points(np.zeros(3), np.arange(3.0)) == {"fpr": [], "tpr": [], "thresholds": []}


def test_per_type_auroc() -> None:
    types = ["good", "good", "good", "crack", "crack", "hole", "hole"]
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.2, 0.3, 0.4, 0.9, 0.8, 0.1, 0.35])
    out = M.per_type_auroc(types, labels, scores)
    assert list(out) == ["crack", "hole"]
    assert out["crack"] == 1.0
    assert out["hole"] == pytest.approx(roc_auc_score([0, 0, 0, 1, 1], [0.2, 0.3, 0.4, 0.1, 0.35]))
    assert math.isnan(M.per_type_auroc(["a", "b"], np.array([1, 1]), np.array([0.1, 0.2]))["a"])


# --------------------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_pixel_auroc_matches_sklearn(dtype: type) -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 12, 40, 48)
    maps = rng.random(masks.shape) + 0.4 * masks
    maps = (maps * 100).astype(dtype) if dtype is np.uint8 else np.round(maps, 2).astype(dtype)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_matches_sklearn_large() -> None:
    """Several million pixels, split across sorting threads."""
    rng = np.random.default_rng(4)
    masks = random_masks(rng, 40, 256, 256)
    maps = (rng.random(masks.shape, dtype=np.float32) + 0.3 * masks).astype(np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_perfect_inverted_random_and_degenerate() -> None:
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 6, 32, 32)
    assert M.pixel_auroc(masks, masks.astype(np.float32)) == 1.0
    assert M.pixel_auroc(masks, 1.0 - masks) == 0.0
    big = random_masks(rng, 20, 64, 64, empty_every=100)
    assert abs(M.pixel_auroc(big, rng.random(big.shape)) - 0.5) < 0.02
    assert math.isnan(M.pixel_auroc(np.zeros((2, 8, 8), bool), rng.random((2, 8, 8))))
    assert math.isnan(M.pixel_auroc(np.ones((2, 8, 8), bool), rng.random((2, 8, 8))))
    with pytest.raises(ValueError):
        M.pixel_auroc(masks, np.full(masks.shape, np.nan))
    with pytest.raises(ValueError):
        M.pixel_auroc(masks, np.zeros((1, 2, 3)))


# --------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 7, 24, 20)  # includes all-zero masks
    maps = rng.random(masks.shape) + rng.uniform(0, 0.8) * masks
    if seed % 2:
        maps = np.round(maps, 1)  # heavy ties between normal and defective pixels
    if seed == 5:
        maps = maps.astype(np.float32)
    expected = reference_aupro(masks, maps, fpr_limit)
    assert M.aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-10)


def test_aupro_perfect_inverted_and_degenerate() -> None:
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 6, 32, 32)
    assert M.aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert M.aupro(masks, masks + 0.5 * rng.random(masks.shape)) == pytest.approx(1.0)
    assert M.aupro(masks, 1.0 - masks - 0.5 * rng.random(masks.shape)) == pytest.approx(0.0)
    assert math.isnan(M.aupro(np.zeros((2, 8, 8), bool), rng.random((2, 8, 8))))
    with pytest.raises(ValueError):
        M.aupro(masks, masks.astype(float), fpr_limit=0.0)


def test_aupro_uses_8_connectivity() -> None:
    """Two blocks touching only at a corner form ONE region (8-connectivity)."""
    mask = np.zeros((1, 12, 12), dtype=bool)
    mask[0, 0:2, 0:2] = True  # 4 pixels, detected
    mask[0, 2:8, 2:8] = True  # 36 pixels, missed; touches the first block diagonally
    maps = np.zeros(mask.shape)
    maps[0, 0:2, 0:2] = 1.0
    # one region, 4/40 covered at FPR = 0; then a straight line to (1, 1): PRO(0.3) = 0.37.
    # (with 4-connectivity there would be two regions and PRO(0) = 0.5)
    assert M.aupro(mask, maps, fpr_limit=0.3) == pytest.approx((0.1 + 0.37) / 2)
    assert M.aupro(mask, maps, fpr_limit=0.3) == pytest.approx(reference_aupro(mask, maps, 0.3))


def test_aupro_binned_approximates_exact() -> None:
    rng = np.random.default_rng(8)
    masks = random_masks(rng, 10, 48, 48)
    maps = rng.random(masks.shape) + 0.5 * masks
    exact = M.aupro(masks, maps)
    assert M.aupro(masks, maps, num_thresholds=5000) == pytest.approx(exact, abs=2e-3)
    assert M.aupro(masks, maps, num_thresholds=200) == pytest.approx(exact, abs=3e-2)


# --------------------------------------------------------------------------- real masks


def test_real_masks_blurred_maps_score_high_and_noise_scores_chance() -> None:
    rng = np.random.default_rng(9)
    real = load_real_masks(20)
    masks = np.concatenate([real, np.zeros((5, *real.shape[1:]), dtype=bool)])  # + good images
    blurred = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 3, 3))
    maps = (blurred + rng.normal(0, 0.1, masks.shape)).astype(np.float32)
    pix = M.pixel_auroc(masks, maps)
    assert pix == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert pix > 0.9
    assert M.aupro(masks, maps) > 0.9
    noise = rng.random(masks.shape, dtype=np.float32)
    assert abs(M.pixel_auroc(masks, noise) - 0.5) < 0.02
    assert abs(M.aupro(masks, noise) - 0.15) < 0.05  # PRO ~ FPR -> area ~ limit / 2


def test_real_masks_aupro_matches_reference() -> None:
    real = load_real_masks(8, size=64)
    rng = np.random.default_rng(10)
    blurred = ndimage.gaussian_filter(real.astype(float), sigma=(0, 2, 2))
    maps = np.round(blurred + rng.normal(0, 0.2, real.shape), 2)  # ~ a few hundred levels
    assert M.aupro(real, maps) == pytest.approx(reference_aupro(real, maps), abs=1e-10)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_and_to_dict() -> None:
    rng = np.random.default_rng(11)
    masks = random_masks(rng, 9, 32, 32)
    labels = masks.any(axis=(1, 2)).astype(int)
    maps = rng.random(masks.shape) + masks
    scores = maps.max(axis=(1, 2))
    types = ["good" if y == 0 else ("a" if i % 2 else "b") for i, y in enumerate(labels)]
    res = M.evaluate(labels, scores, masks, maps, types)
    assert res.image_auroc == M.image_auroc(labels, scores)
    assert res.pixel_auroc == pytest.approx(M.pixel_auroc(masks, maps))
    assert res.aupro == pytest.approx(M.aupro(masks, maps))
    assert (res.f1_max, res.f1_threshold) == M.f1_max(labels, scores)
    assert res.per_type_image_auroc == M.per_type_auroc(types, labels, scores)
    assert (res.n_good, res.n_defective) == (3, 6)
    assert res.seconds >= 0
    d = res.to_dict()
    assert set(d) == {
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "f1_max",
        "f1_threshold",
        "per_type_image_auroc",
        "n_good",
        "n_defective",
        "seconds",
    }
    json.dumps(d, allow_nan=False)
    no_pixels = M.evaluate(labels, scores).to_dict()
    assert no_pixels["pixel_auroc"] is None and no_pixels["aupro"] is None
    assert no_pixels["per_type_image_auroc"] == {}
    json.dumps(no_pixels, allow_nan=False)


def test_timing_600_maps(capsys: pytest.CaptureFixture[str]) -> None:
    """Report (not assert) the time of the pixel metrics on 600 maps of 256x256."""
    rng = np.random.default_rng(12)
    masks = random_masks(rng, 600, 256, 256, empty_every=4)
    maps = rng.random(masks.shape, dtype=np.float32)
    maps += 0.5 * masks
    t0 = time.perf_counter()
    pix = M.pixel_auroc(masks, maps)
    t1 = time.perf_counter()
    pro = M.aupro(masks, maps)
    t2 = time.perf_counter()
    res = M.evaluate(masks.any(axis=(1, 2)), maps.max(axis=(1, 2)), masks, maps)
    with capsys.disabled():
        print(
            f"\n[timing 600x256x256] pixel_auroc {t1 - t0:.2f}s ({pix:.4f}), "
            f"aupro {t2 - t1:.2f}s ({pro:.4f}), evaluate {res.seconds:.2f}s"
        )
    assert 0.5 < pix <= 1.0 and 0.0 < pro <= 1.0
