"""Probe of the nearest-good-patch bank's design: self-check AUROC chooses; test AUROC only with ``--diagnostic``.

For one benchmark set and seed, training's own split and synthetic defects (``fod_app.training.split_holdout``,
``fod_app.selfcheck``) are rebuilt; then, for each bank design, the nearest-good-patch branch alone is scored on the
held-out good images and the synthetic defects exactly as the self-check scores a branch (per-level z-score with
held-out good statistics, upsample, level mean, smoothing, max) and its AUROC printed with the build time.
``--diagnostic`` also scores the set's test images (labels read after the fact, never used to pick a design).

Designs differ in bank size, candidate cap, channel standardisation and in what a token is: ``level`` = the
level's own pooled features (FOD's input tokens); ``joint`` = every level resampled to the level's grid and
concatenated (on the stride-8 grid this is PatchCore's patch feature).

    python bench/bank_probe.py --set magnetic_tile --seed 0 [--diagnostic]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.datasets import load_set  # noqa: E402
from fod_app import memory_bank, selfcheck  # noqa: E402
from fod_app.backbone import create_feature_extractor  # noqa: E402
from fod_app.config import FODConfig, create_config  # noqa: E402
from fod_app.data import load_images, load_mask  # noqa: E402
from fod_app.metrics import image_auroc  # noqa: E402
from fod_app.model import resample, to_tokens  # noqa: E402
from fod_app.scoring import image_maps  # noqa: E402
from fod_app.training import channel_statistics, extract_features, split_holdout  # noqa: E402

#: name -> (bank size per level, candidate cap, standardise channels, token kind, levels used[, projection dims])
DESIGNS = {
    "joint std 8192/262k p64 (shipped)": (8192, 262144, True, "joint", None, 64),
    "joint std 8192/262k p128": (8192, 262144, True, "joint", None, 128),
    "level std 8192/262k p128 (before)": (8192, 262144, True, "level", None, 128),
    "level raw 8192/262k": (8192, 262144, False, "level", None),
    "joint raw 8192/262k": (8192, 262144, False, "joint", None),
    "joint std 8192/262k": (8192, 262144, True, "joint", None),
    "joint raw 8192/262k, stride-8 only": (8192, 262144, False, "joint", [0]),
    "level std 8192/1M": (8192, 1 << 20, True, "level", None),
    "joint raw 16384/262k": (16384, 262144, False, "joint", None),
}


@dataclass
class ProbeData:
    """One set x seed as training sees it: its split, backbone features per level (N, C, H, W) of the training,
    held-out and synthetic-defect images, and (``with_test``) of the test images with labels and masks."""

    config: FODConfig
    backbone: torch.nn.Module
    images: list[np.ndarray]
    train_idx: np.ndarray
    hold_idx: np.ndarray
    synthetic_images: list[np.ndarray]
    train: list[torch.Tensor]
    held_out: list[torch.Tensor]
    synthetic: list[torch.Tensor]
    test: list[torch.Tensor] | None = None
    test_images: list[np.ndarray] | None = None
    test_labels: np.ndarray | None = None
    test_masks: np.ndarray | None = None  # (N, S, S) bool; None for sets without masks


def probe_data(set_name: str, seed: int, with_test: bool) -> ProbeData:
    """Rebuild training's split and synthetic defects for ``set_name`` (``fod_app.training``, ``fod_app.selfcheck``)."""
    config = create_config("cpu", seed=seed)
    bset = load_set(set_name, seed)
    images = [image for _, image in load_images(bset.train, config.image_size).images]
    train_idx, hold_idx = split_holdout(len(images), config)
    backbone = create_feature_extractor(config.backbone, device="cpu")
    dev = torch.device("cpu")
    features = extract_features(backbone, images, dev)
    synthetic = selfcheck.make_synthetic_images([images[i] for i in hold_idx], config.seed)
    train_f = [f[torch.as_tensor(train_idx)] for f in features]
    hold_f = [f[torch.as_tensor(hold_idx)] for f in features]
    data = ProbeData(config, backbone, images, train_idx, hold_idx, synthetic, train_f, hold_f,
                     extract_features(backbone, synthetic, dev))
    if with_test:
        size = config.image_size
        data.test_images = [img for _, img in load_images([t.path for t in bset.test], size).images]
        data.test_labels = np.array([t.label for t in bset.test])
        data.test = extract_features(backbone, data.test_images, dev)
        if bset.has_masks:
            data.test_masks = np.stack([load_mask(t.mask_path, size) if t.label else np.zeros((size, size), bool)
                                        for t in bset.test])
    return data


