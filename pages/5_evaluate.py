"""Evaluate: measure a model on labelled images (plain good/ + defect/ folders or MVTec layout; folder or zip)."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from fod_app.archive import ArchiveError, UnpackFolder, extract_images_from_zip
from fod_app.calibration import check_threshold
from fod_app.data import DatasetError, ImageLoadError
from fod_app.evaluation import FALSE_REJECT, MISS, evaluate_detector
from fod_app.evaluation_data import LAYOUT_HELP, LabelledSet, load_labelled_set
from fod_app.evaluation_records import save_evaluation
from fod_app.evaluation_report import BRANCH_LABELS, evaluation_csv, evaluation_html, evaluation_json
from fod_app.history import HistoryError
from fod_app.metrics import confusion_at, pr_points, roc_points
from fod_app.paths import PathNotAllowedError, data_roots, resolve_data_path
from fod_app.ui import charts
from fod_app.ui.common import ensure_router
from fod_app.ui.pickers import THRESHOLD_MAX, THRESHOLD_MIN, pick_model

ensure_router()

EVALUATION_KEY = "evaluation"
ZIP_KEY = "evaluate_zip"
# The Evaluate page's own NG threshold (threshold units): independent of Inspect's, back to 1.0 for another model.
THRESHOLD_KEY = "evaluate_ng_threshold"
THRESHOLD_MODEL_KEY = "evaluate_ng_threshold_model"
THRESHOLD_WIDGET = "evaluate_threshold_w"
SOURCES = ("Folder on the server", "Upload a zip")

st.title("Evaluate on labelled images")
st.caption(
    "How well does the model separate good from defective parts? Use images whose answer you know. "
    + LAYOUT_HELP + " With masks you also get pixel-level metrics; without, image-level metrics only."
)

picked = pick_model("evaluate")
if picked is None:
    st.stop()
model_name, detector = picked
version = str(detector.metadata.get("model_version", "?"))
if st.session_state.get(THRESHOLD_MODEL_KEY) != model_name:
    st.session_state[THRESHOLD_MODEL_KEY] = model_name
    st.session_state[THRESHOLD_KEY] = 1.0


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _set_threshold(value: float) -> None:
    """Evaluate's threshold only (the Inspect page keeps its own)."""
    try:
        st.session_state[THRESHOLD_KEY] = round(check_threshold(value), 2)
    except ValueError:
        return


def _copy_threshold() -> None:
    _set_threshold(st.session_state[THRESHOLD_WIDGET])


# ---------------------------------------------------------------- choose the data
source = st.radio("Labelled data", SOURCES, horizontal=True, key="evaluate_source")
dataset: LabelledSet | None = None
data_label = ""
try:
    if source == SOURCES[0]:
        typed = st.text_input(
            "Folder on the server", key="evaluate_path", placeholder="e.g. /data/labelled/bottle",
            help="A folder with good/ and defect/ (or ok/ and ng/, or one folder per defect type), or an MVTec AD "
                 "category. Only folders inside the allowed data folders can be read.",
        )
        st.caption("Allowed folders: " + ", ".join(f"`{root}`" for root in data_roots())
                   + ". An administrator can add more with the FOD_DATA_ROOTS setting.")
        if typed.strip():
            dataset = load_labelled_set(resolve_data_path(typed))
            data_label = str(dataset.root)
    else:
        upload = st.file_uploader("Zip of a labelled data set", type=["zip"], key="evaluate_upload",
                                  help="A zip of good/ and defect/ folders (masks optional), or of an MVTec AD "
                                       "category.")
        if upload is not None:
            previous = st.session_state.get(ZIP_KEY)
            if previous is None or previous["id"] != upload.file_id:
                if previous is not None:
                    previous["folder"].remove()
                folder = UnpackFolder(prefix="fod-evaluate-")  # removed with the session's state
                st.session_state[ZIP_KEY] = {"id": upload.file_id, "folder": folder, "skipped": []}
                with st.spinner("Unpacking the zip…"):
                    unpacked = extract_images_from_zip(upload, folder.path, keep_structure=True, name=upload.name)
                st.session_state[ZIP_KEY]["skipped"] = unpacked.skipped
            try:
                dataset = load_labelled_set(st.session_state[ZIP_KEY]["folder"].path)
            except DatasetError as err:
                raise DatasetError(f"{upload.name}: {err}") from None
            data_label = f"{upload.name} (uploaded zip)"
            skipped = st.session_state[ZIP_KEY]["skipped"]
            if skipped:
                with st.expander(f"{len(skipped)} entries of the zip were skipped"):
                    st.dataframe(pd.DataFrame(skipped, columns=["Entry", "Reason"]), hide_index=True)
