"""The Models page's "Export ONNX" section (AppTest): button -> parity-checked export -> download, or one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_jobs")


def _models_page() -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/6_models.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_export_button_offers_the_checked_file_or_says_why_not(
    models_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine export itself is tested in test_deploy_export.py; here its two outcomes as the page shows them."""
    from fod_app.export import ExportError, ParityReport
    from fod_app.ui import export_view

    def refused(name: str):  # noqa: ANN202
        raise ExportError("ONNX parity check failed, nothing was written: 1 verdict(s) differ")

    monkeypatch.setattr(export_view, "export_model_onnx_bytes", refused)
    at = _models_page()
    at.button(key="models_export_onnx_test-model").click().run()
    assert any("Not exported: ONNX parity check failed" in e.value for e in at.error)
    assert not [b for b in at.get("download_button") if "onnx" in str(b.proto.label).lower()]

    class Result:
        parity = ParityReport(45, 2e-6, 5e-6, [], ["9 calibration images + 36 synthetic defects"])

    monkeypatch.setattr(export_view, "export_model_onnx_bytes", lambda name: (b"onnx bytes", Result()))
    at.button(key="models_export_onnx_test-model").click().run()
    assert not at.exception
    assert any("parity on 45 images" in s.value and "verdicts identical" in s.value for s in at.success)
    assert [b for b in at.get("download_button") if "onnx" in str(b.proto.label).lower()]
