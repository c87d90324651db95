"""Does the log floor ε hide what the intra correlation knows? Per scoring ε: each branch's self-check and test AUROC,
the score the self-check would keep, and its test image / pixel AUROC (test labels only measure).

The twenty-fourth session measured that FOD's intra correlation, pushed away from its Gaussian target, keeps
~1e-7-1e-6 of its weight near the patch itself, and that defective patches keep 4-20 times more than good ones on
bottle. Inside the symmetric KL, ``log(p + ε)`` with the official ε = 1e-4 cannot see weights that small: the
divergence then measures only how concentrated the correlation is elsewhere. This probe trains FOD as ``train``
does (training keeps the official ε) and rescores the same model with smaller ε.

    .venv/bin/python bench/eps_probe.py --set magnetic_tile@16 --seed 0 --out bench/results/eps_probe_mt16_s0.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.map_probe import probe_parser, train_as_product  # noqa: E402
from fod_app import selfcheck  # noqa: E402
from fod_app.data import load_images, load_mask  # noqa: E402
from fod_app.metrics import image_auroc, pixel_auroc  # noqa: E402
from fod_app.scoring import BRANCHES, ScoreSpec  # noqa: E402
from fod_app.training import extract_features  # noqa: E402

STRIDE = 2


def main() -> None:
    parser = probe_parser(__doc__)
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-6, 1e-8, 1e-12])
    args = parser.parse_args()
    started = time.perf_counter()
    config, bset, detector, hold = train_as_product(args.set, args.seed)
    record = detector.metadata["self_check"]
    dev = torch.device("cpu")
    synthetic = selfcheck.make_synthetic_images(hold, config.seed)
    hold_features = extract_features(detector.backbone, hold, dev)
    synthetic_features = extract_features(detector.backbone, synthetic, dev)
    items = bset.test
    labels = np.array([t.label for t in items])
    size = config.image_size
    masks = None
    if bset.has_masks:
        masks = np.stack([load_mask(t.mask_path, size) if t.label else np.zeros((size, size), bool) for t in items])
    test_features = []
    for start in range(0, len(items), 16):
        loaded = load_images([t.path for t in items[start : start + 16]], size)
        test_features.append(extract_features(detector.backbone, [img for _, img in loaded.images], dev))
    check_labels = np.r_[np.zeros(len(hold)), np.ones(len(synthetic))]
    out = {"set": args.set, "seed": args.seed, "kept": record["score"]["name"], "steps_run": record["steps_run"],
           "self_check_auroc": record["auroc"], "by_eps": {}}
    for eps in args.eps:
        cfg = replace(detector.config, score_eps=eps)
        statistics, good_maps = selfcheck.held_out_reference(detector.model, hold_features, cfg)
        synthetic_maps = selfcheck.branch_z_maps(detector.model, synthetic_features, statistics, cfg)
        check_maps = {k: torch.cat([good_maps[k], synthetic_maps[k]]) for k in good_maps}
        per_branch = {b: float(image_auroc(check_labels, check_maps[b].flatten(1).max(1).values.numpy()))
                      for b in BRANCHES if b in check_maps}
        specs = selfcheck.candidate_specs(cfg, per_branch, statistics, good_maps)
        check_scores = {n: selfcheck.combined_map(check_maps, s).flatten(1).max(1).values.numpy()
                        for n, s in specs.items()}
        chosen = selfcheck.choose(check_scores, check_labels, cfg)
        parts: dict[str, list[torch.Tensor]] = {}
        for feats in test_features:
            for k, v in selfcheck.branch_z_maps(detector.model, feats, statistics, cfg).items():
                parts.setdefault(k, []).append(v)
        test_maps = {k: torch.cat(v) for k, v in parts.items()}

        def test_figures(spec: ScoreSpec, test_maps: dict[str, torch.Tensor] = test_maps) -> dict[str, float]:
            m = selfcheck.combined_map(test_maps, spec)
            entry = {"image": round(float(image_auroc(labels, m.flatten(1).max(1).values.numpy())), 4)}
            if masks is not None:
                entry["pixel"] = round(float(pixel_auroc(masks[:, ::STRIDE, ::STRIDE],
                                                         m[:, ::STRIDE, ::STRIDE].numpy())), 4)
            return entry

        out["by_eps"][str(eps)] = {
            "check_per_branch": {k: round(v, 4) for k, v in per_branch.items()},
            "check_candidates": {n: round(float(image_auroc(check_labels, s)), 4) for n, s in check_scores.items()},
            "chosen": chosen,
            "test_per_branch": {b: test_figures(ScoreSpec("standardized", {b: 1.0}, statistics))
                                for b in BRANCHES if b in test_maps},
            "test_candidates": {n: test_figures(s) for n, s in specs.items()},
        }
        e = out["by_eps"][str(eps)]
        print(f"eps {eps:g}: check {e['check_per_branch']} chosen {chosen} "
              f"test chosen {e['test_candidates'][chosen]}", flush=True)
        print("   test per branch", e["test_per_branch"], flush=True)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
