"""Process-wide caches for the interactive pages, keyed on model version + image content (never on widgets).

A widget change must not recompute a model run: explanations are kept per (model, version, image hash), prepared
sample images per (path, mtime, size). ``st.cache_resource`` returns the same object (no copy): callers treat
the results as read-only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import streamlit as st

from ..data import load_image, prepare_image
from ..explain import ImageExplanation, explain_image
from ..inference import Detector
from ..sigma_check import sigma_notes, sigma_summary


def image_hash(image: np.ndarray) -> str:
    """Content hash of a prepared (3, S, S) image."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()


def model_key(detector: Detector) -> str:
    """Model version + creation time: changes whenever the bundle is retrained or replaced."""
    meta = detector.metadata
    return f"{meta.get('name')}|{meta.get('model_version')}|{meta.get('created')}"


@st.cache_resource(max_entries=8, show_spinner=False)
def _explanation(model: str, image_key: str, _detector: Detector, _image: np.ndarray) -> ImageExplanation:
    return explain_image(_detector, _image)


def cached_explanation(detector: Detector, image: np.ndarray) -> ImageExplanation:
    """``explain_image`` once per (model version, image content); later calls answer from memory."""
    return _explanation(model_key(detector), image_hash(image), detector, image)


@st.cache_resource(max_entries=8, show_spinner=False)
def _notes(model: str, image_key: str, _explanation_obj: ImageExplanation) -> tuple[str | None, list[str]]:
    return sigma_summary(_explanation_obj), sigma_notes(_explanation_obj)


def cached_sigma_notes(detector: Detector, image: np.ndarray, explanation: ImageExplanation
                       ) -> tuple[str | None, list[str]]:
    """(one-line summary or None, detailed notes) on degenerate σ of this image (``fod_app.sigma_check``)."""
    return _notes(model_key(detector), image_hash(image), explanation)


@st.cache_data(max_entries=64, show_spinner=False)
def _prepared(path: str, mtime: float, size: int) -> np.ndarray:
    return prepare_image(load_image(Path(path)), size)


def prepared_file(path: Path, size: int) -> np.ndarray:
    """A server-side image file loaded and resized once (re-read when the file changes)."""
    return _prepared(str(path), path.stat().st_mtime, size)


MEMO_FIGURES = 48


def memo_figure(explanation: ImageExplanation, key: tuple, build):
    """A figure built once per (explanation, key) and kept on the explanation (a widget that does not change it
    then costs no rebuild); at most ``MEMO_FIGURES`` figures per explanation."""
    memo_key = ("figure", *key)
    if memo_key not in explanation.memo:
        figures = [k for k in explanation.memo if k[0] == "figure"]
        for old in figures[: max(0, len(figures) - MEMO_FIGURES + 1)]:
            del explanation.memo[old]
        explanation.memo[memo_key] = build()
    return explanation.memo[memo_key]


INSPECTIONS_KEY = "fod_recent_inspections"
RECENT_INSPECTIONS = 4


def recall_inspection(signature: tuple) -> dict | None:
    """A recent inspection of this session with the same signature (same files, model and version), or None:
    switching back to a model or a batch already inspected answers from memory."""
    return next((i for i in st.session_state.get(INSPECTIONS_KEY, []) if i["signature"] == signature), None)


def remember_inspection(inspection: dict) -> None:
    """Keep an inspection (a dict with a ``signature``) among this session's ``RECENT_INSPECTIONS`` latest."""
    recent = [i for i in st.session_state.get(INSPECTIONS_KEY, []) if i["signature"] != inspection["signature"]]
    st.session_state[INSPECTIONS_KEY] = [inspection, *recent][:RECENT_INSPECTIONS]
