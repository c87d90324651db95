"""ONNX export of a trained model, with a parity guarantee against PyTorch.

One graph: image tensor -> backbone -> FOD model -> scoring -> (anomaly map, image score), both in threshold
units (1.0 = the model's calibrated threshold), for whichever score mode the bundle uses (product or
standardized, with its per-level good statistics baked in as constants).

Graph input ``images``: float32 ``(B, 3, S, S)``, RGB, NCHW, values in [0, 1] (``S`` = the model's image size,
``B`` dynamic); the backbone's input normalisation happens inside the graph. Outputs: ``anomaly_map``
``(B, S, S)`` and ``score`` ``(B,)``, threshold units. The file's ``metadata_props`` say which model it is.

Before a file is written, the exported graph is run in onnxruntime on the model's own calibration images
(reproduced from the training folder recorded in the bundle: the held-out good images and their synthetic
defects, as the self-check makes them) and/or on ``images`` given by the caller; it is refused (nothing written)
when any image score differs from PyTorch by more than ``RELATIVE_TOLERANCE`` or any verdict differs.
No Streamlit here.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, ignore_regions
from .calibration import verdict
from .inference import Detector
from .scoring import MIN_IMAGE_SCORE, needs_branches, score_maps

#: Largest accepted relative difference of an image score (ONNX vs PyTorch).
RELATIVE_TOLERANCE = 1e-3
#: ONNX opset of the exported graph (onnxruntime 1.30 runs 7..23).
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
#: Batch size used to run the parity images.
PARITY_BATCH = 8


class ExportError(RuntimeError):
    """The export cannot be done or failed its parity check; one-line, user-facing. Nothing was written."""


class ScoringGraph(torch.nn.Module):
    """Backbone + FOD model + scoring of ``detector`` as one module: (B, 3, S, S) in [0, 1] ->
    (anomaly map (B, S, S), image score (B,)), both in threshold units."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        if detector.calibration is None:
            raise ExportError("this model has no calibration; train it again before exporting")
        self.backbone = detector.backbone
        self.model = detector.model
        self.config = detector.config
        self.spec = detector.score_spec
        self.threshold = float(detector.calibration.threshold)
        self.branches = needs_branches(self.config, self.spec, False)
        regions = detector.ignore_regions
        # torch.tensor copies: ``ignored`` returns a shared, read-only cached array
        self.ignored = None if regions is None else torch.tensor(regions.ignored(self.config.image_size))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        outputs = self.model(features, *self.branches)
        maps = score_maps(outputs, self.model.grids, self.config, self.spec)
        anomaly_map, score = maps.anomaly_map, maps.image_score
        if self.ignored is not None:  # the model's ignore regions, exactly as Detector.score_features applies them
            anomaly_map, score = ignore_regions.apply(anomaly_map, self.ignored.to(anomaly_map.device), MIN_IMAGE_SCORE)
        return anomaly_map / self.threshold, score / self.threshold


@dataclass
class ParityReport:
    """Outcome of the parity check: image counts, largest differences, verdict mismatches."""

    n_images: int
    max_relative_score_diff: float
    max_abs_map_diff: float
    verdict_mismatches: list[str]
    sources: list[str]
    tolerance: float = RELATIVE_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_relative_score_diff <= self.tolerance and not self.verdict_mismatches

    def describe(self) -> str:
        """One line, e.g. 'parity on 45 images: max relative score difference 2.1e-06, verdicts identical'."""
        verdicts = (
            "verdicts identical"
            if not self.verdict_mismatches
            else f"{len(self.verdict_mismatches)} verdict(s) differ (e.g. {self.verdict_mismatches[0]})"
        )
        return (
            f"parity on {self.n_images} images ({', '.join(self.sources)}): max relative score difference "
            f"{self.max_relative_score_diff:.2g} (tolerance {self.tolerance:g}), max map difference "
            f"{self.max_abs_map_diff:.2g} units, {verdicts}"
        )


# --------------------------------------------------------------------------- parity images


def calibration_images(detector: Detector, with_synthetic: bool = True) -> list[tuple[str, np.ndarray]]:
    """The model's own calibration images, reproduced from the training folder recorded in its bundle.

    The held-out good images (the same seeded split as training) and, with ``with_synthetic``, their synthetic
    defects (as the self-check makes them, so both verdicts occur). Empty when the folder is gone or its
    content changed (the recorded fingerprint no longer matches).
    """
    from .data import dataset_fingerprint, load_images, resolve_training_images
    from .selfcheck import make_synthetic_images
    from .training import split_holdout

    data = detector.metadata.get("data") or {}
    source, fingerprint = data.get("source"), data.get("fingerprint")
    if not source or not Path(source).is_dir():
        return []
    try:
        paths = resolve_training_images(source)
        if fingerprint and dataset_fingerprint(paths) != fingerprint:
            return []
        report = load_images(paths, detector.config.image_size)
        _, hold_idx = split_holdout(len(report.images), detector.config)
    except (ValueError, OSError):
        return []
    held = [report.images[i] for i in hold_idx]
    named = [(f"calibration/{name}", image) for name, image in held]
    if with_synthetic:
        synthetic = make_synthetic_images([image for _, image in held], detector.config.seed)
        named += [(f"synthetic-defect/{i}", image) for i, image in enumerate(synthetic)]
    return named


