"""Probe: FOD alone on one benchmark set with another patch-bank cap (``patch_bank_size``), without the peer.

    python bench/bank_cap_probe.py --set elpv_mono --seed 2 --cap 16384

Trains the ``cpu`` preset with the cap given, scores every test image and prints the test image AUROC and the false
reject / miss rates at the calibrated threshold (the figures ``bench/compare.py`` reports for FOD; with the default
cap it reproduces them). Test labels only measure; nothing here chooses a setting.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", default="elpv_mono")
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--cap", type=int, default=8192)
    args = parser.parse_args()

    import numpy as np
    import torch

    from bench.compare import threshold_rates
    from bench.datasets import load_set
    from fod_app.config import create_config
    from fod_app.data import load_images
    from fod_app.metrics import image_auroc
    from fod_app.training import train

    torch.set_num_threads(2)
    config = create_config("cpu", seed=args.seed, patch_bank_size=args.cap)
    bset = load_set(args.set, args.seed)
    images = [image for _, image in load_images(bset.train, config.image_size, compact=True).images]
    started = time.perf_counter()
    detector = train(images, config, device="cpu")
    seconds = time.perf_counter() - started
    scores: list[float] = []
    for start in range(0, len(bset.test), 32):
        chunk = load_images([item.path for item in bset.test[start : start + 32]], config.image_size).images
        scores += detector.raw_scores([image for _, image in chunk]).tolist()
    labels, values = np.array([item.label for item in bset.test]), np.array(scores)
    rates = threshold_rates(labels, values, detector.calibration.threshold)
    print(f"{args.set} seed {args.seed}, cap {args.cap}: train {seconds:.0f} s, "
          f"bank rows {detector.metadata['training']['patch_bank_rows']}, "
          f"image AUROC {image_auroc(labels, values):.4f}, FRR test good {rates['frr_test_good']:.4f}, "
          f"miss {rates['miss_rate']:.4f}")


if __name__ == "__main__":
    main()
