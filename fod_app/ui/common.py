"""Shared page furniture: active model, device, cached detector loading. Pages call only these and the engine."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

import streamlit as st

if TYPE_CHECKING:
    from ..inference import Detector

# The engine (torch) is imported inside the functions below, not here: app.py imports this module before it calls
# st.navigation, and a slow import there would leave Streamlit's raw pages/ file list on screen after a server start.

ACTIVE_MODEL_KEY = "active_model"
ACTIVE_SOURCE_KEY = "active_model_source"  # "chosen" | "remembered" | "newest"
REMEMBERED_GONE_KEY = "active_model_remembered_gone"  # the remembered choice no longer exists
GONE_MODEL_KEY = "active_model_gone"
SESSION_ID_KEY = "fod_session_id"
ROUTER_SEEN_KEY = "fod_router_seen"
KEEP_NAV_HIDDEN_ENV = "FOD_HIDE_NAVIGATION"  # "1": an admin really wants no sidebar navigation


@st.cache_resource(show_spinner=False)
def engine_device_label() -> str:
    """'CPU (2 threads)' or 'GPU: <name>' for the device the engine uses."""
    from ..inference import device_label, resolve_device

    return device_label(resolve_device(os.environ.get("FOD_DEVICE", "auto")))


def model_names() -> list[str]:
    """Readable bundles, newest first."""
    from ..bundle import list_bundles

    return [b.name for b in list_bundles() if b.error is None]


def active_model() -> str | None:
    """This session's active model; None when there is none.

    A new session (reload, new tab) starts from the workstation's remembered choice (``fod_app.active``), never
    silently from the newest model: only when nothing was ever chosen (or the remembered model is gone) is the
    newest used, and ``ACTIVE_SOURCE_KEY`` says so for the sidebar. When the active model has disappeared
    (deleted or renamed, e.g. in another session), its name is kept under ``GONE_MODEL_KEY`` so the next page
    that picks a model can say so.
    """
    from ..active import read_active_model

    names = model_names()
    current = st.session_state.get(ACTIVE_MODEL_KEY)
    if current in names:
        return current
    if current is None and ACTIVE_MODEL_KEY not in st.session_state:  # a new session: the remembered choice
        remembered = read_active_model()
        if remembered in names:
            st.session_state[ACTIVE_MODEL_KEY] = remembered
            st.session_state[ACTIVE_SOURCE_KEY] = "remembered"
            return remembered
        if remembered is not None:
            st.session_state[REMEMBERED_GONE_KEY] = remembered
    elif current is not None:
        st.session_state[GONE_MODEL_KEY] = current
    st.session_state[ACTIVE_MODEL_KEY] = names[0] if names else None
    st.session_state[ACTIVE_SOURCE_KEY] = "newest"
    return st.session_state[ACTIVE_MODEL_KEY]


def set_active_model(name: str | None) -> None:
    """Make ``name`` this session's active model and remember it for new sessions on this workstation."""
    from ..active import write_active_model

    st.session_state[ACTIVE_MODEL_KEY] = name
    st.session_state[ACTIVE_SOURCE_KEY] = "chosen"
    write_active_model(name, by=session_id())


@st.cache_resource(show_spinner="Loading model…", max_entries=4)
def _load(name: str, version: str) -> Detector:
    from ..bundle import load_bundle

    return load_bundle(name, device=os.environ.get("FOD_DEVICE", "auto"))


def get_detector(name: str) -> Detector:
    """Load (and cache per model version) a bundle; raises BundleError with a clear message."""
    from ..bundle import BundleError, list_bundles

    info = next((b for b in list_bundles() if b.name == name), None)
    if info is None or info.metadata is None:
        raise BundleError(info.error if info else f"Model {name!r} no longer exists.")
    return _load(name, f"{info.metadata.get('model_version')}-{info.metadata.get('created')}")


def sidebar_status() -> None:
    """Device, active model (and where that choice comes from) and the training job, shown on every page."""
    from .job_status import sidebar_job_status  # job_status builds on this module

    with st.sidebar:
        st.caption(f"Device: **{engine_device_label()}**")
        name = active_model()
        if not name:
            st.caption("Active model: *none yet — train one*")
        else:
            source = st.session_state.get(ACTIVE_SOURCE_KEY)
            note = {
                "remembered": " (the model last chosen on this workstation)",
                "newest": " (the newest model: none was chosen yet; choose on the Models page)",
            }.get(source, "")
            st.caption(f"Active model: **{name}**{note}")
            gone = st.session_state.get(REMEMBERED_GONE_KEY)
            if gone and source == "newest":
                st.caption(f"(“{gone}”, the model last chosen here, no longer exists.)")
        sidebar_job_status()


def wrong_part_warning(flags: list[tuple[str, bool]]) -> None:
    """The wrong-part warning for an inspected batch: ``(file name, unfamiliar)`` per image (see fod_app.familiarity).

    Shows nothing when no image is flagged (or the model predates the check).
    """
    from ..familiarity import summary as familiarity_summary

    text = familiarity_summary([flag for _, flag in flags])
    if text is None:
        return
    names = [name for name, flag in flags if flag]
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    st.warning(f"**{text}** Flagged: {listed}.", icon=":material/report:")


def describe_model(meta: dict[str, Any]) -> str:
    cfg = meta.get("config", {})
    return f"{meta.get('name')} · preset {cfg.get('preset')} · {cfg.get('backbone')} · created {meta.get('created')}"


def session_id() -> str:
    """A random id for this browser session (used as the owner of training jobs)."""
    if SESSION_ID_KEY not in st.session_state:
        st.session_state[SESSION_ID_KEY] = uuid.uuid4().hex[:12]
    return st.session_state[SESSION_ID_KEY]


def ensure_router() -> None:
    """Call first in every page: make sure the page runs inside app.py's router.

    Streamlit keeps a legacy mode for apps with a ``pages/`` folder: until some session has run app.py (which
    calls ``st.navigation``), a browser that opens a page URL directly (e.g. ``/train`` right after the server
    started) gets that page file run on its own, without the router (no wide layout, no device/model status,
    file-name navigation). This leaves that mode for the whole process and, if this session has never been
    through the router, reruns the request through it. (AppTest re-enters the legacy mode on every run after
    ``switch_page``; sessions that already ran the router are not rerun, so widget clicks are not lost.)
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        if not st.session_state.get(ROUTER_SEEN_KEY):
            st.rerun()


def mark_router() -> None:
    """Called by app.py on every run (see ensure_router), after ``st.navigation``.

    ``.streamlit/config.toml`` starts the server with ``client.showSidebarNavigation = false`` so that the legacy
    mode's raw ``pages/`` file list ("app, home, train, ...") is never shown while the first request after a start
    is still importing the engine. The first time the router runs, the process shows the sidebar navigation again
    and reruns once so the browser gets it.
    """
    from streamlit import config

    st.session_state[ROUTER_SEEN_KEY] = True
    if config.get_option("client.showSidebarNavigation") is False and os.environ.get(KEEP_NAV_HIDDEN_ENV) != "1":
        config.set_option("client.showSidebarNavigation", True)
        st.rerun()
