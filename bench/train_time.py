"""Time `cpu`-preset training end to end (``training.train``) on a benchmark set's good images, 2 threads.

    python bench/train_time.py [--set magnetic_tile@32] [--seed 1] [--source DIR]

Prints the total seconds, when each self-check and the calibration came (seconds since the start), the step count
and the self-check curve. ``--source`` imports ``fod_app`` from another checkout (e.g. a ``git worktree`` of an
older commit): run it alternately with two sources on an idle machine to compare two engines in pairs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", default="magnetic_tile@32")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--source", type=Path, default=REPO, help="checkout whose fod_app is timed")
    args = parser.parse_args()
    sys.path.insert(0, str(args.source.resolve()))
    sys.path.insert(1, str(REPO))  # bench.datasets from this checkout

    import torch

    from bench.datasets import load_set
    from fod_app import training
    from fod_app.config import create_config
    from fod_app.data import load_images

    torch.set_num_threads(2)
    config = create_config("cpu", seed=args.seed)
    images = [image for _, image in load_images(load_set(args.set, args.seed).train, config.image_size).images]
    marks: list[tuple[float, str]] = []

    def progress(p: training.Progress) -> None:
        if "self-check" in p.message or p.phase in ("calibration", "done"):
            marks.append((round(p.elapsed_s, 1), p.message))

    start = time.perf_counter()
    detector = training.train(images, config, device="cpu", progress=progress)
    total = time.perf_counter() - start
    record = detector.metadata["self_check"]
    print(f"source: {args.source.resolve()}")
    print(f"{args.set} seed {args.seed}: {len(images)} images, {detector.metadata['training']['steps']} steps, "
          f"train() {total:.1f} s")
    for seconds, message in marks:
        print(f"  {seconds:7.1f} s  {message}")
    print(f"self-check curve {record['curve']}, kept step {record['best_step']}, score {record['score']['name']}")


if __name__ == "__main__":
    main()
