"""Resident memory of `cpu`-preset training (``training.train``), stage by stage: VmRSS sampled every 0.1 s.

    python bench/train_rss.py [--set magnetic_tile] [--seed 2] [--search positional|global|auto]

Prints the RSS after loading the images, the peak of each stage (from the progress messages; the fit's steps are
one stage, the self-check evaluations within it included) and the process's peak (``ru_maxrss``). Linux only.
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def resident_gb() -> float:
    """This process's VmRSS in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1e6
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", default="magnetic_tile")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--search", default="positional", choices=("positional", "global", "auto"))
    args = parser.parse_args()

    import torch

    from bench.source_checkout import training_images
    from fod_app import training
    from fod_app.config import create_config

    torch.set_num_threads(2)
    config = create_config("cpu", seed=args.seed, nearest_search=args.search)
    images = training_images(args.set, args.seed, config.image_size)
    print(f"{args.set} seed {args.seed}: {len(images)} images loaded, RSS {resident_gb():.2f} GB", flush=True)
    stage, peaks, running = ["start"], {}, [True]

    def sample() -> None:
        while running[0]:
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), resident_gb())
            time.sleep(0.1)

    def progress(p: training.Progress) -> None:
        if p.phase == "training":
            stage[0] = "fit (self-checks included)"
        else:
            stage[0] = "Backbone features" if p.message.startswith("Backbone") else " ".join(p.message.split()[:4])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    training.train(images, config, device="cpu", progress=progress)
    running[0] = False
    sampler.join()
    print(f"train() {time.perf_counter() - start:.0f} s; peak RSS per stage:")
    for name, peak in peaks.items():
        print(f"  {peak:.2f} GB  {name}")
    print(f"process peak (ru_maxrss) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
