"""Label-free probe of the nearest-good-patch bank's design: self-check AUROC only, no test image is read.

For one benchmark set and seed, training's own split and synthetic defects (``fod_app.training.split_holdout``,
``fod_app.selfcheck``) are rebuilt; then, for each bank design, the nearest-good-patch branch alone is scored on the
held-out good images and the synthetic defects exactly as the self-check scores a branch (per-level z-score with
held-out good statistics, upsample, level mean, smoothing, max) and its AUROC printed with the build time.

    python bench/bank_probe.py --set magnetic_tile --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.datasets import load_set  # noqa: E402
from fod_app import memory_bank, selfcheck  # noqa: E402
from fod_app.backbone import create_feature_extractor  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.data import load_images  # noqa: E402
from fod_app.metrics import image_auroc  # noqa: E402
from fod_app.model import to_tokens  # noqa: E402
from fod_app.scoring import image_maps  # noqa: E402
from fod_app.training import channel_statistics, extract_features, split_holdout  # noqa: E402

#: name -> (bank size per level, candidate cap, standardise channels)
DESIGNS = {
    "8192 of 65k, standardised": (8192, 65536, True),
    "8192 of 262k, standardised (shipped)": (8192, 262144, True),
    "16384 of 131k, standardised": (16384, 131072, True),
    "8192 of 65k, raw features": (8192, 65536, False),
    "4096 of 65k, standardised": (4096, 65536, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--designs", nargs="*", default=list(DESIGNS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = create_config("cpu", seed=args.seed)
    bset = load_set(args.set, args.seed)
    images = [image for _, image in load_images(bset.train, config.image_size).images]
    train_idx, hold_idx = split_holdout(len(images), config)
    backbone = create_feature_extractor(config.backbone, device="cpu")
    dev = torch.device("cpu")
    features = extract_features(backbone, images, dev)
    train_f = [f[torch.as_tensor(train_idx)] for f in features]
    hold_f = [f[torch.as_tensor(hold_idx)] for f in features]
    synthetic = selfcheck.make_synthetic_images(
        [images[i] for i in hold_idx], [images[i] for i in train_idx[:50]], config.seed
    )
    synth_f = extract_features(backbone, synthetic, dev)
    grids = [tuple(f.shape[-2:]) for f in features]
    labels = np.r_[np.zeros(len(hold_idx)), np.ones(len(synthetic))]
    print(f"{args.set} seed {args.seed}: {len(train_idx)} training images, {len(hold_idx)} held out, "
          f"{len(synthetic)} synthetic defects")
    for name in args.designs:
        size, cap, standardise = DESIGNS[name]
        started = time.perf_counter()
        banks, norms = [], []
        for i, f in enumerate(train_f):
            mean, std = channel_statistics(f) if standardise else (torch.zeros(f.shape[1]), torch.ones(f.shape[1]))
            norms.append((mean, std.clamp_min(1e-6)))
            tokens = (to_tokens(f).flatten(0, 1) - norms[i][0]) / norms[i][1]
            banks.append(memory_bank.build_bank(tokens, size, config.seed + i, cap))
        build_s = time.perf_counter() - started

        def distances(feats, banks=banks, norms=norms):
            return [memory_bank.nearest_distance((to_tokens(f) - m) / s, b)
                    for f, b, (m, s) in zip(feats, banks, norms)]

        good, synth = distances(hold_f), distances(synth_f)
        stats = [(g.mean(), g.std()) for g in good]
        z_good = [(g - m) / s for g, (m, s) in zip(good, stats)]
        z_synth = [(g - m) / s for g, (m, s) in zip(synth, stats)]
        scores = np.r_[image_maps(z_good, grids, config)[1].numpy(), image_maps(z_synth, grids, config)[1].numpy()]
        print(f"  {name:40s} self-check AUROC {image_auroc(labels, scores):.4f}  bank build {build_s:.1f} s")


if __name__ == "__main__":
    main()
