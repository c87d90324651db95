"""What the timing scripts that can time another checkout's engine share (``--source``; ``selfcheck_time.py``,
``train_time.py``): the command-line arguments, the import path and the benchmark set's good training images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timing_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with ``--set``, ``--seed`` and ``--source`` (the checkout whose ``fod_app`` is timed)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--set", default="magnetic_tile@32")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--source", type=Path, default=REPO, help="checkout whose fod_app is timed")
    return parser


def use_source(source: Path) -> None:
    """Import ``fod_app`` from ``source`` (``bench`` stays this checkout's) and time on 2 threads."""
    sys.path.insert(0, str(source.resolve()))
    sys.path.insert(1, str(REPO))
    import torch

    torch.set_num_threads(2)


def training_images(set_name: str, seed: int, image_size: int) -> list:
    """The good training images of a benchmark set as (3, S, S) arrays, loaded with the source's ``fod_app``."""
    import inspect

    from bench.datasets import load_set
    from fod_app.data import load_images

    # uint8 as the product's training callers load them, where the source's load_images can
    compact = {"compact": True} if "compact" in inspect.signature(load_images).parameters else {}
    return [image for _, image in load_images(load_set(set_name, seed).train, image_size, **compact).images]
