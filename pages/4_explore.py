"""Explore correlations (paper Fig. 4): pin a patch, compare it with another, and see what their scores are made of."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from fod_app.data import IMAGE_EXTENSIONS, ImageLoadError, load_image, prepare_image
from fod_app.explain import ImageExplanation, unused_correlations_note
from fod_app.explain_png import comparison_png
from fod_app.patch_compare import (
    compare_patches,
    comparison_record,
    image_score_terms,
    most_anomalous_patch,
    patch_scores,
    term_label,
    typical_normal_patch,
)
from fod_app.paths import SAMPLE_DATA
from fod_app.selfcheck import WEAK_BRANCH_AUROC
from fod_app.selfcheck import branch_note as self_check_branch_note
from fod_app.sigma_check import patch_sigma_note
from fod_app.ui import charts
from fod_app.ui.cache import (
    cached_explanation,
    cached_sigma_notes,
    image_hash,
    memo_figure,
    model_key,
    prepared_file,
)
from fod_app.ui.common import ensure_router
from fod_app.ui.pickers import pick_model
from fod_app.visualize import image_to_uint8

ensure_router()

INSPECTION_KEY = "inspection"  # written by the Inspect page
IMAGE_KEY = "explore_image_key"  # (model, image hash) the patch choices below belong to
PATCH_KEY = "explore_patch"  # selected patch B (row, col), 0-based, on the grid of LEVEL_KEY
PINNED_KEY = "explore_pinned"  # pinned patch A
LEVEL_KEY, LAYER_KEY, HEAD_KEY = "explore_level", "explore_layer", "explore_head"
COMPARE_KEY, LOG_KEY = "explore_compare", "explore_log"
CHART_KEY = "explore_chart"
ROW_W, COL_W = "explore_row_w", "explore_col_w"
SOURCES = ("A sample image", "From the last inspection", "Upload an image")
SHORT_TERMS = {"reconstruction": "Reconstruction", "intra": "Intra (reversed)", "inter": "Inter",
               "nearest": "Nearest good patch"}
AVERAGE = -1  # head selector value for the mean over heads (None would give the selectbox a "clear" button)

st.title("Explore correlations")
st.caption(
    "What has the model learned? FOD compares every patch of an image with the other patches of the same image "
    "(intra-image correlation) and with the typical good part at each position (inter-image correlation). Pin one "
    "patch (A) and click another (B) to see both side by side, next to the targets the model was trained on "
    "(paper Fig. 4), and what each patch's score is made of."
)

with st.expander("What am I looking at? A short tour", icon=":material/school:"):
    st.markdown(
        "1. **The photo** (left) is cut into patches; the model scores every patch. **A** (red) is pinned: at first "
        "the most anomalous patch. **B** (blue) is the patch you click: at first a typical normal patch.\n"
        "2. **Intra correlation** — where the patch *looks inside the same image*. In the paper (Fig. 4) a normal "
        "patch spreads its weight over many similar patches; an anomalous patch has nothing similar and keeps its "
        "weight near itself, close to the **intra target** (a bell around the patch). Training pushes normal patches "
        "*away* from this target, so for intra a **small KL is suspicious** and a large one is normal: the score "
        "counts it reversed.\n"
        "3. **Inter correlation** — where the patch *looks in the typical good part* learned from the training "
        "photos. A normal patch concentrates on its own position, close to the **inter target**; an anomalous patch "
        "finds no match and spreads out, so for inter a **large KL is suspicious**.\n"
        "4. **Targets** are bells (RBF) whose width σ the model learned. All eight pictures share **one colour scale** "
        "(colour bar on the right); logarithmic by default, starting at the smallest weight the KL counts (10⁻⁸ "
        "on models of the Standard preset, 10⁻⁴ on older ones and the paper preset), so the tiny weight an intra "
        "correlation keeps near its own patch — the thing its KL measures — stays visible.\n"
        "5. **What the score is made of** — reconstruction (how badly the model rebuilds the patch's features) + "
        "intra (reversed) + inter, in the unit of every verdict (1.00 = threshold); on models that keep a bank of "
        "good patches also the **nearest good patch** term (how far the patch is from the most similar patch of the "
        "good training photos — anywhere in them, or only near the patch's own position where a leave-one-out "
        "self-check chose that: PatchCore's score, not part of FOD). The self-check chose which terms count. The "
        "numbers add up to the patch score; at the hottest pixel they add up to the image score.\n"
        "6. **Caveat** — the pictures show what *this* model learned. The model-quality notes say when a branch does "
        "not separate defects or a σ collapsed: then its pictures do not mean what the paper's Fig. 4 shows. Measured "
        "on magnetic tile and bottles: the intra target sat at its widest (2 patches) for almost every patch and the "
        "inter target was often a dot; on the tiles, which are not aligned, the inter branch learned positions more "
        "than looks and faded with long training (README, \"What the correlation branches learn\")."
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
        image_array = prepared_file(chosen, size)
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

# ---------------------------------------------------------------- explanation (model runs once per image and model)
with st.spinner("Computing all correlations of this image (once per image)…"):
    explanation: ImageExplanation = cached_explanation(detector, image_array)
image_key = (model_key(detector), image_hash(image_array))
if st.session_state.get(IMAGE_KEY) != image_key:  # a new image: suggest A (most anomalous) and B (typical normal)
    st.session_state[IMAGE_KEY] = image_key
    level = min(int(st.session_state.get(LEVEL_KEY, 0)), len(explanation.grids) - 1)
    st.session_state[LEVEL_KEY] = level
    st.session_state[PINNED_KEY] = most_anomalous_patch(explanation, level)
    st.session_state[PATCH_KEY] = typical_normal_patch(explanation, level, st.session_state[PINNED_KEY])
image_u8 = image_to_uint8(image_array)

image_terms, _ = image_score_terms(explanation)
st.markdown(f"**{image_name}** — image score **{explanation.image_score:.2f}** "
            f"({'NG' if explanation.image_score >= 1.0 else 'OK'} at the calibrated threshold 1.00)")
st.caption("At its hottest pixel the image score is made of: "
           + " + ".join(f"{term_label(k).lower()} {v:.2f}" for k, v in image_terms.items())
           + f" = {sum(image_terms.values()):.2f} (threshold units).")

unused_note = unused_correlations_note(detector)
if unused_note:
    st.info(unused_note, icon=":material/info:")

sigma_short, notes = cached_sigma_notes(detector, image_array, explanation)
notes = list(notes)
self_check = detector.metadata.get("self_check") or {}
weak = [k for k, v in (self_check.get("per_branch") or {}).items()
        if k != "combined" and v is not None and v < WEAK_BRANCH_AUROC]
branch_note = self_check_branch_note(self_check)
if branch_note:
    notes.insert(0, branch_note)
summary = []
if weak:
    summary.append(" and ".join(weak) + f" branch{'es do' if len(weak) > 1 else ' does'} not separate synthetic "
                   "defects on this model (self-check)")
if sigma_short:
    summary.append(sigma_short)
if summary:
    st.warning("**Model-quality note:** " + "; ".join(summary) + ". Those pictures may not look like the paper's "
               "Fig. 4 or point at defects.", icon=":material/warning:")
if notes:
    with st.expander("Model-quality notes in detail" + (" (self-check numbers per branch)" if branch_note else "")):
        st.markdown("\n".join(f"- {n}" for n in notes))


# ---------------------------------------------------------------- state callbacks
def _clamp(patch: tuple[int, int]) -> tuple[int, int]:
    height, width = explanation.grids[st.session_state[LEVEL_KEY]]
    return min(max(int(patch[0]), 0), height - 1), min(max(int(patch[1]), 0), width - 1)


def _set_patch(row: int, col: int) -> None:
    st.session_state[PATCH_KEY] = _clamp((row, col))


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
    """Keep the same places in the image when switching to a finer or coarser grid."""
    old_h, old_w = explanation.grids[previous["level"]]
    new_h, new_w = explanation.grids[st.session_state["explore_level_w"]]
    st.session_state[LEVEL_KEY] = st.session_state["explore_level_w"]
    for key in (PATCH_KEY, PINNED_KEY):
        row, col = st.session_state[key]
        st.session_state[key] = (min(int((row + 0.5) * new_h / old_h), new_h - 1),
                                 min(int((col + 0.5) * new_w / old_w), new_w - 1))


def _jump_to_max() -> None:
    st.session_state[PATCH_KEY] = most_anomalous_patch(explanation, st.session_state[LEVEL_KEY])


def _jump_to_typical() -> None:
    level = st.session_state[LEVEL_KEY]
    st.session_state[PATCH_KEY] = typical_normal_patch(explanation, level, st.session_state.get(PINNED_KEY))


def _pin_selected() -> None:
    st.session_state[PINNED_KEY] = st.session_state[PATCH_KEY]


def _swap() -> None:
    state = st.session_state
    state[PINNED_KEY], state[PATCH_KEY] = state[PATCH_KEY], state[PINNED_KEY]


def _terms_table(comparison) -> pd.DataFrame:
    """Rows: what each score is made of (adding up to the patch score), then the pictures' numbers."""
    agree = comparison.agreement()
    columns = {}
    for index, view in enumerate(comparison.views):
        patch = view.patch
        column = {f"{SHORT_TERMS.get(k, k)}": f"{v:+.3f}" for k, v in view.terms.items()}
        column["= Patch score"] = f"{view.score:.3f}"
        column["Intra KL"] = f"{patch.intra_kl:.3f}"
        column["Inter KL"] = f"{patch.inter_kl:.3f}"
        column["σ intra"] = f"{patch.sigma_intra[0]:.2g} × {patch.sigma_intra[1]:.2g}"
        column["σ inter"] = f"{patch.sigma_inter[0]:.2g} × {patch.sigma_inter[1]:.2g}"
        column["Rec. error (raw)"] = f"{patch.reconstruction_error:.3g}"
        if index == 1 and agree:
            above = [SHORT_TERMS.get(k, k) for k, ok in agree.items() if ok]
            column["Score A above B"] = ", ".join(above) or "none"
        columns[f"{view.label.split(' ')[0]} · row {patch.row + 1}, col {patch.col + 1}"] = column
    return pd.DataFrame(columns).fillna("")


