"""Streamlit pieces around the inspection history: opening it, reopening a run, the result viewer, review buttons.

Used by the Inspect and History pages. The database itself is ``fod_app.history`` (no SQL here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from ..history import HistoryError, HistoryStore, Run, history_path
from ..records import decode_map_png, read_rgb
from ..report import image_data_uri
from ..visualize import overlay
from . import charts

THUMB = 96
REVIEWER_KEY = "fod_reviewer_name"
REVIEW_LABELS = {"good": "good (false reject)", "defective": "defective (missed)"}


@st.cache_resource(show_spinner=False, max_entries=4)
def _open(path: str) -> HistoryStore:
    return HistoryStore(Path(path))  # a HistoryError is raised, not cached: the next run tries again


def get_history() -> tuple[HistoryStore | None, str | None]:
    """The history store, or (None, one-line reason) when it is unavailable; the app goes on either way."""
    try:
        return _open(str(history_path())), None
    except HistoryError as err:
        return None, str(err)


def result_from_stored(image: Any) -> dict[str, Any]:
    """A stored image as the Inspect page's result dict (photo (S, S, 3) uint8, map (S, S) float16)."""
    photo = read_rgb(image.thumbnail_path) if image.thumbnail_path and image.thumbnail_path.is_file() else None
    if photo is None:
        photo = np.full((64, 64, 3), 128, np.uint8)
    if image.map_path and image.map_path.is_file():
        amap = decode_map_png(image.map_path)
    else:
        amap = np.zeros(photo.shape[:2], np.float32)
    return {
        "file": image.file_name,
        "sha": image.content_sha256,
        "image_id": image.image_id,
        "score": float(image.score),
        "raw_score": image.raw_score,
        "stored_verdict": image.verdict,
        "unfamiliar": bool(image.extra.get("unfamiliar")),  # the wrong-part warning, after a reload too
        "image": photo,
        "map": amap.astype(np.float16),
        "thumb": image_data_uri(photo, max_side=THUMB),
        "thumb_overlay": image_data_uri(overlay(photo, amap, 0.5), max_side=THUMB),
        "review": None if image.review is None else image.review.label,
        "review_note": None if image.review is None else image.review.note,
        "reviewer": None if image.review is None else image.review.reviewer,
        "extra": image.extra,
    }


def inspection_from_run(run: Run) -> dict[str, Any]:
    """A recorded run as the Inspect page's ``inspection`` dict (highest score first)."""
    from datetime import datetime

    results = sorted((result_from_stored(i) for i in run.images), key=lambda r: r["score"], reverse=True)
    return {
        "signature": ("history", run.run_id), "model": run.model_name, "version": run.model_version,
        "results": results, "failures": [], "created": datetime.fromisoformat(run.created).astimezone(),
        "run_id": run.run_id,
    }


def result_viewer(
    results: list[dict[str, Any]], verdicts: list[str], threshold: float, key: str, caption_prefix: str = "Showing",
    opacity_key: str | None = None,
) -> dict[str, Any]:
    """Image selector + photo + heat map of the selected result; returns the result shown.

    The selection is kept by file name in ``st.session_state[key]`` and written back before the widget is drawn,
    so the selector, the caption and the pictures always show the same image (also after files are added).
    """
    labels = {r["file"]: f"{r['file']} — score {r['score']:.2f} — {v}" for r, v in zip(results, verdicts)}
    names = [r["file"] for r in results]
    current = st.session_state.get(key)
    st.session_state[key] = current if current in labels else names[0]  # always sent to the browser
    pick, opacity_col = st.columns([3, 2])
    chosen = pick.selectbox("Image", names, format_func=labels.get, key=key)
    opacity = opacity_col.slider("Heat-map opacity", 0.0, 1.0, 0.5, 0.05, key=opacity_key or f"{key}_opacity",
                                 help="0 = only the photo, 1 = only the heat map")
    index = names.index(chosen)
    record, shown_verdict = results[index], verdicts[index]
    st.markdown(f"{caption_prefix}: **{record['file']}** — score **{record['score']:.2f}** — **{shown_verdict}**",
                help="The file, score and verdict of the image drawn below.")
    amap = record["map"].astype(np.float32)
    left, right = st.columns(2)
    with left:
        st.plotly_chart(charts.overlay_figure(record["image"], amap, 0.0, threshold, title="Photo",
                                              show_colorbar=False),
                        key=f"{key}_photo", config={"displayModeBar": False})
    with right:
        st.plotly_chart(charts.overlay_figure(record["image"], amap, opacity, threshold,
                                              title=f"Heat map — {record['file']} — score {record['score']:.2f}"),
                        key=f"{key}_overlay", config={"displayModeBar": False})
    return record


