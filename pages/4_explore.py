"""Explore correlations (paper Fig. 4): click a patch and compare its learned correlations with their targets."""

from __future__ import annotations

import hashlib

import numpy as np
import streamlit as st
from PIL import Image

from fod_app.data import IMAGE_EXTENSIONS, ImageLoadError, load_image, prepare_image
from fod_app.explain import ImageExplanation, explain_image, score_breakdown
from fod_app.paths import SAMPLE_DATA
from fod_app.selfcheck import branch_note as self_check_branch_note
from fod_app.ui import charts
from fod_app.ui.common import ensure_router
from fod_app.ui.pickers import pick_model
from fod_app.visualize import image_to_uint8

ensure_router()

INSPECTION_KEY = "inspection"  # written by the Inspect page
EXPLANATION_KEY = "explore_explanation"
PATCH_KEY = "explore_patch"  # (row, col), 0-based, on the grid of LEVEL_KEY
LEVEL_KEY, LAYER_KEY, HEAD_KEY = "explore_level", "explore_layer", "explore_head"
CHART_KEY = "explore_chart"
ROW_W, COL_W = "explore_row_w", "explore_col_w"
SOURCES = ("A sample image", "From the last inspection", "Upload an image")
AVERAGE = -1  # head selector value for the mean over heads (None would give the selectbox a "clear" button)

st.title("Explore correlations")
st.caption(
    "What has the model learned? FOD compares every patch of an image with the other patches of the same image "
    "(intra-image correlation) and with the typical good part at each position (inter-image correlation). Click a "
    "patch to see both, next to the target pattern the model was trained to follow (paper Fig. 4)."
)

picked = pick_model("explore")
if picked is None:
    st.stop()
model_name, detector = picked
version = str(detector.metadata.get("model_version", "?"))
size = detector.config.image_size
if detector.config.variant != "full":
    st.warning(f"Model {model_name!r} is an ablation variant ({detector.config.variant!r}) without both correlation "
               "branches; the correlation explorer needs a full FOD model. Choose another model.")
    st.stop()

# ---------------------------------------------------------------- choose an image
inspection = st.session_state.get(INSPECTION_KEY)
has_inspection = bool(inspection and inspection.get("results"))
source = st.radio("Image", SOURCES, horizontal=True, key="explore_source",
                  index=1 if has_inspection else 0)
