"""Probe of the self-check's design: which synthetic defects and which choice rule pick the score combination.

For one benchmark set and seed, FOD is trained as ``bench/compare.py`` trains it (cached as a bundle under
``--cache``), training's own hold-out split is rebuilt, and for each self-check design (how opaque the synthetic
defects are) every score combination is scored on the held-out good images and the synthetic defects, exactly as
``fod_app.selfcheck.evaluate`` does. Printed: each branch's self-check AUROC, the combination each choice rule
picks, and with ``--diagnostic`` the test image AUROC of every combination (labels read after the fact: they show
how well a design ranks the combinations, they never pick one).

    python bench/selfcheck_probe.py --set elpv_mono@16 --seed 0 --cache /tmp/probe [--diagnostic]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.datasets import load_set  # noqa: E402
from fod_app import selfcheck  # noqa: E402
from fod_app.bundle import load_bundle, save_bundle  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.data import load_images, load_mask  # noqa: E402
from fod_app.metrics import image_auroc, pixel_auroc  # noqa: E402
from fod_app.synthetic import synthetic_defects  # noqa: E402
from fod_app.training import extract_features, split_holdout, train  # noqa: E402

#: name -> (opacity range of the synthetic defects, kinds). "opaque (before)" is what training uses.
DESIGNS = {
    "opaque (before)": ((1.0, 1.0), ("patch", "scar", "blend")),
    "graded 0.2-1": ((0.2, 1.0), ("patch", "scar", "blend")),
    "half 0.5": ((0.5, 0.5), ("patch", "scar", "blend")),
    "subtle 0.15-0.5": ((0.15, 0.5), ("patch", "scar", "blend")),
    "crack+stain": ((1.0, 1.0), ("crack", "stain")),
    "all five": ((1.0, 1.0), ("patch", "scar", "blend", "crack", "stain")),
    "crack": ((1.0, 1.0), ("crack",)),
    "stain": ((1.0, 1.0), ("stain",)),
}


def maps_of(detector, features: list[torch.Tensor], stats, batch: int = 8) -> dict[str, torch.Tensor]:
    """Branch z-maps (N, S/2, S/2) (every 2nd pixel: the maps are smooth) of backbone features, in batches."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, features[0].shape[0], batch):
        chunk = [f[start : start + batch] for f in features]
        maps = selfcheck.branch_z_maps(detector.model, chunk, stats, detector.config)
        for name, m in maps.items():
            parts.setdefault(name, []).append(m[:, ::2, ::2].contiguous())
    return {name: torch.cat(p) for name, p in parts.items()}


def combined_maps(maps: dict[str, torch.Tensor], spec: selfcheck.ScoreSpec) -> np.ndarray:
    """A candidate's maps (N, H, W) from branch z-maps, as ``selfcheck._image_scores`` combines them."""
    if spec.mode == "product":
        return maps["product"].numpy()
    total = sum(w for w in spec.weights.values() if w > 0)
    return sum((w / total) * maps[b] for b, w in spec.weights.items() if w > 0).numpy()


