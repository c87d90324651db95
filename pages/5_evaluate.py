"""Evaluate: measure a model on a labelled MVTec-layout data set (server folder or zip upload)."""

from __future__ import annotations

import math
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from fod_app.archive import ArchiveError, extract_images_from_zip, find_mvtec_root
from fod_app.bundle import BundleError, update_metadata
from fod_app.calibration import verdict
from fod_app.data import DatasetError, MVTecDataset, load_mvtec_layout
from fod_app.evaluation import evaluate_detector
from fod_app.metrics import confusion_at, pr_points, roc_points
from fod_app.paths import PathNotAllowedError, data_roots, resolve_data_path
from fod_app.ui import charts
from fod_app.ui.common import ensure_router
from fod_app.ui.pickers import decision_controls, pick_model, set_threshold

ensure_router()

EVALUATION_KEY = "evaluation"
ZIP_KEY = "evaluate_zip"
SOURCES = ("Folder on the server", "Upload a zip")
LAYOUT_HELP = (
    "Expected layout (MVTec AD): `train/good/` (good training images), `test/good/` (good test images), "
    "`test/<defect type>/` (defective test images) and `ground_truth/<defect type>/<image name>_mask.png` "
    "(white = defect)."
)

st.title("Evaluate on labelled images")
st.caption(
    "How well does the model separate good from defective parts? Use a set of test images whose answer you know "
    "(good or defective, with defect masks). " + LAYOUT_HELP
)

picked = pick_model("evaluate")
if picked is None:
    st.stop()
model_name, detector = picked
version = str(detector.metadata.get("model_version", "?"))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------- choose the data
source = st.radio("Labelled data", SOURCES, horizontal=True, key="evaluate_source")
dataset: MVTecDataset | None = None
data_label = ""
try:
    if source == SOURCES[0]:
        typed = st.text_input(
            "Folder on the server", key="evaluate_path", placeholder="e.g. /data/mvtec/bottle",
            help="A category folder in the MVTec AD layout. Only folders inside the allowed data folders can be read.",
        )
        st.caption("Allowed folders: " + ", ".join(f"`{root}`" for root in data_roots())
                   + ". An administrator can add more with the FOD_DATA_ROOTS setting.")
        if typed.strip():
            folder = resolve_data_path(typed)
            root = find_mvtec_root(folder)
            if root is None:
                raise DatasetError(f"{typed}: no train/good folder found here or in its sub-folders. {LAYOUT_HELP}")
            dataset = load_mvtec_layout(root)
            data_label = str(root)
    else:
        upload = st.file_uploader("Zip of a labelled data set", type=["zip"], key="evaluate_upload",
                                  help="A zip of one category folder in the MVTec AD layout.")
        if upload is not None:
            previous = st.session_state.get(ZIP_KEY)
            if previous is None or previous["id"] != upload.file_id:
                if previous is not None:
                    shutil.rmtree(previous["dir"], ignore_errors=True)
                target = Path(tempfile.mkdtemp(prefix="fod-evaluate-"))
                st.session_state[ZIP_KEY] = {"id": upload.file_id, "dir": str(target), "skipped": []}
                with st.spinner("Unpacking the zip…"):
                    report = extract_images_from_zip(upload, target, keep_structure=True, name=upload.name)
                st.session_state[ZIP_KEY]["skipped"] = report.skipped
            root = find_mvtec_root(st.session_state[ZIP_KEY]["dir"])
            if root is None:
                raise DatasetError(f"{upload.name}: no train/good folder found in the zip. {LAYOUT_HELP}")
            dataset = load_mvtec_layout(root)
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

good = sum(1 for item in dataset.test_items if item.label == 0)
bad = len(dataset.test_items) - good
types = dataset.defect_types
st.markdown(f"**{len(dataset.test_items)} test images**: {good} good, {bad} defective"
            + (f" ({', '.join(types)})" if types else "") + f" · from `{data_label}`")
if not dataset.test_items:
    st.warning("This folder has no test/ images, so there is nothing to evaluate. " + LAYOUT_HELP)
    st.stop()
