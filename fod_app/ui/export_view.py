"""The Models page's "Export ONNX" section: export with the parity check, then a download button."""

from __future__ import annotations

import streamlit as st

from ..bundle import BundleError
from ..export import export_model_onnx_bytes

_STATE = "models_onnx_export"


def render_onnx_export(name: str) -> None:
    """Button -> parity-checked ONNX export of model ``name`` -> download (kept for this session)."""
    with st.expander("Export ONNX (run the model outside this app, e.g. with onnxruntime)"):
        st.caption(
            "One graph from the image (float32 [1, 3, S, S], RGB in [0, 1]) to the anomaly map and score in "
            "threshold units. The file is only produced if it scores the model's own calibration images like "
            "this app does (relative difference at most 0.001, identical verdicts). Takes about a minute."
        )
        if st.button("Export ONNX", key=f"models_export_onnx_{name}", icon=":material/deployed_code:"):
            with st.spinner("Exporting and checking parity..."):
                try:
                    data, result = export_model_onnx_bytes(name)
                except (BundleError, RuntimeError, ValueError, OSError) as err:
                    st.session_state.pop(_STATE, None)
                    st.error(f"Not exported: {err}", icon=":material/error:")
                else:
                    st.session_state[_STATE] = {"name": name, "data": data, "parity": result.parity.describe()}
        done = st.session_state.get(_STATE)
        if done and done["name"] == name:
            st.success(done["parity"], icon=":material/check:")
            st.download_button("Download .onnx", data=done["data"], file_name=f"{name}.onnx",
                               mime="application/octet-stream", key=f"models_download_onnx_{name}",
                               icon=":material/download:", on_click="ignore")
