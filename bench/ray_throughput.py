"""Batch-scoring throughput: images/s of the local path vs Ray Data with 1 and 2 workers.

    python bench/ray_throughput.py --model NAME [--models-dir models] [--n 200] [--workers 1 2]

The same ``--n`` real images (magnetic_tile/test then mvtec_bottle/test from /work/shared/datasets, else
sample_data, cycled) are scored by ``Detector.inspect`` in this process (batch 8) and by
``fod_app.batch_ray.score_with_ray`` on a fresh local Ray per worker count (``ray.init(num_cpus=workers)``).
Ray figures are given without start-up (first result to last) and with it (``ray.init`` to the last result).
No history is written. Asserts that Ray's scores equal the local ones (1e-5 relative).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "datasets"


def image_paths(n: int) -> list[Path]:
    from fod_app.data import list_images

    roots = [DATA / "magnetic_tile" / "test", DATA / "mvtec_bottle" / "test"]
    paths = [p for root in roots if root.is_dir() for p in list_images(root, recursive=True)]
    paths = paths or list_images(REPO / "sample_data", recursive=True)
    return list(itertools.islice(itertools.cycle(paths), n)) if len(paths) < n else paths[:n]


def main() -> None:
    import ray
    import torch

    from fod_app.batch_ray import score_with_ray, start_ray
    from fod_app.bundle import load_bundle, models_dir
    from fod_app.data import load_image, prepare_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--models-dir")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    root = Path(args.models_dir).resolve() if args.models_dir else models_dir()
    paths = image_paths(args.n)
    # distinct names even when paths repeat (cycled): score_with_ray keys rows by path
    paths = list(dict.fromkeys(paths))

    detector = load_bundle(args.model, root=root, device="cpu")
    size = detector.config.image_size
    started = time.perf_counter()
    local = {r.name: r.score for r in detector.inspect(
        ((str(p), prepare_image(load_image(p), size)) for p in paths), batch_size=8)}
    local_s = time.perf_counter() - started
    rows = [("local (this process, batch 8)", torch.get_num_threads(), local_s, local_s)]
    for workers in args.workers:
        t0 = time.perf_counter()
        start_ray(workers, None)
        arrivals: list[tuple[float, int]] = []  # (time, images) per result batch
        results = score_with_ray(paths, args.model, root, workers=workers,
                                 on_batch=lambda c, a=arrivals: a.append((time.perf_counter(), len(c["path"]))))
        end = time.perf_counter()
        total = end - t0
        ray.shutdown()
        scores = np.array([r.score for r in results])
        np.testing.assert_allclose(scores, [local[str(p)] for p in paths], rtol=1e-5)
        # steady state: the images after the first result batch, over the time after it
        after_first = len(paths) - arrivals[0][1]
        steady = (end - arrivals[0][0]) * len(paths) / after_first if after_first and end > arrivals[0][0] else total
        rows.append((f"Ray Data, {workers} worker(s) (1 thread each)", workers, steady, total))
    print(f"\n## Batch scoring throughput: {args.model} ({size}x{size}), {len(paths)} images\n")
    print("| engine | threads/workers | images/s (after the first batch) | images/s (incl. start-up) |")
    print("|---|---|---|---|")
    for label, threads, steady, total in rows:
        print(f"| {label} | {threads} | {len(paths) / steady:.2f} | {len(paths) / total:.2f} |")


if __name__ == "__main__":
    main()
