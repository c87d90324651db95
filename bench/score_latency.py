"""Batch-1 inspection latency of one saved model, with its score spec swapped for each kind the self-check can keep.

    python bench/score_latency.py --models-dir models --name test-model

Prints the median of 21 calls (after 2 warm-ups, 2 threads, CPU) of the backbone, of scoring its features with
each spec (nearest distance alone — which skips FOD's transformer —, reconstruction alone, reconstruction +
nearest, and reconstruction + inter + nearest), and end to end from the image tensor. Time it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fod_app.bundle import load_bundle  # noqa: E402
from fod_app.scoring import ScoreSpec  # noqa: E402

SPECS = {
    "nearest alone (skips the transformer)": {"nearest": 1.0},
    "reconstruction alone": {"reconstruction": 1.0},
    "reconstruction + nearest": {"reconstruction": 0.5, "nearest": 0.5},
    "reconstruction + inter + nearest": {"reconstruction": 0.35, "inter": 0.2, "nearest": 0.45},
}


def median_ms(call, repeats: int = 21) -> float:
    call(), call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    detector = load_bundle(args.name, root=Path(args.models_dir), device="cpu")
    statistics_ = detector.score_spec.statistics
    image = torch.rand(1, 3, detector.config.image_size, detector.config.image_size)
    with torch.inference_mode():
        features = detector.backbone(image)
        print(f"backbone: {median_ms(lambda: detector.backbone(image)):.1f} ms")
        for name, weights in SPECS.items():
            if any(b not in statistics_[0] for b in weights):
                continue
            detector.score_spec = ScoreSpec("standardized", weights, statistics_)
            scoring = median_ms(lambda: detector.score_features(features))
            end_to_end = median_ms(lambda: detector.score_batch(image))
            print(f"{name}: scoring {scoring:.1f} ms, end to end {end_to_end:.1f} ms")


if __name__ == "__main__":
    main()