except (PathNotAllowedError, DatasetError, ArchiveError) as err:
    st.error(str(err))
    st.stop()

if dataset is None:
    st.stop()

types = dataset.defect_types
layout = "plain labelled folders" if dataset.layout == "folders" else "MVTec AD layout"
st.markdown(f"**{len(dataset.test_items)} test images**: {dataset.n_good} good, {dataset.n_defect} defective"
            + (f" ({', '.join(types)})" if types else "") + f" · {layout} · from `{data_label}`")
if dataset.image_level_only and dataset.n_defect:
    st.info("**Image-level metrics only**: this set has no defect masks, so the pixel metrics (how well the heat "
            "map outlines the defects) cannot be computed. Image AUROC, F1 and the error counts are complete.",
            icon=":material/info:")
elif dataset.n_defect_with_mask < dataset.n_defect:
    st.caption(f"Masks found for {dataset.n_defect_with_mask} of {dataset.n_defect} defective images: the pixel "
               "metrics use those (and all good images); the others count at image level.")
if not dataset.n_good or not dataset.n_defect:
    st.warning("For AUROC and the curves, the test set needs both good and defective images.")

eval_key = (model_name, version, data_label, len(dataset.test_items))
stored = st.session_state.get(EVALUATION_KEY)
if st.button("Evaluate", type="primary", key="evaluate_run",
             help="Scores every test image with the model (a few seconds per 10 images on a CPU)."):
    bar = st.progress(0.0, text="Scoring test images…")
    try:
        report = evaluate_detector(
            detector, dataset, dataset_path=data_label,
            progress=lambda done, total: bar.progress(done / total, f"Scoring {done}/{total}"),
        )
    except (ValueError, OSError) as err:
        bar.empty()
        st.error(str(err))
        st.stop()
    bar.empty()
    try:
        record_id, record_error = save_evaluation(report, model_name, version, 1.0), None
    except (HistoryError, OSError) as err:
        record_id, record_error = None, str(err)
    stored = {"key": eval_key, "report": report, "record": record_id, "record_error": record_error}
    st.session_state[EVALUATION_KEY] = stored

if stored is None or stored["key"] != eval_key:
    st.stop()

report = stored["report"]
result = report.result
done = f"Evaluated {len(report.records)} images in {report.seconds:.1f} s ({report.speed_text()})."
if stored.get("record"):
    st.success(done + " Saved as an evaluation record of this model (see the Models page); earlier evaluations "
               "are kept.")
else:
    st.warning(done + f" It could not be saved as a record: {stored.get('record_error')}")
if report.failures:
    with st.expander(f"⚠️ {len(report.failures)} file(s) could not be read and were left out"):
        st.dataframe(pd.DataFrame(report.failures, columns=["File", "Reason"]), hide_index=True)

# ---------------------------------------------------------------- headline metrics
st.subheader("Metrics" + (" (image level only: no masks)" if report.image_level_only else ""))
m1, m2, m3, m4 = st.columns(4)
m1.metric("Image AUROC", _fmt(result.image_auroc),
          help="Chance that a random defective image scores higher than a random good one (1.0 = perfect, "
               "0.5 = guessing). Independent of the threshold.")
m2.metric("F1-max", _fmt(result.f1_max),
          help="Best balance of precision and recall over all thresholds (1.0 = perfect).")
no_masks = "— (no masks)"
m3.metric("Pixel AUROC", no_masks if report.image_level_only else _fmt(result.pixel_auroc),
          help="The same as image AUROC for single pixels against the defect masks: does the heat map light up on "
               "the defects? Needs masks.")
m4.metric("AUPRO (FPR ≤ 30%)", no_masks if report.image_level_only else _fmt(result.aupro),
          help="How much of each defect region the heat map covers, averaged over regions (small defects count "
               "as much as large ones), up to 30% falsely flagged good pixels. 1.0 = perfect. Needs masks.")
if not report.image_level_only and report.n_defect_with_mask < result.n_defective:
    st.caption(f"Pixel metrics from the {report.n_defect_with_mask} of {result.n_defective} defective images that "
               "have a mask.")

