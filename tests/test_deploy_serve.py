"""REST endpoint: the real FastAPI app on the session's real model, through fastapi.testclient (httpx)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TEST_MODEL = "test-model"  # trained by conftest.trained_models_dir
INSPECT = REPO / "sample_data" / "inspect"
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def detector(trained_models_dir: Path):
    from fod_app.bundle import load_bundle

    return load_bundle(TEST_MODEL, root=trained_models_dir, device="cpu")


@pytest.fixture
def client_and_store(detector, tmp_path: Path):
    from fastapi.testclient import TestClient

    from fod_app.history import HistoryStore
    from fod_app.serve import create_app

    store = HistoryStore(tmp_path / "history.sqlite3")
    app = create_app(detector, token=TOKEN, max_bytes=400_000, history=store)
    with TestClient(app) as client:
        yield client, store


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_inspect_good_and_defective_images_like_the_engine(client_and_store, detector) -> None:
    from fod_app.data import load_image, prepare_image

    client, store = client_and_store
    answers = []
    for name in ("good_01.png", "defect_01.png"):
        data = (INSPECT / name).read_bytes()
        response = client.post("/inspect?heatmap=1", files={"file": (name, data, "image/png")}, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = next(detector.inspect([(name, prepare_image(load_image(data), detector.config.image_size))]))
        assert body["score"] == pytest.approx(expected.score, rel=1e-5)
        assert body["verdict"] == expected.verdict
        assert body["threshold_units"] == 1.0
        assert body["model"]["model_name"] == TEST_MODEL
        assert body["model"]["model_version"] == detector.metadata["model_version"]
        png = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
        assert png.size == (detector.config.image_size, detector.config.image_size)
        answers.append(body)
    # every answer is in the history, under one REST run
    run = store.run(answers[0]["history_run_id"])
    assert run.source == "rest" and run.model_name == TEST_MODEL
    assert [(i.file_name, i.content_sha256, i.verdict) for i in run.images] == [
        (a["file_name"], a["content_sha256"], a["verdict"]) for a in answers
    ]
    assert [i.score for i in run.images] == pytest.approx([a["score"] for a in answers])
    assert client.get("/health").json()["answered"] == 2


def test_bad_input_gets_one_line_and_is_not_recorded(client_and_store) -> None:
    client, store = client_and_store
    text = client.post("/inspect", files={"file": ("notes.png", b"this is not an image", "image/png")}, headers=AUTH)
    assert text.status_code == 415 and "not a readable image" in text.json()["detail"]
    truncated = (INSPECT / "good_02.png").read_bytes()[:3000]
    broken = client.post("/inspect", files={"file": ("cut.png", truncated, "image/png")}, headers=AUTH)
    assert broken.status_code == 400 and "\n" not in broken.json()["detail"]
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    small = client.post("/inspect", files={"file": ("tiny.png", tiny.getvalue(), "image/png")}, headers=AUTH)
    assert small.status_code == 400 and "too small" in small.json()["detail"]
    missing = client.post("/inspect", data={"other": "x"}, headers=AUTH)
    assert missing.status_code == 400 and "'file'" in missing.json()["detail"]
    assert store.runs() == []


def test_oversized_body_is_refused_with_413(client_and_store) -> None:
    client, store = client_and_store
    big = b"\x89PNG" + b"\0" * 500_000
    response = client.post("/inspect", files={"file": ("big.png", big, "image/png")}, headers=AUTH)
    assert response.status_code == 413 and "too large" in response.json()["detail"]
    assert store.runs() == []


def test_token_is_required(client_and_store) -> None:
    client, store = client_and_store
    data = (INSPECT / "good_01.png").read_bytes()
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        response = client.post("/inspect", files={"file": ("g.png", data, "image/png")}, headers=headers)
        assert response.status_code == 401 and "token" in response.json()["detail"]
        assert client.get("/model", headers=headers).status_code == 401
    model = client.get("/model", headers=AUTH).json()
    assert model["model_name"] == TEST_MODEL and model["image_size"] == 256
    assert model["design_false_reject_rate"] == pytest.approx(0.01)
    assert 0.0 <= model["synthetic_defects_caught"] <= 1.0
    assert client.get("/health").json()["status"] == "ok"  # liveness needs no token
    assert store.runs() == []


def test_non_loopback_needs_a_token(models_env: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from fod_app.cli import main
    from fod_app.serve import ServeError, is_loopback, resolve_token

    monkeypatch.delenv("FOD_API_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert resolve_token("127.0.0.1", None) is None
    with pytest.raises(ServeError, match="short|at least 16"):
        resolve_token("0.0.0.0", "short")
    monkeypatch.setenv("FOD_API_TOKEN", TOKEN)
    assert resolve_token("0.0.0.0", None) == TOKEN
    monkeypatch.delenv("FOD_API_TOKEN")
    assert main(["serve", "--model", TEST_MODEL, "--host", "0.0.0.0"]) == 2
    assert "without a token" in capsys.readouterr().err
