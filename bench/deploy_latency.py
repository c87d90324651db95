"""Latency at batch 1: onnxruntime (the exported graph) vs PyTorch (the same graph), on real images.

    python bench/deploy_latency.py --model NAME [--models-dir models] [--onnx FILE.onnx] [--repeats 30]

Exports the model first (with its parity check) unless ``--onnx`` names an existing export of it. Both runtimes
score the same prepared images (sample_data/inspect), one at a time, after 3 warm-up runs; prints median and p90
milliseconds per image and the thread counts. Asserts nothing; run it on an idle machine for numbers to record.
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

    def torch_once(image: np.ndarray) -> None:
        with torch.inference_mode():
            graph(torch.as_tensor(image[None]))

    def onnx_once(image: np.ndarray) -> None:
        session.run(None, {INPUT_NAME: image[None]})

    rows = []
    for label, run in (("PyTorch (eager, fp32)", torch_once), ("onnxruntime (CPU EP)", onnx_once)):
        for image in images[:3]:
            run(image)
        times = []
        for i in range(args.repeats):
            started = time.perf_counter()
            run(images[i % len(images)])
            times.append(1000 * (time.perf_counter() - started))
        rows.append((label, statistics.median(times), percentile(times, 90)))
    size = detector.config.image_size
    print(f"\n## Batch-1 latency, {args.model} ({detector.config.preset}, {size}x{size}), {args.threads} threads, "
          f"{args.repeats} runs, {os.cpu_count()} CPUs visible\n")
    print("| runtime | median ms/image | p90 ms/image |")
    print("|---|---|---|")
    for label, median, p90 in rows:
        print(f"| {label} | {median:.1f} | {p90:.1f} |")
    print(f"\nonnxruntime / PyTorch median: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
