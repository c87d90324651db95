"""Streamlit-side helpers shared by the pages (this subpackage imports Streamlit; the engine does not)."""
