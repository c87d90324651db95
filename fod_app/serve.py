"""REST endpoint for the line: ``python -m fod_app serve --model NAME`` (FastAPI app, served by uvicorn).

Why FastAPI + uvicorn: a well-kept, typed ASGI stack with multipart uploads (python-multipart), an in-process
test client (``fastapi.testclient.TestClient``), and uvicorn's connection limits; both install as pinned
wheels and need nothing but loopback.

Endpoints:

- ``POST /inspect`` (multipart field ``file``; ``?heatmap=1`` adds the heat-map overlay as base64 PNG) -> JSON
  with score (threshold units), verdict, threshold, model name/version, content hash, history run id;
- ``GET /health`` -> ``{"status": "ok", ...}`` (no token needed: for liveness probes);
- ``GET /model`` -> the model's identity, threshold, input size and score mode.

Every answered inspection is recorded in the inspection history (``source="rest"``, one run per server start,
images appended); an answer that cannot be recorded is refused with 503, so every answer is in the history.
Bad input gets one line: 400 (damaged, too small, too many pixels, no ``file`` field), 415 (not an image),
413 (body over the size limit), 401 (token missing or wrong). No Streamlit here.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .calibration import verdict as verdict_of
from .inference import Detector

TOKEN_ENV = "FOD_API_TOKEN"
#: Default largest request body (bytes): a 20 MB photo is far above what a line camera sends.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: Shortest token accepted when the server is reachable from other machines.
MIN_TOKEN_LENGTH = 16
#: uvicorn refuses connections beyond this many at once (503), instead of queueing without bound.
MAX_CONCURRENCY = 64


class ServeError(RuntimeError):
    """The server cannot start as asked (e.g. no token for a non-loopback address); one line."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The token clients must send: ``token`` or ``$FOD_API_TOKEN``; required (and long enough) off loopback."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host):
        if not token:
            raise ServeError(
                f"refusing to serve on {host} (reachable from other machines) without a token: pass --token or set "
                f"{TOKEN_ENV} (clients then send 'Authorization: Bearer <token>')"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise ServeError(f"the token must be at least {MIN_TOKEN_LENGTH} characters when serving on {host}")
    return token


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: answer 413 when the body exceeds ``max_bytes`` (by Content-Length or while reading)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send: Any) -> None:
        body = (
            b'{"detail":"request body too large: the limit is ' + str(self.max_bytes).encode() + b' bytes"}'
        )
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and int(length) > self.max_bytes:
                await self._refuse(send)
                return
        except ValueError:
            pass
        received, started = 0, False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)


class InspectionService:
    """The model, its history run and the scoring lock behind the endpoints (no web framework here)."""

    def __init__(self, detector: Detector, history: Any) -> None:
        if detector.calibration is None:
            raise ServeError("this model has no calibration; train it again")
        self.detector = detector
        self.history = history
        self.run_id: str | None = None
        self._score_lock = threading.Lock()
        self._record_lock = threading.Lock()
        self.n_answered = 0

    @property
    def review_units(self) -> float | None:
        cal = self.detector.calibration
        assert cal is not None
        return None if cal.review_threshold is None else cal.review_threshold / cal.threshold

    def model_info(self) -> dict[str, Any]:
        from .records import model_identity

        meta, cal, config = self.detector.metadata, self.detector.calibration, self.detector.config
        assert cal is not None
        return {
            **model_identity(meta),
            "threshold_units": 1.0,
            "threshold_raw": cal.threshold,
            "review_threshold_units": self.review_units,
            "design_false_reject_rate": cal.expected_false_reject_rate(),
            "synthetic_defects_caught": cal.synthetic_catch_rate(),  # label-free; None for older models
            "image_size": config.image_size,
            "backbone": config.backbone,
            "score_mode": self.detector.score_spec.mode,
            "created": meta.get("created"),
            "device": str(self.detector.device),
        }

    def inspect(self, data: bytes, file_name: str, heatmap: bool) -> dict[str, Any]:
        """Score one uploaded image; ImageLoadError for bad input; HistoryError if it cannot be recorded."""
        from .data import load_image, prepare_image
        from .records import image_record, model_identity, sha256_bytes
        from .visualize import overlay

        started = time.perf_counter()
        image = prepare_image(load_image(data, name=file_name), self.detector.config.image_size)
        with self._score_lock:
            result = next(iter(self.detector.inspect([(file_name, image)], batch_size=1)))
        digest = sha256_bytes(data)
        record = image_record(result, image, digest, file_name=file_name, extra={"source": "rest"})
        cal = self.detector.calibration
        assert cal is not None
        with self._record_lock:
            if self.run_id is None:
                self.run_id = self.history.record_run(
                    source="rest", **model_identity(self.detector.metadata), threshold=cal.threshold,
                    review_threshold=self.review_units, images=[record], user="rest",
                )
            else:
                self.history.add_images(self.run_id, [record])
            self.n_answered += 1
        answer = {
            "file_name": file_name,
            "score": result.score,
            "verdict": verdict_of(result.score, 1.0, self.review_units),
            "raw_score": result.raw_score,
            "threshold_units": 1.0,
            "threshold_raw": cal.threshold,
            "review_threshold_units": self.review_units,
            "model": model_identity(self.detector.metadata),
            "content_sha256": digest,
            "history_run_id": self.run_id,
            "seconds": round(time.perf_counter() - started, 4),
        }
        if heatmap:
            from .records import png_bytes

            png = png_bytes(overlay(image, result.anomaly_map, 0.5))
            answer["heatmap_png_base64"] = base64.b64encode(png).decode("ascii")
        return answer