labels, scores = report.labels, report.scores

# ---------------------------------------------------------------- threshold (this page's own)
st.subheader("At a threshold")
ctrl, offer = st.columns([3, 2], gap="large")
with ctrl:
    threshold = float(st.session_state[THRESHOLD_KEY])
    st.session_state[THRESHOLD_WIDGET] = threshold
    st.slider(
        "NG threshold on this page (1.00 = the model's calibrated threshold)",
        min_value=THRESHOLD_MIN, max_value=max(THRESHOLD_MAX, float(math.ceil(max(threshold, scores.max() + 0.01)))),
        step=0.01,
        key=THRESHOLD_WIDGET, on_change=_copy_threshold,
        help="A part is NG when its score is at or above this value. It applies to this page only: the Inspect "
             "page keeps its own threshold, and the model's calibrated threshold is not changed.",
    )
    st.caption("Starts at the model's calibrated threshold (1.00); moving it here does not change Inspect.")
with offer:
    if math.isfinite(result.f1_threshold):
        best = round(float(result.f1_threshold), 2)
        st.markdown(
            f"**F1-optimal threshold on this labelled set: {best:.2f}** (F1 = {_fmt(result.f1_max)}). "
            "It is tuned on these test images, so expect it to be optimistic on new parts. It is not applied "
            "unless you click:"
        )
        st.button(f"Use {best:.2f} on this page", key="evaluate_use_f1", on_click=_set_threshold, args=(best,),
                  help="Sets the threshold of this page only.")
    else:
        st.caption("An F1-optimal threshold needs defective images in the test set.")

counts = confusion_at(labels, scores, threshold)
c_left, c_right = st.columns(2)
with c_left:
    st.plotly_chart(charts.confusion_figure(counts, threshold), key="evaluate_confusion",
                    config={"displayModeBar": False})
with c_right:
    n_good, n_bad = counts["tn"] + counts["fp"], counts["tp"] + counts["fn"]
    if n_good:
        st.metric("Good parts rejected", f"{counts['fp']} of {n_good} ({100 * counts['fp'] / n_good:.0f}%)",
                  help="Good test images with a score at or above the threshold (false rejects).")
    if n_bad:
        st.metric("Defects missed", f"{counts['fn']} of {n_bad} ({100 * counts['fn'] / n_bad:.0f}%)",
                  help="Defective test images with a score below the threshold (escapes).")
    st.caption("Rejected = score at or above the threshold. Move the threshold to trade missed defects "
               "against rejected good parts. The misses and false rejects are shown one by one below.")

# ---------------------------------------------------------------- click-through to the errors
st.subheader("Misses and false rejects")
errors = report.errors(threshold)
groups = {f"Misses ({len(errors[MISS])})": MISS, f"False rejects ({len(errors[FALSE_REJECT])})": FALSE_REJECT}
group_label = st.radio("Show", list(groups), horizontal=True, key="evaluate_error_group",
                       help="Misses: defective parts that scored below the threshold (passed). False rejects: good "
                            "parts at or above it (rejected).")
indices = errors[groups[group_label]]
if not indices:
    st.caption("None at this threshold.")
else:
    def _describe(index: int) -> str:
        record = report.records[index]
        return f"{record['file']} — score {float(record['score']):.3f}"

    picked_index = st.selectbox("Image", indices, format_func=_describe, key="evaluate_error_pick",
                                help="Misses lowest score first, false rejects highest first.")
    record = report.records[picked_index]
    views = stored.setdefault("views", {})  # photo + heat map per image, built once per evaluation
    try:
        if picked_index not in views:
            views[picked_index] = report.view(picked_index)
        photo, heat = views[picked_index]
    except (ImageLoadError, OSError, ValueError) as err:
        st.error(f"{record['file']}: cannot be shown any more ({err}).")
    else:
        p_col, h_col, s_col = st.columns([2, 2, 1])
        p_col.image(photo, caption=f"Photo: {record['file']}", width="stretch")
        h_col.image(heat, caption="Heat map (red = most different from good parts)", width="stretch")
        s_col.metric("Score", f"{float(record['score']):.3f}", help="In threshold units: NG at or above the threshold.")
        s_col.markdown(f"**Truth**: {'defective' if record['label'] else 'good'}  \n"
                       f"**Verdict at {threshold:.2f}**: {'NG' if float(record['score']) >= threshold else 'OK'}  \n"
                       f"**Folder**: {record['defect_type']}")

