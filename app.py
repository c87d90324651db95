"""FOD Inspector web app: the router. Run with ``streamlit run app.py``.

Every page is a file in ``pages/``; this script sets the layout, shows the device and the active model in
the sidebar on every page, and runs the selected page.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from fod_app.ui.common import mark_router, sidebar_status

PAGES = Path(__file__).resolve().parent / "pages"

st.set_page_config(page_title="FOD Inspector", page_icon=":material/policy:", layout="wide")

navigation = st.navigation(
    [
        st.Page(PAGES / "1_home.py", title="Home", icon=":material/home:", url_path="home", default=True),
        st.Page(PAGES / "2_train.py", title="Train", icon=":material/model_training:", url_path="train"),
        st.Page(PAGES / "3_inspect.py", title="Inspect", icon=":material/search:", url_path="inspect"),
        st.Page(PAGES / "4_explore.py", title="Explore correlations", icon=":material/hub:", url_path="explore"),
        st.Page(PAGES / "5_evaluate.py", title="Evaluate", icon=":material/analytics:", url_path="evaluate"),
        st.Page(PAGES / "6_models.py", title="Models", icon=":material/inventory_2:", url_path="models"),
        st.Page(PAGES / "7_history.py", title="History", icon=":material/history:", url_path="history"),
    ]
)
with st.sidebar:
    st.markdown("### FOD Inspector")
sidebar_status()
mark_router()
navigation.run()
