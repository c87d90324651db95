"""History: past inspection runs (filter, open, export again), the review loop and version comparison."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta

import numpy as np
import pandas as pd
import streamlit as st

from fod_app.bundle import BundleError, read_metadata
from fod_app.compare import compare_run
from fod_app.history import HistoryError
from fod_app.jobs import BusyError, JobError, TrainingSpec, get_job_manager
from fod_app.report import html_report, results_csv
from fod_app.review import apply_recalibration, propose_recalibration, retrain_sources
from fod_app.ui.common import ensure_router, get_detector, model_names, session_id
from fod_app.ui.history_view import (
    REVIEW_LABELS,
    REVIEWER_KEY,
    compare_scatter,
    get_history,
    inspection_from_run,
    result_viewer,
    review_panel,
)
from fod_app.visualize import overlay

ensure_router()

RUN_KEY = "history_run"
COMPARE_KEY = "history_comparison"
ALL = "All"

st.title("Inspection history")
st.caption("Every inspection from this app and from `python -m fod_app detect` is kept here: open a past run, "
           "export it again, review verdicts, recalibrate or retrain from reviewed false rejects, and compare "
           "model versions on the same images.")

history, problem = get_history()
if history is None:
    st.error(f"Inspection history is unavailable: {problem}", icon=":material/database:")
    st.stop()
st.caption(f"Stored in `{history.path}` (images in `{history.files_dir}`).")

# ---------------------------------------------------------------- filters and runs
f_model, f_dates, f_verdict = st.columns([2, 2, 1])
model_filter = f_model.selectbox("Model", [ALL, *history.model_names()], key="history_model")
today = date.today()
dates = f_dates.date_input("Date range", (today - timedelta(days=30), today), key="history_dates")
verdict_filter = f_verdict.selectbox("Has verdict", [ALL, "NG", "REVIEW", "OK"], key="history_verdict")
since = until = None
if isinstance(dates, tuple | list) and dates:
    since = datetime.combine(dates[0], time.min).astimezone()
    until = datetime.combine(dates[-1] + timedelta(days=1), time.min).astimezone()
try:
    runs = history.runs(model_name=None if model_filter == ALL else model_filter, since=since, until=until,
                        verdict=None if verdict_filter == ALL else verdict_filter)
except HistoryError as err:
    st.error(str(err))
    st.stop()
if not runs:
    st.info("No inspection runs match. Inspect images on the **Inspect** page (or with `python -m fod_app "
            "detect`) and they appear here.")
    st.stop()


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")


st.dataframe(
    pd.DataFrame({
        "Time": [_when(r.created) for r in runs], "Source": [r.source for r in runs],
        "Model": [r.model_name for r in runs], "Version": [r.model_version for r in runs],
        "Images": [r.n_images for r in runs], "NG": [r.n_ng for r in runs], "REVIEW": [r.n_review for r in runs],
        "OK": [r.n_ok for r in runs], "Run": [r.run_id for r in runs],
    }),
    hide_index=True, width="stretch", height=min(len(runs), 8) * 35 + 40, key="history_runs_table",
)
labels = {r.run_id: f"{_when(r.created)} · {r.model_name} {r.model_version} · {r.n_images} image(s), {r.n_ng} NG"
          for r in runs}
current = st.session_state.get(RUN_KEY)
st.session_state[RUN_KEY] = current if current in labels else runs[0].run_id
run_id = st.selectbox("Open run", list(labels), format_func=labels.get, key=RUN_KEY)
try:
    run = history.run(run_id)
except HistoryError as err:
    st.error(str(err))
    st.stop()
inspection = inspection_from_run(run)
results = inspection["results"]
if not results:
    st.info("This run has no images.")
    st.stop()
verdicts = [r["stored_verdict"] for r in results]

# ---------------------------------------------------------------- the run
st.subheader(f"Run {run.run_id}")
st.caption(f"{_when(run.created)} · from {run.source}{' by ' + run.user if run.user else ''} · model "
           f"**{run.model_name}** version `{run.model_version}` · decision threshold {run.threshold_units:.2f} "
           f"(threshold units; the model's raw threshold {run.threshold:.4g})")
table = pd.DataFrame({
    "Image": [r["thumb"] for r in results], "Heat map": [r["thumb_overlay"] for r in results],
    "File": [r["file"] for r in results], "Score": [round(r["score"], 3) for r in results], "Verdict": verdicts,
    "Review": [REVIEW_LABELS.get(r["review"], "") for r in results],
})
st.dataframe(table, hide_index=True, width="stretch", row_height=56, key="history_table",
             height=56 * min(len(table), 10) + 40,
             column_config={"Image": st.column_config.ImageColumn("Image", width="small"),
                            "Heat map": st.column_config.ImageColumn("Heat map", width="small"),
                            "Score": st.column_config.NumberColumn("Score", format="%.3f")})
record = result_viewer(results, verdicts, run.threshold_units, key=f"history_view_{run.run_id}")
review_panel(history, record, key=f"history_review_{run.run_id}")

rows = [{"file": r["file"], "score": r["score"], "verdict": v} for r, v in zip(results, verdicts)]
stamp = datetime.fromisoformat(run.created).astimezone().strftime("%Y%m%d-%H%M")


def _html() -> str:
    report_rows = [{**row, "image": r["image"], "overlay": overlay(r["image"], r["map"].astype(np.float32), 0.5)}
                   for row, r in zip(rows, results)]
    return html_report(report_rows, threshold=run.threshold_units, model_name=run.model_name,
                       model_version=run.model_version, review_threshold=run.review_threshold,
                       created=datetime.fromisoformat(run.created).astimezone())


d1, d2 = st.columns(2)
d1.download_button("Download this run (CSV)", results_csv(rows, run.threshold_units, run.model_name,
                                                           run.model_version, run.review_threshold),
                   file_name=f"inspection-{run.model_name}-{stamp}.csv", mime="text/csv", on_click="ignore",
                   icon=":material/table:", width="stretch", key="history_csv")
d2.download_button("Download this run (HTML report)", _html, file_name=f"inspection-{run.model_name}-{stamp}.html",
                   mime="text/html", on_click="ignore", icon=":material/description:", width="stretch",
                   key="history_html")

# ---------------------------------------------------------------- review loop
st.subheader("Improve the model from reviews")
try:
    proposal = propose_recalibration(history, run.model_name)
except BundleError as err:
    proposal = None
    st.caption(f"Model {run.model_name!r} cannot be recalibrated here: {err}")
reviewer = str(st.session_state.get(REVIEWER_KEY, "")).strip()
if proposal is None:
    st.caption(f"No reviewed false rejects for the current version of {run.model_name!r} yet: mark NG images that "
               "are good parts as **good (false reject)** above.")
else:
    st.markdown(
        f"**Recalibrate {proposal.model_name}**: {len(proposal.reviewed)} reviewed false reject(s) join the "
        f"{proposal.n_calibration} good calibration scores. Threshold **{proposal.old_threshold:.4g} → "
        f"{proposal.new_threshold:.4g}** (raw), i.e. {proposal.new_threshold_units:.2f} in today's threshold units; "
        f"{len(proposal.newly_accepted())} of the reviewed images would then pass."
    )
    why = st.text_input("Why (for the audit log)", key="history_recal_why",
                        placeholder=f"{len(proposal.reviewed)} reviewed false rejects")
    if st.button("Apply the new threshold (saves a new model version; the old one is kept)", type="primary",
                 key="history_recalibrate", disabled=not reviewer, icon=":material/tune:"):
        try:
            kept, meta = apply_recalibration(history, proposal, who=reviewer, why=why)
        except (BundleError, HistoryError) as err:
            st.error(str(err))
        else:
            st.success(f"Model {proposal.model_name!r} is now version {meta['model_version']} (threshold "
                       f"{proposal.new_threshold:.4g}); the previous version is kept as model {kept!r}.",
                       icon=":material/check_circle:")
    if not reviewer:
        st.caption("Enter your name as reviewer above to apply it.")

with st.expander("Retrain with the reviewed good images"):
    try:
        original, extra, retrain_problem = retrain_sources(history, run.model_name)
    except BundleError as err:
        original, extra, retrain_problem = [], [], str(err)
    if retrain_problem:
        st.caption(retrain_problem)
    elif not extra:
        st.caption("No reviewed good images to add yet.")
    else:
        new_name = st.text_input("New model name", f"{run.model_name}-retrained", key="history_retrain_name")
        st.caption(f"{len(original)} original training images + {len(extra)} reviewed good image(s).")
        if st.button("Start retraining", key="history_retrain", disabled=not reviewer):
            meta = read_metadata(run.model_name)
            cfg = meta.get("config", {})
            spec = TrainingSpec(name=new_name, sources=[*original, *extra], preset=cfg.get("preset", "quick"),
                                epochs=cfg.get("epochs"), backbone=cfg.get("backbone"), seed=cfg.get("seed"),
                                augment=cfg.get("augment"), exposure=cfg.get("exposure"),
                                owner=session_id(), source_label=f"{meta['data']['source']} + {len(extra)} reviewed")
            try:
                job = get_job_manager().start(spec)
            except (BusyError, JobError, BundleError) as err:
                st.error(str(err))
            else:
                history.audit(who=reviewer, model_name=run.model_name, what="retrain", old=run.model_version,
                              new=new_name, why=f"{len(extra)} reviewed good images added; job {job.id}")
                st.success(f"Training {new_name!r} started; follow it on the **Train** page.")

# ---------------------------------------------------------------- compare versions
st.subheader("Compare two model versions on these images")
names = model_names()
if not names:
    st.caption("No models to compare with.")
else:
    b_name = st.selectbox("Version B: model", names, key="history_compare_model",
                          help="Version A is the model this run was recorded with. Versions kept after a "
                               "recalibration are listed as '<name>.previous-<time>'.")
    if st.button("Compare", key="history_compare", icon=":material/compare_arrows:"):
        try:
            detector_b = get_detector(b_name)
            with st.spinner("Scoring the run's images with version B…"):
                st.session_state[COMPARE_KEY] = (run.run_id, compare_run(run, detector_b, history.labels_by_hash()))
        except (BundleError, HistoryError) as err:
            st.error(str(err))
    stored = st.session_state.get(COMPARE_KEY)
    if stored and stored[0] == run.run_id:
        comparison = stored[1]
        changed = comparison.changed()
        st.markdown(f"**A** = {comparison.name_a} `{comparison.version_a}` · **B** = {comparison.name_b} "
                    f"`{comparison.version_b}` · **{len(changed)} image(s) change verdict** "
                    f"(each at its model's calibrated threshold)")
        counts = comparison.error_counts()
        st.dataframe(pd.DataFrame({
            "Version": ["A", "B"], "NG": [counts[v]["ng"] for v in "AB"],
            "False rejects (reviewed good, NG)": [counts[v]["false_rejects"] for v in "AB"],
            "Misses (reviewed defective, OK)": [counts[v]["misses"] for v in "AB"],
        }), hide_index=True, key="history_compare_counts")
        st.plotly_chart(compare_scatter(comparison), key="history_compare_scatter", config={"displayModeBar": False})
        if changed:
            st.dataframe(pd.DataFrame({
                "File": [i.file_name for i in changed], "Score A": [round(i.score_a, 3) for i in changed],
                "Verdict A": [i.verdict_a for i in changed], "Score B": [round(i.score_b, 3) for i in changed],
                "Verdict B": [i.verdict_b for i in changed],
                "Review": [REVIEW_LABELS.get(i.label or "", "") for i in changed],
            }), hide_index=True, width="stretch", key="history_compare_changed")
        for name, reason in comparison.skipped:
            st.caption(f"Not compared: {name}: {reason}")

with st.expander("Audit log: threshold and model-version changes"):
    entries = history.audit_log()
    if entries:
        st.dataframe(pd.DataFrame({
            "Time": [_when(e.created) for e in entries], "Who": [e.who for e in entries],
            "Model": [e.model_name for e in entries], "Change": [e.what for e in entries],
            "Old": [e.old for e in entries], "New": [e.new for e in entries], "Why": [e.why for e in entries],
        }), hide_index=True, width="stretch", key="history_audit")
    else:
        st.caption("No changes logged yet.")
