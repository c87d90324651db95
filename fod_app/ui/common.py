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
    """This session's active model (defaults to the newest bundle); None when there is none.

    When the active model has disappeared (deleted or renamed, e.g. in another session), its name is kept
    under ``GONE_MODEL_KEY`` so the next page that picks a model can say so.
    """
    names = model_names()
    current = st.session_state.get(ACTIVE_MODEL_KEY)
    if current in names:
        return current
    if current is not None:
        st.session_state[GONE_MODEL_KEY] = current
    st.session_state[ACTIVE_MODEL_KEY] = names[0] if names else None
    return st.session_state[ACTIVE_MODEL_KEY]


def set_active_model(name: str | None) -> None:
    st.session_state[ACTIVE_MODEL_KEY] = name


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
    """Device and active model, shown on every page."""
    with st.sidebar:
        st.caption(f"Device: **{engine_device_label()}**")
        name = active_model()
        st.caption(f"Active model: **{name}**" if name else "Active model: *none yet — train one*")


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