def review_panel(store: HistoryStore | None, record: dict[str, Any], key: str) -> None:
    """"Mark as good (false reject)" / "mark as defective (missed)" with note and reviewer, stored in the history."""
    if store is None or record.get("image_id") is None:
        st.caption("Reviews are stored in the inspection history, which is unavailable for this result.")
        return
    with st.container(border=True):
        current = record.get("review")
        head = f"**Review {record['file']}**"
        if current:
            who = f" by {record['reviewer']}" if record.get("reviewer") else ""
            note = f" — “{record['review_note']}”" if record.get("review_note") else ""
            head += f" · reviewed as **{REVIEW_LABELS[current]}**{who}{note}"
        st.markdown(head)
        name_col, note_col = st.columns([1, 2])
        widget = f"{key}_reviewer_w"  # the name itself lives in REVIEWER_KEY, so it survives page changes
        st.session_state[widget] = st.session_state.get(REVIEWER_KEY, "")
        reviewer = name_col.text_input(
            "Reviewer", key=widget, placeholder="your name",
            on_change=lambda: st.session_state.update({REVIEWER_KEY: st.session_state[widget]}),
        )
        st.session_state[REVIEWER_KEY] = reviewer
        note = note_col.text_input("Note (optional)", key=f"{key}_note_{record['image_id']}")
        good_col, bad_col = st.columns(2)
        label = None
        if good_col.button("Mark as good (false reject)", key=f"{key}_good", icon=":material/thumb_up:",
                           width="stretch"):
            label = "good"
        if bad_col.button("Mark as defective (missed)", key=f"{key}_bad", icon=":material/thumb_down:",
                          width="stretch"):
            label = "defective"
        if label:
            try:
                store.add_review(int(record["image_id"]), label, note, reviewer)
            except HistoryError as err:
                st.error(str(err))
                return
            record.update(review=label, review_note=note.strip(), reviewer=reviewer.strip())
            st.success(f"{record['file']} reviewed as {REVIEW_LABELS[label]}.", icon=":material/rate_review:")


def compare_scatter(comparison: Any, height: int = 420) -> Any:
    """Score of version A (x) against version B (y), threshold lines at 1.0; changed verdicts in red."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for changed, colour, name in ((False, "#1f4e79", "same verdict"), (True, "#c62828", "verdict changes")):
        points = [i for i in comparison.images if i.changed == changed]
        fig.add_trace(go.Scatter(
            x=[i.score_a for i in points], y=[i.score_b for i in points], mode="markers", name=name,
            marker={"color": colour, "size": 9, "symbol": ["diamond" if i.label else "circle" for i in points]},
            text=[i.file_name + (f" (reviewed {i.label})" if i.label else "") for i in points],
            hovertemplate="%{text}<br>A %{x:.3f} · B %{y:.3f}<extra></extra>",
        ))
    top = max([1.5, *[max(i.score_a, i.score_b) for i in comparison.images]]) * 1.05
    fig.add_shape(type="line", x0=0, y0=0, x1=top, y1=top, line={"color": "#999", "dash": "dot"})
    fig.add_hline(y=1.0, line={"color": "#ef8f00", "dash": "dash"})
    fig.add_vline(x=1.0, line={"color": "#ef8f00", "dash": "dash"})
    fig.update_layout(
        height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10},
        xaxis_title=f"A: {comparison.name_a} {comparison.version_a}",
        yaxis_title=f"B: {comparison.name_b} {comparison.version_b}",
        xaxis_range=[0, top], yaxis_range=[0, top], legend={"orientation": "h", "y": 1.08},
    )
    return fig
