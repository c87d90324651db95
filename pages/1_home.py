"""Home: what the tool does, and a one-click demo on the bundled sample data."""

from __future__ import annotations

import streamlit as st

from fod_app.data import list_images
from fod_app.jobs import BusyError, JobError, TrainingSpec, get_job_manager, last_training_seconds
from fod_app.paths import SAMPLE_DATA
from fod_app.ui.common import ensure_router, model_names, session_id, set_active_model
from fod_app.ui.training_view import INSPECT_PAGE, duration, job_panel, model_ready_actions

DEMO_MODEL = "demo-solar-cells"
DEMO_PRESET = "cpu"  # the quick preset separates the sample defects poorly (sample-data check in BENCHMARKS.md)
SAMPLE_TRAIN = SAMPLE_DATA / "train_good"
#: Measured, not hoped for (BENCHMARKS.md, "Sample data (the Home demo)"); the progress shows a measured time left.
DEMO_TIME_TEXT = (
    "Training takes about 3 minutes on an idle 2-core computer, and much longer (20 minutes or more) when the "
    "computer is busy with other work; while it runs, the time left is measured and shown."
)

ensure_router()
st.title("FOD Inspector")
st.markdown(
    "FOD Inspector finds defects in photos of parts by learning from **photos of good parts only** — you do not "
    "need any pictures of defects to get started. "
    "Each new photo gets a **score** and an **OK / not OK** verdict, plus a **heat map** that shows where it "
    "differs from the good parts it has seen. "
    "Everything runs on this computer: your images never leave it."
)

st.markdown("#### How it works")
steps = st.columns(3)
with steps[0]:
    st.markdown("**1. Train** on 10–200 photos of good parts (50+ recommended).")
    st.page_link("pages/2_train.py", label="Train a model", icon=":material/model_training:")
with steps[1]:
    st.markdown("**2. Inspect** new photos: score, verdict and heat map for each.")
    st.page_link("pages/3_inspect.py", label="Inspect images", icon=":material/search:")
with steps[2]:
    st.markdown("**3. Check** how well it works on labelled examples, and manage your models.")
    st.page_link("pages/5_evaluate.py", label="Evaluate a model", icon=":material/analytics:")

st.divider()
st.markdown("#### Try it now with the sample data")
n_sample = len(list_images(SAMPLE_TRAIN)) if SAMPLE_TRAIN.is_dir() else 0
st.markdown(
    f"The sample data are {n_sample} images of good solar cells (taken with electroluminescence: cracks show up as "
    "dark lines, dead areas as dark patches) plus a few good and defective cells to inspect. "
    f"One click trains a small demo model on the good cells, then you can inspect the sample cells with it. "
    f"{DEMO_TIME_TEXT}"
)
last_run = last_training_seconds(DEMO_MODEL)
if last_run is not None:
    st.caption(f"The demo model was last trained on this server in {duration(last_run)}.")


manager = get_job_manager()
me = session_id()
job = manager.get(st.session_state.get("home_demo_job"))
if job is not None:
    job_panel(job)
    if not job.active and job.result is not None:
        model_ready_actions(job.result.model_name, f"home_{job.id}", decision_key=f"job_{job.id}")
        if st.button("Inspect the sample images with the demo model", type="primary",
                     icon=":material/arrow_forward:", key="home_go_inspect",
                     help="Makes the demo model the active model and opens the Inspect page."):
            set_active_model(job.result.model_name)
            st.switch_page(INSPECT_PAGE)
    if job.active:
        st.stop()

running = manager.active()
busy = running is not None
if running is not None:
    st.info(f"A training of “{running.name}” is running ({running.started_clock()}); the sidebar shows its "
            "progress. The demo can start when it has finished.", icon=":material/hourglass_top:")
exists = DEMO_MODEL in model_names()
if exists and (job is None or job.result is None):
    st.info(f"A demo model (“{DEMO_MODEL}”) is already trained.", icon=":material/info:")
    if st.button("Inspect the sample images with it", type="primary", icon=":material/arrow_forward:",
                 key="home_inspect_existing"):
        set_active_model(DEMO_MODEL)
        st.switch_page(INSPECT_PAGE)
    st.caption("This makes the demo model the active model.")

label = "Train the demo model again" if exists else "Train demo model on sample data"
if st.button(label, type="secondary" if exists else "primary", disabled=busy or n_sample == 0,
             icon=":material/play_arrow:", key="home_demo"):
    spec = TrainingSpec(
        name=DEMO_MODEL,
        sources=list_images(SAMPLE_TRAIN),
        preset=DEMO_PRESET,
        owner=me,
        source_label="sample data (sample_data/train_good)",
    )
    try:
        started = manager.start(spec)
    except (BusyError, JobError) as err:
        st.warning(str(err), icon=":material/hourglass_top:")
    else:
        st.session_state["home_demo_job"] = started.id
        st.rerun()
if busy:
    st.caption("The button is disabled while a training runs on this server (one training at a time; see above).")
if n_sample == 0:
    st.error(f"The sample data folder is missing ({SAMPLE_TRAIN}); reinstall FOD Inspector to get it back.")