image_name: str | None = None
image_array: np.ndarray | None = None
try:
    if source == SOURCES[0]:
        samples = sorted(p for p in (SAMPLE_DATA / "inspect").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        samples.sort(key=lambda p: (not p.name.startswith("defect"), p.name))
        if not samples:
            st.warning("No sample images are installed.")
            st.stop()
        chosen = st.selectbox("Sample image", samples, format_func=lambda p: p.name, key="explore_sample")
        image_name = chosen.name
        image_array = prepare_image(load_image(chosen), size)
    elif source == SOURCES[1]:
        if not has_inspection:
            st.info("Nothing inspected yet in this session. Inspect some images on the **Inspect** page first, "
                    "or pick a sample image.")
            st.stop()
        records = {r["file"]: r for r in inspection["results"]}
        chosen = st.selectbox("Inspected image (highest score first)", list(records), key="explore_inspected",
                              format_func=lambda n: f"{n} — score {records[n]['score']:.2f}")
        image_name = chosen
        image_array = prepare_image(Image.fromarray(records[chosen]["image"]), size)
    else:
        upload = st.file_uploader("Image to explore", type=[e.lstrip(".") for e in IMAGE_EXTENSIONS],
                                  key="explore_upload")
        if upload is None:
            st.stop()
        image_name = upload.name
        image_array = prepare_image(load_image(upload, upload.name), size)
except ImageLoadError as err:
    st.error(str(err))
    st.stop()


# ---------------------------------------------------------------- explanation (model runs once per image)
def _patch_scores(explanation: ImageExplanation, level: int) -> np.ndarray:
    """Mean final score (threshold units) inside each patch of a level's grid: (H, W)."""
    height, width = explanation.grids[level]
    score = explanation.maps["score"]
    return score.reshape(height, score.shape[0] // height, width, score.shape[1] // width).mean(axis=(1, 3))


def _most_anomalous(explanation: ImageExplanation, level: int) -> tuple[int, int]:
    scores = _patch_scores(explanation, level)
    row, col = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(row), int(col)


cache_key = (model_name, version, hashlib.sha1(image_array.tobytes()).hexdigest())
cached = st.session_state.get(EXPLANATION_KEY)
if cached is None or cached["key"] != cache_key:
    with st.spinner("Computing all correlations of this image (once per image)…"):
        explanation = explain_image(detector, image_array)
    st.session_state[EXPLANATION_KEY] = {"key": cache_key, "explanation": explanation}
    level = min(int(st.session_state.get(LEVEL_KEY, 0)), len(explanation.grids) - 1)
    st.session_state[LEVEL_KEY] = level
    st.session_state[PATCH_KEY] = _most_anomalous(explanation, level)
explanation: ImageExplanation = st.session_state[EXPLANATION_KEY]["explanation"]
image_u8 = image_to_uint8(image_array)

st.markdown(f"**{image_name}** — image score **{explanation.image_score:.2f}** "
            f"({'NG' if explanation.image_score >= 1.0 else 'OK'} at the calibrated threshold 1.00)")


# ---------------------------------------------------------------- state callbacks
def _set_patch(row: int, col: int) -> None:
    height, width = explanation.grids[st.session_state[LEVEL_KEY]]
    st.session_state[PATCH_KEY] = (min(max(int(row), 0), height - 1), min(max(int(col), 0), width - 1))


def _clicked_patch(point: dict) -> tuple[int, int] | None:
    """(row, col) from a selected point's customdata ([row, col, ...], or {"0": row, "1": col} from typed arrays)."""
    data = point.get("customdata")
    if isinstance(data, dict):
        data = [data.get("0"), data.get("1")]
    if isinstance(data, (list, tuple)) and len(data) >= 2 and data[0] is not None and data[1] is not None:
        return int(data[0]), int(data[1])
    return None


def _on_chart_select() -> None:
    state = st.session_state.get(CHART_KEY)
    for point in (state or {}).get("selection", {}).get("points", []):
        clicked = _clicked_patch(point)
        if clicked is not None:
            _set_patch(*clicked)
            return


def _on_row_col() -> None:
    _set_patch(st.session_state[ROW_W] - 1, st.session_state[COL_W] - 1)


def _on_level(previous: dict) -> None:
    """Keep the same place in the image when switching to a finer or coarser grid."""
    old_h, old_w = explanation.grids[previous["level"]]
    new_h, new_w = explanation.grids[st.session_state["explore_level_w"]]
    row, col = st.session_state[PATCH_KEY]
    st.session_state[LEVEL_KEY] = st.session_state["explore_level_w"]
    st.session_state[PATCH_KEY] = (min(int((row + 0.5) * new_h / old_h), new_h - 1),
                                   min(int((col + 0.5) * new_w / old_w), new_w - 1))


def _jump_to_max() -> None:
    st.session_state[PATCH_KEY] = _most_anomalous(explanation, st.session_state[LEVEL_KEY])


# ---------------------------------------------------------------- the interactive part (reruns alone on a click)
@st.fragment
def explorer() -> None:
    n_levels = len(explanation.grids)
    level = min(int(st.session_state.get(LEVEL_KEY, 0)), n_levels - 1)
    st.session_state[LEVEL_KEY] = level
    c1, c2, c3 = st.columns(3)
    st.session_state["explore_level_w"] = level
    c1.selectbox(
        "Level", list(range(n_levels)), key="explore_level_w", on_change=_on_level, args=({"level": level},),
        format_func=lambda i: f"Level {i + 1}: {explanation.grids[i][0]}×{explanation.grids[i][1]} patches"
        + (" (finest)" if i == 0 else " (coarser)" if i else ""),
        help="FOD works on several feature levels of the backbone: finer grids see small details, coarser "
             "grids see larger structures.",
    )
    layer = c2.selectbox("Transformer layer", list(range(explanation.n_layers)), key=LAYER_KEY,
                         format_func=lambda i: f"Layer {i + 1} of {explanation.n_layers}")
    head_choice = c3.selectbox("Attention head", [AVERAGE, *range(explanation.n_heads)], key=HEAD_KEY,
                               format_func=lambda h: "Average of all heads" if h == AVERAGE else f"Head {h + 1}",
                               help="Each layer has several attention heads that can learn different patterns.")
    head = None if head_choice == AVERAGE else head_choice
    grid = explanation.grids[level]
    row, col = st.session_state.get(PATCH_KEY, (0, 0))
    row, col = min(row, grid[0] - 1), min(col, grid[1] - 1)
    st.session_state[PATCH_KEY] = (row, col)
    patch = explanation.patch(level, layer, head, row, col)

    left, right = st.columns([1, 1], gap="medium")
    with left:
        background = st.segmented_control(
            "Background", ["Photo", "Photo + score heat map"], default="Photo", key="explore_background",
        ) or "Photo"
        figure = charts.patch_grid_figure(
            image_u8, grid, selected=(row, col), patch_scores=_patch_scores(explanation, level),
            map_units=explanation.maps["score"], opacity=0.45 if background != "Photo" else 0.0, height=520,
        )
        st.plotly_chart(figure, key=CHART_KEY, on_select=_on_chart_select, selection_mode="points",
                        config={"displayModeBar": False, "scrollZoom": False})
        st.caption("Click a patch in the picture, or type its row and column:")
        st.session_state[ROW_W], st.session_state[COL_W] = row + 1, col + 1
        r1, r2, r3 = st.columns([1, 1, 2], vertical_alignment="bottom")
        r1.number_input("Row", min_value=1, max_value=grid[0], step=1, key=ROW_W, on_change=_on_row_col)
        r2.number_input("Column", min_value=1, max_value=grid[1], step=1, key=COL_W, on_change=_on_row_col)
        r3.button("Most anomalous patch", on_click=_jump_to_max, width="stretch",
                  help="Jump to the patch with the highest score at this level")
    with right:
        head_text = "average of all heads" if head is None else f"head {head + 1}"
        st.markdown(f"**Patch row {row + 1}, column {col + 1}** · level {level + 1}, layer {layer + 1}, {head_text}")
        log_colours = st.toggle("Logarithmic colours (make small weights visible)", key="explore_log")
        st.plotly_chart(charts.correlation_figure(patch, height=470, log_colours=log_colours), key="explore_corr",
                        config={"displayModeBar": False})
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("Intra KL", f"{patch.intra_kl:.3f}",
                  help="Intra KL divergence: how far the intra-image correlation is from its local target (symmetric "
                       "KL). Training pushes normal patches *away* from this target, so a LARGE intra KL is normal "
                       "and a SMALL one is suspicious.")
        m2.metric("Inter KL", f"{patch.inter_kl:.3f}",
                  help="Inter KL divergence: how far the inter-image correlation is from its target (symmetric KL). "
                       "Training pulls normal patches *towards* this target, so a LARGE inter KL is suspicious.")
        m3.metric("Reconstruction", f"{patch.reconstruction_error:.3g}",
                  help="Reconstruction error: how badly the model reconstructs this patch's features.")
        m4.metric("Patch score", f"{_patch_scores(explanation, level)[row, col]:.2f}",
                  help="Final anomaly score around this patch, in threshold units (1.00 = threshold).")
        st.caption(score_breakdown(patch, detector))
        st.caption(
            f"Target widths (σ, in patches, row × column): intra {patch.sigma_intra[0]:.3g} × "
            f"{patch.sigma_intra[1]:.3g}, inter {patch.sigma_inter[0]:.3g} × {patch.sigma_inter[1]:.3g}. "
            "Each picture is a distribution over the patch grid that sums to 1; the red dot is the selected patch. "
            "Intra panels: weight on each patch of this image. Inter panels: weight on each position of the "
            "reference (normal) features."
        )


explorer()
branch_note = self_check_branch_note(detector.metadata.get("self_check"))
if branch_note:
    st.info(branch_note)

with st.expander("How to read these pictures (paper §4, Fig. 4)"):
    st.markdown(
        "- **Intra-image correlation**: for a *normal* patch the model spreads its attention over many patches of the "
        "image (it looks like the rest of the part). For an *anomalous* patch the attention stays concentrated on "
        "its close neighbours: nothing else in the image resembles it.\n"
        "- **Inter-image correlation**: for a *normal* patch the attention concentrates on one point, the matching "
        "position of the typical good part. An *anomalous* patch finds no matching normal pattern, so its "
        "attention is spread out.\n"
        "- **Targets (RBF)**: during training the correlations are pulled towards these bell-shaped targets around "
        "the patch (learned width σ). A large **KL divergence** means the correlation does not look like the "
        "target, which is what FOD measures to find defects.\n"
        "- Compare a patch on a defect with one on a clean area of the same image."
    )

# ---------------------------------------------------------------- per-branch maps of the whole image
st.subheader("What each branch sees in this image")
st.caption("Reconstruction, intra and inter divergence use their own colour ranges (low → high for this image); the "
           "final score uses the fixed scale of the Inspect page (yellow = threshold).")
branch_specs = [
    ("reconstruction", "Reconstruction error", False),
    ("intra_divergence", "Intra divergence", False),
    ("inter_divergence", "Inter divergence", False),
    ("score", "Final score", True),
]
available = [spec for spec in branch_specs if explanation.maps.get(spec[0]) is not None]
for column, (key, title, fixed) in zip(st.columns(len(available)), available):
    with column:
        st.plotly_chart(charts.branch_map_figure(explanation.maps[key], title, fixed_scale=fixed, height=260),
                        key=f"explore_branch_{key}", config={"displayModeBar": False})
