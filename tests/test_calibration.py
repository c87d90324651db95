"""Calibration: thresholds from good images only, threshold units, verdict bands."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fod_app.calibration import Calibration, holdout_count, verdict


def test_threshold_from_lognormal_fit_rejects_about_the_design_rate():
    rng = np.random.default_rng(0)
    calibration_scores = rng.lognormal(mean=0.0, sigma=0.3, size=30)
    cal = Calibration.from_scores(calibration_scores, quantile=0.99)
    assert cal.threshold > np.median(calibration_scores)
    # on many fresh good images from the same distribution, about 1% are rejected
    fresh = rng.lognormal(mean=0.0, sigma=0.3, size=200_000)
    rate = float(np.mean(fresh >= cal.threshold))
    assert 0.001 < rate < 0.05
    assert cal.expected_false_reject_rate() == pytest.approx(0.01)


@pytest.mark.parametrize("n_holdout", [4, 5, 12, 40])
def test_false_reject_rate_on_fresh_good_images_is_the_design_rate_even_with_few_held_out(n_holdout: int) -> None:
    """Averaged over many trainings, the threshold rejects ~1 % of new good parts, also with 4 held-out images.

    A plain normal quantile of 4 scores rejects several times more (measured on ELPV@16 before: 35 %).
    """
    rng = np.random.default_rng(n_holdout)
    rates = []
    for _ in range(2000):
        cal = Calibration.from_scores(rng.lognormal(0.0, 0.3, size=n_holdout), quantile=0.99)
        rates.append(float(stats.lognorm(0.3).sf(cal.threshold)))  # exact rejection rate of this threshold
    assert 0.005 < float(np.mean(rates)) < 0.02


def test_one_stray_held_out_image_does_not_set_the_threshold() -> None:
    rng = np.random.default_rng(1)
    scores = rng.lognormal(0.0, 0.3, size=114)
    clean = Calibration.from_scores(scores).threshold
    scores[0] = 9.0 * np.median(scores)  # a strange "good" image among the held-out ones
    assert Calibration.from_scores(scores).threshold < 1.1 * clean


def test_units_and_false_reject_rate():
    cal = Calibration.from_scores([1.0, 1.1, 1.2, 0.9, 1.05, 0.95], quantile=0.99)
    assert cal.to_units(cal.threshold) == pytest.approx(1.0)
    assert cal.false_reject_rate(1.0) == 0.0
    assert cal.false_reject_rate(0.0) == 1.0
    low = min(cal.good_scores) / cal.threshold
    assert cal.false_reject_rate(low) == 1.0


def test_round_trip_and_invalid():
    cal = Calibration.from_scores([1.0, 2.0, 3.0])
    again = Calibration.from_dict(cal.to_dict())
    assert again.threshold == cal.threshold and again.good_scores == cal.good_scores
    with pytest.raises(ValueError, match="at least 2"):
        Calibration.from_scores([1.0])
    with pytest.raises(ValueError):
        Calibration.from_scores([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-positive"):
        Calibration.from_dict({"good_scores": [1.0], "threshold": 0.0, "quantile": 0.99})


def test_synthetic_catch_rate_is_stored_and_never_moves_the_threshold():
    cal = Calibration.from_scores([1.0, 1.1, 1.2, 0.9])
    assert cal.synthetic_catch_rate() is None  # older models: none recorded
    assert "synthetic_scores" not in cal.to_dict()
    cal.synthetic_scores = [0.5 * cal.threshold, cal.threshold, 2.0 * cal.threshold, 3.0 * cal.threshold]
    assert cal.synthetic_catch_rate() == 0.75  # at the threshold counts as caught, like a verdict of NG
    assert cal.synthetic_catch_rate(2.5) == 0.25 and cal.synthetic_catch_rate(0.1) == 1.0
    again = Calibration.from_dict(cal.to_dict())
    assert again.synthetic_scores == cal.synthetic_scores and again.threshold == cal.threshold
    assert Calibration.from_scores(cal.good_scores).threshold == cal.threshold
    with pytest.raises(ValueError, match="synthetic"):
        Calibration.from_dict({**cal.to_dict(), "synthetic_scores": [1.0, float("inf")]})


def test_verdict_bands():
    assert verdict(1.0) == "NG" and verdict(0.99) == "OK"
    assert verdict(0.85, 1.0, 0.8) == "REVIEW" and verdict(0.5, 1.0, 0.8) == "OK"
    assert verdict(1.2, 1.5, 0.8) == "REVIEW"


def test_holdout_count():
    assert holdout_count(10, 0.15, 4) == 3  # never more than a third
    assert holdout_count(60, 0.15, 4) == 9
    assert holdout_count(209, 0.15, 4) == 31


def test_a_threshold_on_few_held_out_images_comes_with_a_note() -> None:
    from fod_app.calibration import margin_note

    assert "only 4 held-back good images" in margin_note(4)
    assert margin_note(31) is None