def joint_maps(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level l: every level resampled to l's grid (``fod_app.model.resample``, as ``FODModel.bank_queries``),
    concatenated."""
    return [torch.cat([resample(f, tuple(target.shape[-2:])) for f in features], 1) for target in features]


def probe_arguments(description: str, designs: list[str], results_file: bool = False) -> argparse.ArgumentParser:
    """The probes' shared command line: --set, --seed, --designs, --diagnostic (and --out with ``results_file``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--set", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--designs", nargs="*", default=designs)
    parser.add_argument("--diagnostic", action="store_true", help="also print test AUROC (never used to choose)")
    if results_file:
        parser.add_argument("--out", help="append the results to this JSON list")
    return parser


def append_results(out: str | None, set_name: str, seed: int, results: dict) -> None:
    """Append one run's results ({"set", "seed", "results"}) to the JSON list at ``out`` (nothing when None)."""
    if not out:
        return
    path = Path(out)
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append({"set": set_name, "seed": seed, "results": results})
    path.write_text(json.dumps(rows, indent=1))


def main() -> None:
    args = probe_arguments(__doc__.split("\n")[0], list(DESIGNS)).parse_args()
    torch.set_num_threads(2)
    data = probe_data(args.set, args.seed, args.diagnostic)
    config, train_f, hold_f, synth_f, test_f = data.config, data.train, data.held_out, data.synthetic, data.test
    test_labels = data.test_labels
    grids = [tuple(f.shape[-2:]) for f in train_f]
    labels = np.r_[np.zeros(len(data.hold_idx)), np.ones(len(data.synthetic_images))]
    print(f"{args.set} seed {args.seed}: {len(data.train_idx)} training images, {len(data.hold_idx)} held out, "
          f"{len(data.synthetic_images)} synthetic defects", flush=True)
    for name in args.designs:
        size, cap, standardise, kind, used, *projection = DESIGNS[name] + (128,)
        prep = joint_maps if kind == "joint" else (lambda f: f)
        used = used or list(range(len(grids)))
        started = time.perf_counter()
        banks, norms = [], []
        for i, f in enumerate(prep(train_f)):
            if i not in used:
                continue
            mean, std = channel_statistics(f) if standardise else (torch.zeros(f.shape[1]), torch.ones(f.shape[1]))
            norms.append((mean, std.clamp_min(1e-6)))
            tokens = (to_tokens(f).flatten(0, 1) - norms[-1][0]) / norms[-1][1]
            banks.append(memory_bank.build_bank(tokens, size, config.seed + i, cap, projection[0]))
        build_s = time.perf_counter() - started

        def distances(feats, banks=banks, norms=norms, prep=prep, used=used):
            feats = [f for i, f in enumerate(prep(feats)) if i in used]
            return [torch.cat([memory_bank.nearest_distance((to_tokens(f[s:s + 16]) - m) / sd, b)
                               for s in range(0, len(f), 16)])
                    for f, b, (m, sd) in zip(feats, banks, norms)]

        g = [grids[i] for i in used]
        good, synth = distances(hold_f), distances(synth_f)
        stats = [(x.mean(), x.std()) for x in good]

        def score(d, stats=stats, g=g):
            return image_maps([(x - m) / s for x, (m, s) in zip(d, stats)], g, config)[1].numpy()

        line = f"  {name:38s} self-check AUROC {image_auroc(labels, np.r_[score(good), score(synth)]):.4f}"
        if test_f is not None:
            line += f"  [diagnostic test AUROC {image_auroc(test_labels, score(distances(test_f))):.4f}]"
        print(line + f"  bank build {build_s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
