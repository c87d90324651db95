"""Do the self-check's score candidates localise? Per candidate: image and pixel AUROC on the self-check's synthetic
defects (label-free: their masks are known by construction) and on the test set (measurement only).

Two runs keep a mix of FOD's trained branches with the nearest distance (full magnetic tile seed 2: intra + nearest;
magnetic_tile@16 seed 2: all four in the stored run, intra + inter + nearest on today's engine) and gain image
AUROC but lose pixel AUROC against PatchCore (BENCHMARKS.md
"Twenty-fourth session"). This probe trains FOD as ``train`` does and asks whether the synthetic defects' masks
see the same loss (which would let a label-free rule keep the map sharp), and how a candidate's map changes when each
trained branch's z-map is centred per image (its per-image median removed: the ``centred`` figures of the output),
which keeps local peaks and drops whole-image offsets.

    .venv/bin/python bench/map_probe.py --set magnetic_tile@16 --seed 2 --out bench/results/map_probe_mt16_s2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.datasets import BenchSet, load_set  # noqa: E402
from fod_app import selfcheck  # noqa: E402
from fod_app.config import FODConfig, create_config  # noqa: E402
from fod_app.data import load_images, load_mask  # noqa: E402
from fod_app.inference import Detector  # noqa: E402
from fod_app.metrics import image_auroc, pixel_auroc  # noqa: E402
from fod_app.scoring import UNTRAINED_BRANCH, ScoreSpec  # noqa: E402
from fod_app.synthetic import synthetic_defects  # noqa: E402
from fod_app.training import extract_features, split_holdout, train  # noqa: E402

#: Every STRIDE-th pixel each way enters the pixel AUROC (the maps are smoothed with sigma 4 px).
STRIDE = 2


def candidate_map(maps: dict[str, torch.Tensor], spec: ScoreSpec, centred: bool) -> torch.Tensor:
    """The candidate's map (N, S, S), as the self-check makes it (``selfcheck.combined_map``); ``centred``: the
    trained branches' z-maps minus their per-image median first."""
    if centred:
        maps = {branch: m if branch in (UNTRAINED_BRANCH, "product") else
                m - m.flatten(1).median(dim=1).values[:, None, None] for branch, m in maps.items()}
    return selfcheck.combined_map(maps, spec)


def figures(maps: dict[str, torch.Tensor], specs: dict[str, ScoreSpec], labels: np.ndarray, masks: np.ndarray | None,
            centred: bool) -> dict[str, dict[str, float]]:
    result = {}
    for name, spec in specs.items():
        m = candidate_map(maps, spec, centred)
        entry = {"image": round(float(image_auroc(labels, m.flatten(1).max(dim=1).values.numpy())), 4)}
        if masks is not None:
            entry["pixel"] = round(float(pixel_auroc(masks[:, ::STRIDE, ::STRIDE],
                                                     m[:, ::STRIDE, ::STRIDE].numpy())), 4)
        result[name] = entry
    return result


def train_as_product(set_name: str, seed: int) -> tuple[FODConfig, BenchSet, Detector, list[np.ndarray]]:
    """Train the ``cpu`` preset on a benchmark set as ``train`` does; also return training's held-out good images."""
    torch.manual_seed(seed)
    config = create_config("cpu", seed=seed)
    bset = load_set(set_name, seed)
    images = [img for _, img in load_images(bset.train, config.image_size).images]
    detector = train(images, config, device="cpu")
    _, hold_idx = split_holdout(len(images), config)
    return config, bset, detector, [images[i] for i in hold_idx]


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every train-then-rescore probe takes: ``--set``, ``--seed``, ``--out``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--set", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main() -> None:
    args = probe_parser(__doc__).parse_args()
    started = time.perf_counter()
    config, bset, detector, hold = train_as_product(args.set, args.seed)
    record = detector.metadata["self_check"]
    dev = torch.device("cpu")
    # the self-check's own synthetic defects (``selfcheck.make_synthetic_images``), with their masks
    synthetic, synthetic_masks, _ = synthetic_defects(hold, hold, selfcheck.defects_per_image(len(hold)), config.seed)
    hold_features = extract_features(detector.backbone, hold, dev)
    statistics, good_maps = selfcheck.held_out_reference(detector.model, hold_features, detector.config)
    per_branch = {k: v for k, v in record["per_branch"].items() if k != "combined"}
    specs = selfcheck.candidate_specs(detector.config, per_branch, statistics, good_maps)
    synthetic_maps = selfcheck.branch_z_maps(detector.model, extract_features(detector.backbone, synthetic, dev),
                                             statistics, detector.config)
    check_maps = {k: torch.cat([good_maps[k], synthetic_maps[k]]) for k in good_maps}
    check_labels = np.r_[np.zeros(len(hold)), np.ones(len(synthetic))]
    size = config.image_size
    check_masks = np.concatenate([np.zeros((len(hold), size, size), bool), np.stack(synthetic_masks).astype(bool)])

    items = bset.test
    labels = np.array([t.label for t in items])
    masks = None
    if bset.has_masks:
        masks = np.stack([load_mask(t.mask_path, size) if t.label else np.zeros((size, size), bool) for t in items])
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(items), 16):
        loaded = load_images([t.path for t in items[start : start + 16]], size)
        feats = extract_features(detector.backbone, [img for _, img in loaded.images], dev)
        for k, v in selfcheck.branch_z_maps(detector.model, feats, statistics, detector.config).items():
            parts.setdefault(k, []).append(v)
    test_maps = {k: torch.cat(v) for k, v in parts.items()}
    out = {
        "set": args.set, "seed": args.seed, "kept": record["score"]["name"],
        "steps_run": record["steps_run"],
        "self_check": {"plain": figures(check_maps, specs, check_labels, check_masks, False),
                       "centred": figures(check_maps, specs, check_labels, check_masks, True)},
        "test": {"plain": figures(test_maps, specs, labels, masks, False),
                 "centred": figures(test_maps, specs, labels, masks, True)},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.write_text(json.dumps(out, indent=1))
    print(f"{args.set} seed {args.seed}: kept {out['kept']} after {out['steps_run']} steps")
    print(f"{'candidate':40s} {'check img':>9s} {'check px':>9s} {'test img':>9s} {'test px':>9s}"
          f" | centred: {'check img':>9s} {'check px':>9s} {'test img':>9s} {'test px':>9s}")
    for name in specs:
        row = [out[w][c][name].get(k) for c in ("plain", "centred") for w in ("self_check", "test")
               for k in ("image", "pixel")]
        print(f"{name:40s} " + " ".join(f"{v:9.4f}" if v is not None else f"{'-':>9s}" for v in row[:4])
              + " | " + " ".join(f"{v:9.4f}" if v is not None else f"{'-':>9s}" for v in row[4:]))


if __name__ == "__main__":
    main()