def folder_images(folder: str | Path, image_size: int, limit: int = 200) -> list[tuple[str, np.ndarray]]:
    """Up to ``limit`` readable images of ``folder`` (recursive), prepared for the model."""
    from .data import list_images, load_images

    paths = list_images(folder, recursive=True)[:limit]
    report = load_images(paths, image_size)
    return [(f"images/{name}", image) for name, image in report.images]


# --------------------------------------------------------------------------- onnxruntime


def onnx_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers: CUDA first when asked for (or 'auto') and available, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ExportError("onnxruntime has no CUDA provider here (install onnxruntime-gpu); use --device cpu")
    return ["CPUExecutionProvider"]


def onnx_session(path: str | Path, device: str = "auto", threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for an exported file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=onnx_providers(device))


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an exported file (model name, version, weights hash, threshold, ...)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def run_onnx(session: Any, images: np.ndarray, batch_size: int = PARITY_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, S, S) float32 -> (maps (N, S, S), scores (N,)) in threshold units."""
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images[start : start + batch_size])})
        maps.append(out[0])
        scores.append(out[1])
    return np.concatenate(maps), np.concatenate(scores)


@torch.inference_mode()
def run_torch(graph: ScoringGraph, images: np.ndarray, batch_size: int = PARITY_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch reference of ``run_onnx`` (same batches)."""
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        anomaly_map, score = graph(torch.as_tensor(images[start : start + batch_size]))
        maps.append(anomaly_map.float().numpy())
        scores.append(score.float().numpy())
    return np.concatenate(maps), np.concatenate(scores)


def parity_check(
    graph: ScoringGraph, onnx_path: str | Path, named_images: list[tuple[str, np.ndarray]], sources: list[str],
    review_units: float | None, tolerance: float = RELATIVE_TOLERANCE,
) -> ParityReport:
    """Compare onnxruntime (CPU) with PyTorch on ``named_images``; the first image also at batch 1."""
    names = [name for name, _ in named_images]
    images = np.stack([image for _, image in named_images]).astype(np.float32)
    session = onnx_session(onnx_path, device="cpu")
    ref_maps, ref_scores = run_torch(graph, images)
    onnx_maps, onnx_scores = run_onnx(session, images)
    single_map, single_score = run_onnx(session, images[:1], batch_size=1)
    onnx_maps = np.concatenate([single_map, onnx_maps[1:]])
    onnx_scores = np.concatenate([single_score, onnx_scores[1:]])
    relative = np.abs(onnx_scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-6)
    if not np.all(np.isfinite(onnx_scores)):
        relative = np.full_like(relative, np.inf)
    mismatches = [
        f"{name}: PyTorch {verdict(float(a), 1.0, review_units)} {a:.4f}, ONNX {verdict(float(b), 1.0, review_units)} "
        f"{b:.4f}"
        for name, a, b in zip(names, ref_scores, onnx_scores)
        if verdict(float(a), 1.0, review_units) != verdict(float(b), 1.0, review_units)
    ]
    return ParityReport(
        n_images=len(names),
        max_relative_score_diff=float(relative.max()),
        max_abs_map_diff=float(np.abs(onnx_maps - ref_maps).max()),
        verdict_mismatches=mismatches,
        sources=sources,
        tolerance=tolerance,
    )


# --------------------------------------------------------------------------- export


