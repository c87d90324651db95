"""The training job in the sidebar of every page and every browser tab: progress, time left, cancel, outcome.

Training jobs belong to the server (``fod_app.jobs``), not to the tab that started them: a reload, a second tab
or a colleague's browser sees the same job here, polled by a fragment; when it ends every open session is told
the outcome and, for a new model, asked "use it now?" (the active model never changes silently).
"""

from __future__ import annotations

import time

import streamlit as st

from ..jobs import CANCELLED, DONE, FAILED, Job, get_job_manager
from .common import active_model, session_id
from .training_view import (
    cancel_controls,
    decided,
    duration,
    model_ready_prompt,
    percent,
    time_left,
    watch_job,
    watched,
)

TRAIN_PAGE = "pages/2_train.py"
POLL_ACTIVE = "2s"
#: While no job runs, look for one started elsewhere this often.
POLL_IDLE = "5s"
#: Finished jobs are announced to sessions that did not watch them for this long after they end.
ANNOUNCE_S = 30 * 60
ANNOUNCED_KEY = "jobs_announced"
DISMISSED_KEY = "jobs_dismissed"


def _seen(key: str, job: Job) -> bool:
    return job.id in st.session_state.get(key, [])


def _mark(key: str, job: Job) -> None:
    items = st.session_state.setdefault(key, [])
    if job.id not in items:
        items.append(job.id)


def _running(job: Job, me: str) -> None:
    watch_job(job)
    st.markdown(f"**Training “{job.name}”**")
    st.progress(job.fraction, text=f"{job.phase_text}… {percent(job.fraction)}")
    st.caption(
        f"Time left (learning step): **{time_left(job)}** · elapsed {duration(job.elapsed_s)}",
        help=job.eta_note() or None,
    )
    st.caption("Yours (this tab)." if job.owned_by(me) else "Started in another tab or by another user.")
    st.page_link(TRAIN_PAGE, label="Follow it on the Train page", icon=":material/monitoring:")
    cancel_controls(job, me, f"side_{job.id}")


def _outcome(job: Job) -> None:
    if not _seen(ANNOUNCED_KEY, job):
        _mark(ANNOUNCED_KEY, job)
        text = {DONE: f"Model “{job.name}” is ready.", FAILED: f"Training of “{job.name}” failed.",
                CANCELLED: f"Training of “{job.name}” was cancelled."}.get(job.state)
        if text:
            st.toast(text, icon=":material/notifications:")
    if job.state == DONE and job.result is not None:
        st.success(f"Model **{job.name}** is ready ({duration(job.result.seconds)}).", icon=":material/check_circle:")
        if active_model() != job.name and not decided(f"job_{job.id}"):
            model_ready_prompt(job.name, f"side_{job.id}", decision_key=f"job_{job.id}", compact=True)
    elif job.state == FAILED:
        st.error(f"Training of “{job.name}” failed: {job.error}", icon=":material/error:")
    elif job.state == CANCELLED:
        st.info(f"Training of “{job.name}” was cancelled; nothing was saved.", icon=":material/block:")
    if st.button("Dismiss", key=f"side_dismiss_{job.id}", icon=":material/close:"):
        _mark(DISMISSED_KEY, job)
        st.rerun(scope="app")


def sidebar_job_status() -> None:
    """Call inside ``with st.sidebar``: the running job (any session's) or the latest outcome, kept up to date."""
    manager = get_job_manager()
    me = session_id()
    seen = manager.active()

    @st.fragment(run_every=POLL_ACTIVE if seen is not None else POLL_IDLE)
    def _status() -> None:
        job = manager.active()
        if (job.id if job else None) != (seen.id if seen else None):
            st.rerun(scope="app")  # a job started or ended: refresh the whole page once (and the poll interval)
        if job is not None:
            _running(job, me)
            return
        latest = manager.latest()
        if latest is None or latest.active or _seen(DISMISSED_KEY, latest):
            return
        recent = latest.finished_at is not None and time.time() - latest.finished_at < ANNOUNCE_S
        if watched(latest) or recent:
            _outcome(latest)

    _status()
