"""Benchmark: train + evaluate FOD on MVTec-layout categories; timings, memory, metrics, ablations.

Each configuration runs in its own subprocess so that peak RSS is per configuration.

    python bench/run_benchmark.py --data ../shared/datasets/mvtec_bottle --preset cpu
    python bench/run_benchmark.py --data DIR1 DIR2 --preset cpu --ablation --out bench/results.json

Prints a Markdown table (for BENCHMARKS.md) and writes all figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Ablation (paper Table 4) and the official-code switches (spec §11), as config overrides. FOD's own branches only
#: (no nearest-good-patch bank), so that the rows compare the paper's method; "with_bank" is the preset as shipped.
ABLATIONS = {
    name: {"patch_bank_size": 0, **overrides}
    for name, overrides in {
        "full": {},
        "reconstruction": {"variant": "reconstruction"},
        "intra": {"variant": "intra"},
        "inter": {"variant": "inter"},
        "residual": {"residual_cancellation": False},
        "out_projection": {"use_out_projection": True},
        "max_minus_p": {"score_weight": "max_minus_p"},
        "zero_grad_quirk": {"zero_grad_quirk": True},
    }.items()
} | {"with_bank": {}}


def run_single(
    data: str, preset: str, overrides: dict, device: str, max_train: int | None, latency_images: int
) -> dict:
    """Train, evaluate and time one configuration in this process; returns a dict of figures."""
    import numpy as np
    import torch

    from fod_app.bundle import load_bundle, save_bundle
    from fod_app.config import create_config
    from fod_app.data import load_images, load_mvtec_layout, resolve_training_images
    from fod_app.evaluation import evaluate_detector
    from fod_app.training import train

    config = create_config(preset, **overrides)
    paths = resolve_training_images(data)
    if max_train:
        paths = paths[:max_train]
    t0 = time.perf_counter()
    report = load_images(paths, config.image_size)
    detector = train([img for _, img in report.images], config, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        save_bundle(detector, "bench", root=Path(tmp))
        train_wall = time.perf_counter() - t0  # images loaded -> bundle on disk
        detector = load_bundle("bench", root=Path(tmp), device=device)
    evaluation = evaluate_detector(detector, load_mvtec_layout(data))
    # Latency: batch 1, end to end from a (3, S, S) array (backbone + FOD + maps), after warm-up.
    test_paths = [item.path for item in load_mvtec_layout(data).test_items[:latency_images]]
    images = [img for _, img in load_images(test_paths, config.image_size).images]
    for img in images[:3]:
        detector.score_batch(detector.to_batch([img]))
    times = []
    for img in images:
        start = time.perf_counter()
        detector.score_batch(detector.to_batch([img])).image_score.cpu()
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    result = evaluation.result
    return {
        "data": Path(data).name,
        "preset": preset,
        "overrides": overrides,
        "device": detector.metadata.get("training", {}).get("device"),
        "n_train_images": len(paths),
        "epochs": config.epochs,
        "train_wall_s": round(train_wall, 1),
        "fit_s": detector.metadata.get("training", {}).get("seconds_fit"),
        "latency_ms_median": round(statistics.median(times), 1),
        "latency_ms_p90": round(float(np.percentile(times, 90)), 1),
        "image_auroc": round(result.image_auroc, 4),
        "pixel_auroc": round(result.pixel_auroc, 4),
        "aupro": round(result.aupro, 4),
        "f1_max": round(result.f1_max, 4),
        "per_type_image_auroc": {k: round(v, 4) for k, v in result.per_type_image_auroc.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 0) if torch.cuda.is_available() else None,
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| data | config | device | train imgs | epochs | train wall s | ms/img (median) | peak RSS MB "
        "| image AUROC | pixel AUROC | AUPRO | F1-max |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        name = r["preset"] + (
            "" if not r["overrides"] else " " + ",".join(f"{k}={v}" for k, v in r["overrides"].items())
        )
        lines.append(
            f"| {r['data']} | {name} | {r['device']} | {r['n_train_images']} | {r['epochs']} | {r['train_wall_s']} | "
            f"{r['latency_ms_median']} | {r['peak_rss_mb']:.0f} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
            f"{r['aupro']:.4f} | {r['f1_max']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="MVTec-layout category folders")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["full"],
        choices=sorted(ABLATIONS),
        help="configurations to run (see ABLATIONS)",
    )
    parser.add_argument("--ablation", action="store_true", help="run every configuration in ABLATIONS")
    parser.add_argument("--epochs", type=int, help="override the preset's epoch budget")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides, e.g. learning_rate=1e-3 n_layers=3",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-train", type=int, help="use only the first N training images (sorted)")
    parser.add_argument("--latency-images", type=int, default=20)
    parser.add_argument("--out", help="write JSON results here (appends to a list)")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: JSON of one configuration
    args = parser.parse_args()

    if args.single:
        spec = json.loads(args.single)
        print("RESULT " + json.dumps(run_single(**spec)), flush=True)
        return

    configs = sorted(ABLATIONS) if args.ablation else args.configs
    rows = []
    for data in args.data:
        for name in configs:
            overrides = dict(ABLATIONS[name])
            if args.epochs:
                overrides["epochs"] = args.epochs
            for item in args.set:
                key, value = item.split("=", 1)
                try:  # JSON values (numbers, true/false, lists); anything else is a string (variant=full)
                    overrides[key] = json.loads(value)
                except ValueError:
                    overrides[key] = value
            spec = {
                "data": str(Path(data).resolve()),
                "preset": args.preset,
                "overrides": overrides,
                "device": args.device,
                "max_train": args.max_train,
                "latency_images": args.latency_images,
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--data", data, "--single", json.dumps(spec)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{Path(data).name} {name}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(line[len("RESULT ") :])
            row["config"] = name
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                out = Path(args.out)
                previous = json.loads(out.read_text()) if out.exists() else []
                out.write_text(json.dumps(previous + [row], indent=1))
    print(f"\nmachine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(markdown(rows))


if __name__ == "__main__":
    main()
