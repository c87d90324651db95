"""Latency at batch 1: onnxruntime (the exported graph) vs PyTorch (the same graph), on real images.

    python bench/deploy_latency.py --model NAME [--models-dir models] [--onnx FILE.onnx] [--repeats 30] [--rounds 3]

Exports the model first (with its parity check) unless ``--onnx`` names an existing export of it. Every runtime
scores the same prepared images (sample_data/inspect), one at a time, after 3 warm-up runs: the product's own
detector (``Detector.score_batch``), the export graph in PyTorch, the ONNX file in onnxruntime and, when the
``openvino`` package is installed, the same ONNX file in OpenVINO's CPU runtime. ``--rounds`` repeats the whole
sequence (runtimes interleaved, so a load change hits all of them); prints the median over rounds of each round's
median and p90 milliseconds per image. Asserts nothing; run it on an idle machine for numbers to record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    import torch

    from fod_app.bundle import load_bundle
    from fod_app.data import list_images, load_images
    from fod_app.export import INPUT_NAME, ScoringGraph, export_onnx, onnx_session, read_onnx_metadata

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--models-dir", help="folder holding --model (default: $FOD_MODELS_DIR or models/)")
    parser.add_argument("--onnx", help="an existing export of --model (default: export now to a temporary file)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    root = Path(args.models_dir) if args.models_dir else None
    detector = load_bundle(args.model, root=root, device="cpu")
    torch.set_num_threads(args.threads)
    onnx_path = Path(args.onnx) if args.onnx else Path(tempfile.mkdtemp(prefix="fod-latency-")) / "model.onnx"
    if not args.onnx:
        result = export_onnx(detector, onnx_path)
        print(f"exported in {result.seconds:.0f}s; {result.parity.describe()}")
    meta = read_onnx_metadata(onnx_path)
    if meta.get("fod.model_version") != detector.metadata.get("model_version"):
        sys.exit(f"{onnx_path} is not an export of {args.model} {detector.metadata.get('model_version')}")
    images = [img for _, img in load_images(list_images(REPO / "sample_data" / "inspect"),
                                             detector.config.image_size).images]
    graph = ScoringGraph(detector).eval()
    session = onnx_session(onnx_path, device="cpu", threads=args.threads)

    def detector_once(image: np.ndarray) -> None:
        detector.score_batch(detector.to_batch([image]))

    def torch_once(image: np.ndarray) -> None:
        with torch.inference_mode():
            graph(torch.as_tensor(image[None]))

    def onnx_once(image: np.ndarray) -> None:
        session.run(None, {INPUT_NAME: image[None]})

    runtimes = [("product detector (PyTorch, `Detector.score_batch`)", detector_once),
                ("export graph in PyTorch (eager, fp32)", torch_once),
                ("onnxruntime (CPU EP)", onnx_once)]
    try:
        import openvino

        core = openvino.Core()
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
        ov_version = openvino.__version__.split("-")[0]
        ort_scores = np.array([session.run(["score"], {INPUT_NAME: img[None]})[0][0] for img in images])
        # OpenVINO's CPU default may compute in bf16/fp16 where the CPU supports it; "f32" asks for full precision.
        for hint in ("default precision", "f32"):
            settings = {} if hint == "default precision" else {"INFERENCE_PRECISION_HINT": hint}
            compiled = core.compile_model(str(onnx_path), "CPU", settings)
            # Parity against onnxruntime on every sample image (scores are in threshold units).
            ov_scores = np.array([compiled(img[None])["score"][0] for img in images])
            rel = np.abs(ov_scores - ort_scores) / np.maximum(np.abs(ort_scores), 1e-12)
            same = np.array_equal(ov_scores >= 1.0, ort_scores >= 1.0)
            label = f"OpenVINO {ov_version} (CPU, same ONNX file, {hint})"
            print(f"{label} vs onnxruntime on {len(images)} images: max relative score difference {rel.max():.1e}, "
                  f"verdicts {'identical' if same else 'DIFFER'}")
            runtimes.append((label, lambda image, c=compiled: c(image[None])))
    except ImportError:
        print("openvino is not installed: OpenVINO row skipped")

    per_round: dict[str, list[tuple[float, float]]] = {label: [] for label, _ in runtimes}
    for _ in range(args.rounds):
        for label, run in runtimes:
            for image in images[:3]:
                run(image)
            times = []
            for i in range(args.repeats):
                started = time.perf_counter()
                run(images[i % len(images)])
                times.append(1000 * (time.perf_counter() - started))
            per_round[label].append((statistics.median(times), percentile(times, 90)))
    size = detector.config.image_size
    print(f"\n## Batch-1 latency, {args.model} ({detector.config.preset}, {size}x{size}), {args.threads} threads, "
          f"{args.rounds} rounds x {args.repeats} runs, {os.cpu_count()} CPUs visible\n")
    print("| runtime | median ms/image (median of rounds) | each round's median | p90 ms/image (median of rounds) |")
    print("|---|---|---|---|")
    medians = {}
    for label, rounds in per_round.items():
        medians[label] = statistics.median(m for m, _ in rounds)
        each = " / ".join(f"{m:.1f}" for m, _ in rounds)
        print(f"| {label} | {medians[label]:.1f} | {each} | {statistics.median(p for _, p in rounds):.1f} |")
    base = medians["onnxruntime (CPU EP)"]
    for label, value in medians.items():
        print(f"{label}: {value / base:.2f}x onnxruntime")


if __name__ == "__main__":
    main()