# ---------------------------------------------------------------- the interactive part (reruns alone on a click)
@st.fragment
def explorer() -> None:
    n_levels = len(explanation.grids)
    level = min(int(st.session_state.get(LEVEL_KEY, 0)), n_levels - 1)
    st.session_state[LEVEL_KEY] = level
    c1, c2, c3, c4 = st.columns([3, 2, 2, 2], vertical_alignment="bottom")
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
                               format_func=lambda h: "Average of heads" if h == AVERAGE else f"Head {h + 1}",
                               help="Each layer has several attention heads that can learn different patterns.")
    st.session_state.setdefault(COMPARE_KEY, True)
    st.session_state.setdefault(LOG_KEY, True)
    with c4:
        compare_on = st.toggle("Side by side (A | B)", key=COMPARE_KEY,
                               help="Show the pinned patch A next to the selected patch B.")
        log_colours = st.toggle("Log colours", key=LOG_KEY,
                                help="Logarithmic colour scale: makes small weights visible. All pictures share it.")
    head = None if head_choice == AVERAGE else head_choice
    grid = explanation.grids[level]
    row, col = _clamp(st.session_state.get(PATCH_KEY, (0, 0)))
    pinned = _clamp(st.session_state.get(PINNED_KEY, most_anomalous_patch(explanation, level)))
    st.session_state[PATCH_KEY], st.session_state[PINNED_KEY] = (row, col), pinned
    scores = patch_scores(explanation, level)
    patches = [("A (pinned)", pinned), ("B (selected)", (row, col))] if compare_on else [("Selected", (row, col))]
    comparison = compare_patches(explanation, level, layer, head, patches, log_colours=log_colours)

    left, right = st.columns([5, 6], gap="medium")
    with left:
        background = st.segmented_control(
            "Background", ["Photo", "Photo + score heat map"], default="Photo", key="explore_background",
        ) or "Photo"
        opacity = 0.45 if background != "Photo" else 0.0
        figure = memo_figure(explanation, ("grid", level, row, col, pinned if compare_on else None, opacity),
                             lambda: charts.patch_grid_figure(
                                 image_u8, grid, selected=(row, col), patch_scores=scores,
                                 map_units=explanation.maps["score"], opacity=opacity, height=430,
                                 pinned=pinned if compare_on else None))
        st.plotly_chart(figure, key=CHART_KEY, on_select=_on_chart_select, selection_mode="points",
                        config={"displayModeBar": False, "scrollZoom": False})
        st.caption("Click a patch in the picture (it becomes B), or type its row and column:")
        st.session_state[ROW_W], st.session_state[COL_W] = row + 1, col + 1
        r1, r2 = st.columns(2)
        r1.number_input("Row", min_value=1, max_value=grid[0], step=1, key=ROW_W, on_change=_on_row_col)
        r2.number_input("Column", min_value=1, max_value=grid[1], step=1, key=COL_W, on_change=_on_row_col)
        b1, b2 = st.columns(2)
        b1.button("Most anomalous patch", on_click=_jump_to_max, width="stretch",
                  help="Select (B) the patch with the highest score at this level")
        b2.button("Typical normal patch", on_click=_jump_to_typical, width="stretch",
                  help="Select (B) a patch whose score is the median of this image, away from A")
        if compare_on:
            b3, b4 = st.columns(2)
            b3.button("Pin B as A", on_click=_pin_selected, width="stretch", icon=":material/push_pin:",
                      help="Make the selected patch the pinned one (A)")
            b4.button("Swap A ↔ B", on_click=_swap, width="stretch")
    with right:
        head_text = "average of all heads" if head is None else f"head {head + 1}"
        st.markdown(f"**Patch row {row + 1}, column {col + 1}** · level {level + 1}, layer {layer + 1}, {head_text}")
        st.plotly_chart(charts.term_bar_figure(comparison, height=150 + 45 * len(comparison.views)),
                        key="explore_terms", config={"displayModeBar": False})
        st.table(_terms_table(comparison))
        st.caption(f"Terms in threshold units (1.00 = threshold), they add up to the patch score; KL at layer "
                   f"{layer + 1}, {head_text}; σ in patches (row × column).")
        warnings = [w for v in comparison.views for w in (
            patch_sigma_note(v.patch.sigma_intra, f"{v.label.split(' ')[0]}: intra"),
            patch_sigma_note(v.patch.sigma_inter, f"{v.label.split(' ')[0]}: inter")) if w]
        if warnings:
            st.caption("⚠️ " + "; ".join(warnings) + ".")

    st.plotly_chart(charts.comparison_figure(comparison, height_per_row=240), key="explore_corr",
                    config={"displayModeBar": False})
    st.caption(
        "Each picture is a distribution over the patch grid that sums to 1; the dot is the patch itself. Intra: "
        "weight on each patch of this image. Inter: weight on each position of the typical good part. All eight "
        "pictures use the colour bar on the right. KL: symmetric KL divergence between a correlation and its target "
        "(intra: large = normal; inter: large = suspicious)."
    )

    title = f"{image_name} · model {model_name} v{version} · image score {explanation.image_score:.2f}"
    stem = f"explore-{model_name}-{(image_name or 'image').rsplit('.', 1)[0]}-L{level + 1}"
    d1, d2, d3 = st.columns(3)
    d1.download_button("Download view (PNG)", lambda: comparison_png(comparison, image_u8, title),
                       file_name=f"{stem}.png", mime="image/png", on_click="ignore", width="stretch",
                       icon=":material/image:", help="The photo with A and B, the eight pictures, the colour bar and "
                       "what each score is made of, for slides.")
    d2.download_button("Download numbers (JSON)",
                       lambda: json.dumps(comparison_record(comparison, explanation, image_name or "", model_name,
                                                            version, notes), indent=1),
                       file_name=f"{stem}.json", mime="application/json", on_click="ignore", width="stretch",
                       icon=":material/data_object:")
    d3.download_button("Download pictures (HTML)",
                       lambda: charts.comparison_figure(comparison).to_html(include_plotlyjs=True, full_html=True),
                       file_name=f"{stem}.html", mime="text/html", on_click="ignore", width="stretch",
                       icon=":material/description:", help="Interactive, self-contained (opens offline).")


explorer()

# ---------------------------------------------------------------- per-branch maps of the whole image
st.subheader("What each branch sees in this image")
st.caption("Reconstruction, intra and inter divergence (and the nearest-good-patch distance) use their own colour "
           "ranges (low → high for this image); the final score uses the fixed scale of the Inspect page (yellow = "
           "threshold). Remember: a LOW intra divergence is the suspicious one.")
branch_specs = [
    ("reconstruction", "Reconstruction", False),
    ("intra_divergence", "Intra divergence", False),
    ("inter_divergence", "Inter divergence", False),
    ("nearest_distance", "Nearest good patch", False),
    ("score", "Final score", True),
]
available = [spec for spec in branch_specs if explanation.maps.get(spec[0]) is not None]
for column, (key, title, fixed) in zip(st.columns(len(available)), available):
    with column:
        st.plotly_chart(charts.branch_map_figure(explanation.maps[key], title, fixed_scale=fixed, height=260),
                        key=f"explore_branch_{key}", config={"displayModeBar": False})
