"""Calibration: thresholds from good images only, threshold units, verdict bands."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_verdict_bands():
    assert verdict(1.0) == "NG" and verdict(0.99) == "OK"
    assert verdict(0.85, 1.0, 0.8) == "REVIEW" and verdict(0.5, 1.0, 0.8) == "OK"
    assert verdict(1.2, 1.5, 0.8) == "REVIEW"


def test_holdout_count():
    assert holdout_count(10, 0.15, 4) == 3  # never more than a third
    assert holdout_count(60, 0.15, 4) == 9
    assert holdout_count(209, 0.15, 4) == 31