def export_metadata(detector: Detector, report: ParityReport | None = None) -> dict[str, str]:
    """What the file says about itself (ONNX ``metadata_props``; all values are strings)."""
    meta = detector.metadata
    cal = detector.calibration
    assert cal is not None
    size = detector.config.image_size
    backbone = meta.get("backbone") or {}
    props = {
        "fod.model_name": str(meta.get("name", "")),
        "fod.model_version": str(meta.get("model_version", "")),
        "fod.weights_sha256": str((meta.get("weights") or {}).get("sha256", "")),
        "fod.threshold_raw": repr(float(cal.threshold)),
        "fod.threshold_units": "1.0",
        "fod.review_threshold_units": (
            "" if cal.review_threshold is None else repr(cal.review_threshold / cal.threshold)
        ),
        "fod.score_mode": detector.score_spec.mode,
        "fod.score_spec": json.dumps(detector.score_spec.to_dict(), sort_keys=True),
        "fod.nearest_search": next((lv.nearest_search for lv in detector.model.levels if lv.nearest_search), "none"),
        "fod.backbone": str(backbone.get("name", detector.config.backbone)),
        "fod.backbone_weights_sha256": str(backbone.get("weights_sha256", "")),
        "fod.ignore_regions": (
            "none" if detector.ignore_regions is None else json.dumps(detector.ignore_regions.to_dict(), sort_keys=True)
        ),
        "fod.input": (
            f"{INPUT_NAME}: float32 [B, 3, {size}, {size}] NCHW RGB in [0, 1] (resize the photo to {size}x{size}, "
            f"LANCZOS, aspect not kept; mean/std normalisation is inside the graph)"
        ),
        "fod.outputs": (
            f"anomaly_map: float32 [B, {size}, {size}], score: float32 [B]; both in threshold units "
            "(1.0 = the calibrated threshold: score >= 1 is NG, >= review threshold is REVIEW)"
        ),
        "fod.image_size": str(size),
        "fod.exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fod.fod_inspector_version": __version__,
        "fod.torch_version": torch.__version__,
    }
    if report is not None:
        props["fod.parity"] = json.dumps(asdict(report), sort_keys=True)
    return props


def _trace_to_onnx(graph: ScoringGraph, path: Path, exporter: str) -> None:
    size = graph.config.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constant shapes: the size is fixed by design
        if exporter == "dynamo":
            torch.onnx.export(
                graph, (example,), str(path), dynamo=True, external_data=False, opset_version=18,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}}, verbose=False,
            )
        else:
            torch.onnx.export(
                graph, (example,), str(path), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
            )


def _write_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "fod-inspector"
    model.producer_version = __version__
    model.doc_string = props["fod.input"] + "; " + props["fod.outputs"]
    onnx.save(model, str(path))


@dataclass
class ExportResult:
    path: Path
    parity: ParityReport
    seconds: float
    metadata: dict[str, str]


def export_onnx(
    detector: Detector,
    out: str | Path,
    images: list[tuple[str, np.ndarray]] | None = None,
    use_calibration: bool = True,
    exporter: str = "torchscript",
    tolerance: float = RELATIVE_TOLERANCE,
) -> ExportResult:
    """Export ``detector`` (moved to CPU) to ``out`` (.onnx) if it passes the parity check; else ExportError.

    Parity images: the model's calibration images (``use_calibration``) plus ``images`` (name, (3, S, S)).
    The file is written to a temporary name beside ``out`` and renamed only after the check passes.
    """
    started = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"the output file must end in .onnx, got {out.name!r}")
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give a file name ending in .onnx")
    if exporter not in ("torchscript", "dynamo"):
        raise ExportError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    detector.backbone.to("cpu")
    detector.model.to("cpu")
    detector.device = torch.device("cpu")
    named: list[tuple[str, np.ndarray]] = []
    sources = []
    if use_calibration:
        own = calibration_images(detector)
        if own:
            named += own
            sources.append(f"{sum(not n.startswith('synthetic') for n, _ in own)} calibration images + "
                           f"{sum(n.startswith('synthetic') for n, _ in own)} synthetic defects")
    if images:
        named += images
        sources.append(f"{len(images)} given images")
    if not named:
        where = (detector.metadata.get("data") or {}).get("source") or "unknown"
        raise ExportError(
            f"no images for the parity check: the model's training folder ({where}) is gone or has changed; "
            "pass --images DIR with photos of this part. Nothing was written."
        )
    graph = ScoringGraph(detector).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".onnx.tmp", dir=out.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        try:
            _trace_to_onnx(graph, tmp, exporter)
        except Exception as err:  # noqa: BLE001 - any exporter failure becomes one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ExportError(f"the ONNX exporter failed ({exporter}): {first}. Nothing was written.") from err
        cal = detector.calibration
        assert cal is not None
        review_units = None if cal.review_threshold is None else cal.review_threshold / cal.threshold
        report = parity_check(graph, tmp, named, sources, review_units, tolerance)
        if not report.passed:
            raise ExportError(f"ONNX parity check failed, nothing was written: {report.describe()}")
        props = export_metadata(detector, report)
        _write_metadata(tmp, props)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(out, report, time.perf_counter() - started, props)


def export_model_onnx_bytes(name: str) -> tuple[bytes, ExportResult]:
    """Export bundle ``name`` to a temporary .onnx file (parity-checked) and return its bytes (for a download)."""
    from .bundle import load_bundle

    detector = load_bundle(name, device="cpu")
    with tempfile.TemporaryDirectory(prefix="fod-onnx-") as folder:
        result = export_onnx(detector, Path(folder) / f"{name}.onnx")
        return result.path.read_bytes(), result