# ---------------------------------------------------------------- curves
st.subheader("Curves")
k1, k2 = st.columns(2)
with k1:
    st.plotly_chart(charts.roc_figure(roc_points(labels, scores), result.image_auroc), key="evaluate_roc",
                    config={"displayModeBar": False})
with k2:
    st.plotly_chart(charts.pr_figure(pr_points(labels, scores), result.f1_max), key="evaluate_pr",
                    config={"displayModeBar": False})
st.plotly_chart(
    charts.score_histogram(
        [("good", scores[labels == 0].tolist(), charts.GOOD_COLOUR),
         ("defective", scores[labels == 1].tolist(), charts.DEFECT_COLOUR)],
        threshold, title="Scores of good vs defective test images",
    ),
    key="evaluate_hist", config={"displayModeBar": False},
)

# ---------------------------------------------------------------- per defect type
st.subheader("Per defect type")
rows = []
for name in ["good", *sorted({r["defect_type"] for r in report.records if r["label"]})]:
    selected = [r for r in report.records if r["defect_type"] == name]
    if not selected:
        continue
    flagged = sum(1 for r in selected if float(r["score"]) >= threshold)
    rows.append({
        "Type": name,
        "Images": len(selected),
        "Image AUROC vs good": "—" if name == "good" else _fmt(result.per_type_image_auroc.get(name)),
        f"NG at {threshold:.2f}": f"{flagged} of {len(selected)}",
        "Share NG": flagged / len(selected),
    })
st.dataframe(
    pd.DataFrame(rows), hide_index=True, width="stretch", key="evaluate_types",
    column_config={
        "Image AUROC vs good": st.column_config.TextColumn(
            help="How well this defect type is separated from the good test images (1.0 = perfectly)."),
        "Share NG": st.column_config.ProgressColumn(
            "Share NG", format="percent", min_value=0.0, max_value=1.0,
            help="For good images this is the false-reject rate; for defect types the detection rate."),
    },
)

# ---------------------------------------------------------------- per branch (for educators)
if report.branch_auroc:
    st.subheader("What each branch contributes")
    st.dataframe(
        pd.DataFrame([{"Branch": BRANCH_LABELS.get(k, k), "Image AUROC": _fmt(v)}
                      for k, v in report.branch_auroc.items()]),
        hide_index=True, width="stretch", key="evaluate_branches",
    )
    st.caption(
        "Image AUROC of each part of FOD on its own, on this labelled set: the reconstruction error of the patch "
        "features, the intra-image correlation (how a patch relates to the rest of its image) and the inter-image "
        "correlation (how it relates to the learned good reference), each scored as the maximum of its own heat "
        "map, and the combined score the verdicts use. A branch near 0.5 does not separate these defects."
    )

# ---------------------------------------------------------------- downloads
st.subheader("Download")
stem = f"evaluation_{model_name}_{report.dataset_name}".replace(" ", "_")
d1, d2, d3 = st.columns(3)
d1.download_button("Per-image results (CSV)", data=evaluation_csv(report, threshold, model_name, version),
                   file_name=f"{stem}.csv", mime="text/csv", key="evaluate_download_csv", on_click="ignore",
                   icon=":material/table:")
d2.download_button("Metrics (JSON)", data=evaluation_json(report, threshold, model_name, version),
                   file_name=f"{stem}.json", mime="application/json", key="evaluate_download_json",
                   on_click="ignore", icon=":material/data_object:")
d3.download_button("Report (HTML)", data=lambda: evaluation_html(report, threshold, model_name, version),
                   file_name=f"{stem}.html", mime="text/html", key="evaluate_download_html", on_click="ignore",
                   icon=":material/description:",
                   help="One self-contained file with the metrics and the misses and false rejects (photo and heat "
                        "map); opens offline in any browser.")
st.caption(f"All downloads use the threshold on this page ({threshold:.2f}).")

with st.expander("All test images"):
    table = pd.DataFrame(report.rows(threshold)).sort_values("score", ascending=False)
    st.dataframe(table[["file", "defect_type", "truth", "score", "verdict", "outcome"]], hide_index=True,
                 width="stretch", column_config={"score": st.column_config.NumberColumn(format="%.3f")})