def create_app(
    detector: Detector,
    *,
    token: str | None = None,
    max_bytes: int | None = None,
    history: Any = None,
    db: str | Path | None = None,
) -> Any:
    """The FastAPI app for ``detector``. ``history``: a HistoryStore (default: opened at ``db``/the default)."""
    from .data import ImageLoadError
    from .history import HistoryError, HistoryStore

    max_bytes = int(max_bytes or DEFAULT_MAX_BYTES)
    if max_bytes < 1:
        raise ServeError("--max-bytes must be positive")
    service = InspectionService(detector, history if history is not None else HistoryStore(Path(db) if db else None))
    app = FastAPI(title="FOD Inspector", version=str(detector.metadata.get("model_version", "")),
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def unauthorised(request: Request) -> JSONResponse | None:
        if token is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return JSONResponse({"detail": "missing or wrong token: send 'Authorization: Bearer <token>'"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"bad request: {where or 'body'}: {first.get('msg', 'invalid')}"},
                            status_code=400)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        meta = service.detector.metadata
        return {"status": "ok", "model": meta.get("name"), "model_version": meta.get("model_version"),
                "answered": service.n_answered}

    @app.get("/model")
    async def model(request: Request) -> Any:
        return unauthorised(request) or service.model_info()

    @app.post("/inspect")
    async def inspect(request: Request, file: Annotated[UploadFile | None, File()] = None,
                      heatmap: int = 0) -> Any:
        refused = unauthorised(request)
        if refused is not None:
            return refused
        if file is None:
            return JSONResponse({"detail": "no image: send it as the multipart form field 'file'"}, status_code=400)
        data = await file.read()
        name = Path(file.filename or "upload").name or "upload"
        try:
            return await run_in_threadpool(service.inspect, data, name, bool(heatmap))
        except ImageLoadError as err:
            status = 415 if "not a readable image" in str(err) else 400
            return JSONResponse({"detail": str(err)}, status_code=status)
        except HistoryError as err:
            return JSONResponse({"detail": f"not answered: the history cannot record it: {err}"}, status_code=503)

    app.add_middleware(BodyLimit, max_bytes=max_bytes)
    return app


def run_server(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8600,
    token: str | None = None,
    max_bytes: int | None = None,
    device: str = "auto",
    db: str | None = None,
) -> int:
    """Load ``model`` and serve it with uvicorn until interrupted (CUDA when present and ``device`` allows)."""
    import uvicorn

    from .bundle import load_bundle
    from .history import HistoryStore

    token = resolve_token(host, token)
    detector = load_bundle(model, device=device)
    app = create_app(detector, token=token, max_bytes=max_bytes, history=HistoryStore(Path(db) if db else None))
    where = "loopback only" if is_loopback(host) else "reachable from the network, token required"
    print(f"serving model {model!r} ({detector.metadata.get('model_version')}, {detector.device}) on "
          f"http://{host}:{port} ({where})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=MAX_CONCURRENCY,
                timeout_keep_alive=5)
    return 0
