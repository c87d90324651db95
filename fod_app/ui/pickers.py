"""Widgets shared by the Inspect, Explore and Evaluate pages: model choice and the decision thresholds.

The thresholds live in plain session-state keys (not widget keys) so they survive page switches and
mean the same on every page; widgets copy their value there in ``on_change`` callbacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import streamlit as st

from ..bundle import BundleError
from ..calibration import DEFAULT_REVIEW_FRACTION, check_threshold
from ..inference import Detector
from .common import GONE_MODEL_KEY, active_model, get_detector, model_names, set_active_model

THRESHOLD_KEY = "fod_threshold"
REVIEW_ON_KEY = "fod_review_on"
REVIEW_KEY = "fod_review"
_THRESHOLD_MODEL_KEY = "fod_threshold_model"
THRESHOLD_MIN, THRESHOLD_MAX = 0.1, 3.0  # slider range; it grows when a larger threshold is set explicitly
_THRESHOLD_LIMIT = 1000.0


@dataclass
class Decision:
    """The current decision rule in threshold units (1.0 = calibrated threshold); review None = no band."""

    threshold: float
    review: float | None


def pick_model(page: str) -> tuple[str, Detector] | None:
    """Model selectbox (changes the app-wide active model) and the loaded detector, or None with a message."""
    names = model_names()
    current = active_model()
    gone = st.session_state.pop(GONE_MODEL_KEY, None)
    if gone is not None and gone != current:
        st.warning(
            f"Model {gone!r} no longer exists (it was deleted or renamed, perhaps in another session). "
            + (f"Now using {current!r}; choose another model below if needed." if current else "")
        )
    if not names:
        st.info("There is no trained model yet. Open the **Train** page, train a model on photos of good parts, "
                "then come back here.")
        return None
    key = f"{page}_model_choice"
    st.session_state[key] = current
    st.selectbox(
        "Model", names, key=key, on_change=lambda: set_active_model(st.session_state[key]),
        help="The trained model used on this page. Changing it here changes it on every page.",
    )
    name = st.session_state[key]
    try:
        detector = get_detector(name)
    except BundleError as err:
        st.error(f"Model {name!r} cannot be loaded: {err}")
        return None
    if detector.calibration is None:
        st.error(f"Model {name!r} has no calibration; train it again.")
        return None
    _reset_thresholds_for(name, detector)
    return name, detector


def default_review(detector: Detector) -> float:
    cal = detector.calibration
    if cal is not None and cal.review_threshold is not None and cal.threshold > 0:
        return round(cal.review_threshold / cal.threshold, 2)
    return DEFAULT_REVIEW_FRACTION


def _reset_thresholds_for(name: str, detector: Detector) -> None:
    """Thresholds start at the calibrated values and go back to them when another model is chosen."""
    if st.session_state.get(_THRESHOLD_MODEL_KEY) != name:
        st.session_state[_THRESHOLD_MODEL_KEY] = name
        st.session_state[THRESHOLD_KEY] = 1.0
        st.session_state[REVIEW_KEY] = default_review(detector)
        st.session_state.setdefault(REVIEW_ON_KEY, False)


def set_threshold(value: float) -> None:
    """Change the NG threshold (threshold units), e.g. from an explicit 'use this threshold' button.

    A non-finite or non-positive value is refused (the threshold stays as it is): with NaN nothing could
    ever be NG.
    """
    try:
        number = check_threshold(value)
    except ValueError:
        return
    st.session_state[THRESHOLD_KEY] = round(min(max(number, THRESHOLD_MIN), _THRESHOLD_LIMIT), 2)


def _stored_threshold() -> float:
    """The session's NG threshold; one that is not finite and positive is replaced by the calibrated 1.0."""
    try:
        return check_threshold(st.session_state.get(THRESHOLD_KEY, 1.0))
    except ValueError:
        st.session_state[THRESHOLD_KEY] = 1.0
        return 1.0


def current_decision() -> Decision:
    threshold = _stored_threshold()
    review = None
    if st.session_state.get(REVIEW_ON_KEY):
        review = min(float(st.session_state.get(REVIEW_KEY, DEFAULT_REVIEW_FRACTION)), threshold)
    return Decision(threshold, review)


def _copy(src: str, dest: str) -> None:
    st.session_state[dest] = st.session_state[src]


def decision_controls(page: str, detector: Detector, with_review: bool = True) -> Decision:
    """NG threshold slider, optional review band; returns the decision rule. Never re-runs the model."""
    st.session_state.setdefault(THRESHOLD_KEY, 1.0)
    st.session_state.setdefault(REVIEW_KEY, default_review(detector))
    st.session_state.setdefault(REVIEW_ON_KEY, False)
    t_key, r_key, on_key = f"{page}_threshold_w", f"{page}_review_w", f"{page}_review_on_w"
    value = min(max(_stored_threshold(), THRESHOLD_MIN), _THRESHOLD_LIMIT)
    st.session_state[t_key] = value
    st.slider(
        "NG threshold (1.00 = the model's calibrated threshold)",
        min_value=THRESHOLD_MIN, max_value=max(THRESHOLD_MAX, float(math.ceil(value))), step=0.01, key=t_key,
        on_change=_copy, args=(t_key, THRESHOLD_KEY),
        help="A part is NG when its score is at or above this value. Lower = stricter (more parts rejected), "
             "higher = more lenient. Changing it re-judges all results instantly; nothing is recomputed.",
    )
    if with_review:
        st.session_state[on_key] = bool(st.session_state[REVIEW_ON_KEY])
        st.checkbox(
            "Send borderline parts to manual REVIEW", key=on_key, on_change=_copy, args=(on_key, REVIEW_ON_KEY),
            help="Adds a third verdict: parts scoring between the review value and the NG threshold are marked "
                 "REVIEW so a person can look at them.",
        )
        if st.session_state[REVIEW_ON_KEY]:
            threshold = float(st.session_state[THRESHOLD_KEY])
            st.session_state[r_key] = min(float(st.session_state[REVIEW_KEY]), threshold)
            st.slider(
                "REVIEW from score", min_value=0.0, max_value=max(threshold, 0.01), step=0.01, key=r_key,
                on_change=_copy, args=(r_key, REVIEW_KEY),
                help=f"Scores from here up to the NG threshold get the verdict REVIEW. Default: "
                     f"{default_review(detector):.2f} (from the model's calibration).",
            )
    return current_decision()