def window_maxima(good: np.ndarray, synthetic: np.ndarray, masks: list[np.ndarray], size: int) -> np.ndarray:
    """Window scores: the maximum of each good map's (size x size) tiles (negatives), then of each synthetic map's
    window centred on its defect (positives). good (G, H, W), synthetic (S, H, W), masks S x (H, W)."""
    h, w = good.shape[1:]
    tiles = [good[:, i : i + size, j : j + size].reshape(len(good), -1).max(1)
             for i in range(0, h - size + 1, size) for j in range(0, w - size + 1, size)]
    negatives = np.concatenate(tiles)
    positives = []
    for m, mask in zip(synthetic, masks):
        rows, cols = np.nonzero(mask)
        ci, cj = (int(rows.mean()), int(cols.mean())) if rows.size else (h // 2, w // 2)
        i = min(max(ci - size // 2, 0), h - size)
        j = min(max(cj - size // 2, 0), w - size)
        positives.append(m[i : i + size, j : j + size].max())
    return np.r_[negatives, np.asarray(positives)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", required=True, help="folder for the trained bundle and the test maps")
    parser.add_argument("--diagnostic", action="store_true", help="also print test AUROC (never chooses)")
    parser.add_argument("--synthetic-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--designs", nargs="+", default=list(DESIGNS), help="which synthetic designs to probe")
    parser.add_argument("--window", type=int, default=0,
                        help="also choose on windows (this many half-resolution map cells square): each good "
                             "image's tiles and each synthetic image's window around its defect")
    parser.add_argument("--pixel", action="store_true",
                        help="also the pixel AUROC of each combination on the synthetic defects' masks (and, with "
                             "--diagnostic on sets with masks, on the test masks)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    config = create_config("cpu", seed=args.seed)
    bset = load_set(args.set, args.seed)
    images = [img for _, img in load_images(bset.train, config.image_size).images]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    name = args.set.replace("@", "_at_") + f"_s{args.seed}"
    if (cache / name).exists():
        detector = load_bundle(name, root=cache, device="cpu")
    else:
        detector = train(images, config, device="cpu")
        save_bundle(detector, name, root=cache)
    config = detector.config
    train_idx, hold_idx = split_holdout(len(images), config)
    hold = [images[i] for i in hold_idx]
    donors = hold  # as training: cut from the held-out images (fod_app.selfcheck.make_synthetic_images)
    hold_features = extract_features(detector.backbone, hold, detector.device)
    stats, full_good_maps = selfcheck.held_out_reference(detector.model, hold_features, config)
    good_maps = {name: m[:, ::2, ::2].contiguous() for name, m in full_good_maps.items()}  # as maps_of gives them

    test_maps = labels = None
    if args.diagnostic:
        test_file = cache / f"{name}_test.safetensors"
        if test_file.exists():
            saved = load_file(test_file)
            labels = saved.pop("labels").numpy()
            test_maps = saved
        else:
            labels = np.array([t.label for t in bset.test])
            parts: dict[str, list[torch.Tensor]] = {}
            for start in range(0, len(bset.test), 32):
                chunk = [img for _, img in load_images([t.path for t in bset.test[start : start + 32]],
                                                       config.image_size).images]
                for k, m in maps_of(detector, extract_features(detector.backbone, chunk, detector.device),
                                    stats).items():
                    parts.setdefault(k, []).append(m)
            test_maps = {k: torch.cat(p) for k, p in parts.items()}
            save_file({**test_maps, "labels": torch.as_tensor(labels)}, test_file)

    per_image = selfcheck.defects_per_image(len(hold))
    results = {}
    for design in args.designs:
        opacity, kinds = DESIGNS[design]
        syn_parts: list[dict[str, torch.Tensor]] = []
        syn_masks: list[np.ndarray] = []
        for sseed in args.synthetic_seeds:
            synthetic, masks, _ = synthetic_defects(hold, donors, per_image, config.seed + 1000 * sseed, opacity,
                                                    kinds)
            syn_masks.extend(m[::2, ::2] for m in masks)  # maps_of keeps every 2nd pixel
            syn_parts.append(maps_of(detector, extract_features(detector.backbone, synthetic, detector.device),
                                     stats))
        syn_maps = {k: torch.cat([p[k] for p in syn_parts]) for k in syn_parts[0]}
        y = np.r_[np.zeros(len(hold)), np.ones(syn_maps["product"].shape[0])]

        def scores(spec, g=good_maps, s=syn_maps) -> np.ndarray:
            return np.r_[selfcheck._image_scores(g, spec), selfcheck._image_scores(s, spec)]

        def auroc(spec, y=y) -> float:
            return float(image_auroc(y, scores(spec)))

        per_branch = {b: auroc(selfcheck.ScoreSpec("standardized", {b: 1.0}, stats)) if b in stats[0] else None
                      for b in selfcheck.BRANCHES}
        specs = selfcheck.candidate_specs(config, per_branch, stats, full_good_maps)
        candidate_scores = {k: scores(spec) for k, spec in specs.items()}
        candidates = {k: float(image_auroc(y, v)) for k, v in candidate_scores.items()}
        chosen = selfcheck.choose(candidate_scores, y, config)
        row = {"per_branch": per_branch, "candidates": candidates, "chosen": chosen,
               "weights": specs[WEIGHTED].weights if (WEIGHTED := selfcheck.WEIGHTED) in specs else None}
        if args.window:
            window_scores = {k: window_maxima(combined_maps(good_maps, spec), combined_maps(syn_maps, spec),
                                              syn_masks, args.window) for k, spec in specs.items()}
            n_positive = len(syn_masks)
            y_window = np.r_[np.zeros(len(next(iter(window_scores.values()))) - n_positive), np.ones(n_positive)]
            row["window_chosen"] = selfcheck.choose(window_scores, y_window, config)
            row["window"] = {k: float(image_auroc(y_window, v)) for k, v in window_scores.items()}
        if test_maps is not None:
            row["test"] = {k: float(image_auroc(labels, selfcheck._image_scores(test_maps, spec)))
                           for k, spec in specs.items()}
        if args.pixel:  # defect pixels vs the good images' pixels and the defect images' other pixels
            pixel_masks = np.concatenate([np.zeros((len(hold), *syn_masks[0].shape), bool), np.stack(syn_masks)])
            row["pixel"] = {k: pixel_auroc(pixel_masks, np.concatenate([combined_maps(good_maps, spec),
                                                                         combined_maps(syn_maps, spec)]))
                            for k, spec in specs.items()}
            if test_maps is not None and bset.has_masks:
                half = np.stack([load_mask(t.mask_path, config.image_size)[::2, ::2] if t.label else
                                 np.zeros((config.image_size // 2,) * 2, bool) for t in bset.test])
                row["test_pixel"] = {k: pixel_auroc(half, combined_maps(test_maps, spec)) for k, spec in specs.items()}
        results[design] = row
        line = f"{args.set} s{args.seed} {design:18s} " + " ".join(
            f"{b[:4]} {v:.3f}" for b, v in per_branch.items() if v is not None)
        line += f" | chosen {chosen} sc {candidates[chosen]:.3f}"
        if test_maps is not None:
            line += (f" test {row['test'][chosen]:.3f} (nearest {row['test'].get('nearest', float('nan')):.3f},"
                     f" weighted {row['test'].get(WEIGHTED, float('nan')):.3f})")
        if args.window:
            line += f" | window chosen {row['window_chosen']} ({row['window'][row['window_chosen']]:.3f}"
            line += f", nearest {row['window'].get('nearest', float('nan')):.3f})"
            if test_maps is not None:
                line += f" test {row['test'][row['window_chosen']]:.3f}"
        print(line, "weights", row["weights"], flush=True)
        for k in row.get("pixel", {}):
            print(f"    {k:38s} self-check image {candidates[k]:.3f} pixel {row['pixel'][k]:.3f}"
                  + (f" | test image {row['test'][k]:.3f}" if "test" in row else "")
                  + (f" pixel {row['test_pixel'][k]:.3f}" if "test_pixel" in row else ""), flush=True)
    (cache / f"{name}_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
