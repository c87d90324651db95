"""Time `cpu`-preset training end to end (``training.train``) on a benchmark set's good images, 2 threads.

    python bench/train_time.py [--set magnetic_tile@32] [--seed 1] [--source DIR]

Prints the total seconds, when each self-check and the calibration came (seconds since the start), the step count
and the self-check curve. ``--source`` imports ``fod_app`` from another checkout (e.g. a ``git worktree`` of an
older commit): run it alternately with two sources on an idle machine to compare two engines in pairs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.source_checkout import timing_arguments, training_images, use_source  # noqa: E402


def main() -> None:
    args = timing_arguments(__doc__.split("\n")[0]).parse_args()
    use_source(args.source)

    from fod_app import training
    from fod_app.config import create_config

    config = create_config("cpu", seed=args.seed)
    images = training_images(args.set, args.seed, config.image_size)
    marks: list[tuple[float, str]] = []

    def progress(p: training.Progress) -> None:
        if "self-check" in p.message or p.phase in ("calibration", "done"):
            marks.append((round(p.elapsed_s, 1), p.message))

    start = time.perf_counter()
    detector = training.train(images, config, device="cpu", progress=progress)
    total = time.perf_counter() - start
    record = detector.metadata["self_check"]
    print(f"source: {args.source.resolve()}")
    exposure = detector.metadata["training"].get("exposure", {}).get("used", "as_taken")  # older sources: none
    print(f"{args.set} seed {args.seed}: {len(images)} images, {detector.metadata['training']['steps']} steps, "
          f"exposure {exposure}, train() {total:.1f} s")
    for seconds, message in marks:
        print(f"  {seconds:7.1f} s  {message}")
    print(f"self-check curve {record['curve']}, kept step {record['best_step']}, score {record['score']['name']}")


if __name__ == "__main__":
    main()