if not good or not bad:
    st.warning("For AUROC and the curves, the test set needs both good and defective images.")

eval_key = (model_name, version, data_label, len(dataset.test_items))
stored = st.session_state.get(EVALUATION_KEY)
if st.button("Evaluate", type="primary", key="evaluate_run",
             help="Scores every test image with the model (a few seconds per 10 images on a CPU)."):
    bar = st.progress(0.0, text="Scoring test images…")
    try:
        report = evaluate_detector(
            detector, dataset, progress=lambda done, total: bar.progress(done / total, f"Scoring {done}/{total}")
        )
    except ValueError as err:
        bar.empty()
        st.error(str(err))
        st.stop()
    bar.empty()
    stamp = datetime.now().astimezone().isoformat(timespec="seconds")
    metrics = {**report.to_dict(), "data": data_label, "evaluated": stamp}
    saved = True
    try:
        update_metadata(model_name, {"metrics": metrics})
    except (BundleError, OSError):
        saved = False
    stored = {"key": eval_key, "report": report, "saved": saved}
    st.session_state[EVALUATION_KEY] = stored

if stored is None or stored["key"] != eval_key:
    st.stop()

report = stored["report"]
result = report.result
if stored["saved"]:
    st.success(f"Evaluated {len(report.records)} images in {report.seconds:.1f} s "
               f"({report.ms_per_image:.0f} ms per image). The metrics were saved to the model's card.")
if report.failures:
    with st.expander(f"⚠️ {len(report.failures)} file(s) could not be read and were left out"):
        st.dataframe(pd.DataFrame(report.failures, columns=["File", "Reason"]), hide_index=True)

# ---------------------------------------------------------------- headline metrics
st.subheader("Metrics")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Image AUROC", _fmt(result.image_auroc),
          help="Chance that a random defective image scores higher than a random good one (1.0 = perfect, "
               "0.5 = guessing). Independent of the threshold.")
m2.metric("Pixel AUROC", _fmt(result.pixel_auroc),
          help="The same for single pixels against the defect masks: does the heat map light up on the defects?")
m3.metric("AUPRO (FPR ≤ 30%)", _fmt(result.aupro),
          help="How much of each defect region the heat map covers, averaged over regions (small defects count "
               "as much as large ones), up to 30% falsely flagged good pixels. 1.0 = perfect.")
m4.metric("F1-max", _fmt(result.f1_max),
          help="Best balance of precision and recall over all thresholds (1.0 = perfect).")

if not math.isfinite(result.pixel_auroc):
    st.caption("Pixel AUROC and AUPRO need defect masks with white (defect) pixels; the masks of this set are empty "
               "or missing.")

labels = np.array([r["label"] for r in report.records])
scores = np.array([float(r["score"]) for r in report.records])

# ---------------------------------------------------------------- threshold
st.subheader("At a threshold")
ctrl, offer = st.columns([3, 2], gap="large")
with ctrl:
    decision = decision_controls("evaluate", detector, with_review=False)
threshold = decision.threshold
with offer:
    if math.isfinite(result.f1_threshold):
        best = round(float(result.f1_threshold), 2)
        st.markdown(
            f"**F1-optimal threshold on this labelled set: {best:.2f}** (F1 = {_fmt(result.f1_max)}). "
            "It is tuned on these test images, so expect it to be optimistic on new parts. It is not applied "
            "unless you click:"
        )
        st.button(f"Use {best:.2f} as the NG threshold", key="evaluate_use_f1", on_click=set_threshold,
                  args=(best,), help="Changes the NG threshold on the Inspect and Evaluate pages for this session.")
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
               "against rejected good parts.")

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
for name in ["good", *types]:
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

with st.expander("All test images"):
    table = pd.DataFrame(report.records).sort_values("score", ascending=False)
    table["verdict"] = [verdict(float(s), threshold) for s in table["score"]]
    table["truth"] = np.where(table["label"] == 1, "defective", "good")
    st.dataframe(table[["file", "defect_type", "truth", "score", "verdict"]], hide_index=True, width="stretch",
                 column_config={"score": st.column_config.NumberColumn(format="%.3f")})
