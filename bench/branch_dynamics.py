"""How FOD's own branches change with training: per checkpoint, each branch's self-check and test image AUROC and
what its learned target width σ and correlation look like (a probe, not a product feature).

The twenty-third session saw the inter branch fade on full magnetic tile with longer training (test image AUROC
0.785 -> 0.618 from 200 to 550 steps). This probe trains FOD as ``train`` does (the ``cpu`` preset, the same
hold-out split, synthetic defects and reference), without a memory bank (the nearest distance does not depend on
training) and without early stopping, and records at every ``--every`` steps:

- ``selfcheck``: each branch's self-check AUROC (synthetic defects on held-out good images; label-free);
- ``test``: each branch's test image AUROC (the test labels only measure here);
- ``sigma``: per branch, the median learned σ (grid steps) and the share of σ values collapsed to a dot (< 0.05)
  or at the widest target (within 0.02 of 2.0), on held-out good images;
- ``self_weight``: per branch, the mean weight a token's correlation puts on its own position (the intra
  branch: on itself; the inter branch: on the reference token at its position), held-out good vs test defective
  images, and held-out good images with every position given the image's mean feature (``good_flat``: the weight
  the position alone draws, through the positional encoding);
- ``loss``: the mean loss terms of the steps since the previous checkpoint.

    .venv/bin/python bench/branch_dynamics.py --set magnetic_tile --seed 0 --steps 800 --every 100 \
        --out bench/results/branch_dynamics_mt_full_s0.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.datasets import load_set  # noqa: E402
from fod_app import selfcheck  # noqa: E402
from fod_app.backbone import create_feature_extractor  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.correlation import sigma_from_projection  # noqa: E402
from fod_app.data import load_images  # noqa: E402
from fod_app.metrics import image_auroc  # noqa: E402
from fod_app.model import create_model, to_tokens  # noqa: E402
from fod_app.scoring import ScoreSpec  # noqa: E402
from fod_app.sigma_check import COLLAPSED_BELOW, SATURATED_WITHIN, SIGMA_HIGH  # noqa: E402
from fod_app.training import _train_step, channel_statistics, extract_features, split_holdout  # noqa: E402

BRANCHES = ("reconstruction", "intra", "inter")
#: Images whose σ and correlations are summarised per checkpoint (batches of 2: the (h, L, L) maps are large).
SUMMARY_IMAGES = 16


@torch.inference_mode()
def branch_shapes(model: torch.nn.Module, features: list[torch.Tensor], sigma_high: float = SIGMA_HIGH
                  ) -> dict[str, dict[str, float]]:
    """Per branch: median σ, shares collapsed / saturated, mean weight on the own position; over all levels,
    layers, heads and tokens of the images in ``features`` (per level (N, C, H, W))."""
    was_training = model.training
    model.eval()
    sigmas: dict[str, list[np.ndarray]] = {"intra": [], "inter": []}
    self_weight: dict[str, list[float]] = {"intra": [], "inter": []}
    try:
        for start in range(0, features[0].shape[0], 2):
            outputs = model([f[start : start + 2] for f in features], True, True, False)
            for out in outputs:
                for name, states in (("intra", out.intra), ("inter", out.inter)):
                    for state in states:
                        sigmas[name].append(state.sigma.float().flatten().numpy())
                        self_weight[name].append(float(state.correlation.diagonal(dim1=-2, dim2=-1).mean()))
    finally:
        model.train(was_training)
    result = {}
    for name in sigmas:
        values = np.concatenate(sigmas[name])
        result[name] = {
            "sigma_median": float(np.median(values)),
            "collapsed": float(np.mean(values < COLLAPSED_BELOW)),
            "saturated": float(np.mean(values > sigma_high - SATURATED_WITHIN)),
            "self_weight": float(np.mean(self_weight[name])),
        }
    return result


def _widen_sigma(sigma_max: float) -> None:
    """Probe only: the model's sigma head maps to (~0, sigma_max) grid steps instead of the official (~0, 2)."""
    import fod_app.model as model_module

    model_module.sigma_from_projection = functools.partial(sigma_from_projection, sigma_max=sigma_max)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--override", action="append", default=[], help="config field=value (json value)")
    parser.add_argument("--sigma-max", type=float, default=None,
                        help="widest target sigma in grid steps (official 2.0): sigma = (m + 1)^(sigmoid(5 s)) - 1")
    parser.add_argument("--reference-without-position", action="store_true",
                        help="FODConfig.reference_position=False: the reference tokens without the position embedding")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.sigma_max is not None:
        _widen_sigma(args.sigma_max)
    sigma_high = SIGMA_HIGH if args.sigma_max is None else args.sigma_max
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.override)}
    if args.reference_without_position:
        overrides["reference_position"] = False  # what the reference looks like, not where it is
    config = create_config("cpu", seed=args.seed, patch_bank_size=0, **overrides)
    started = time.perf_counter()
    bset = load_set(args.set, args.seed)
    images = [img for _, img in load_images(bset.train, config.image_size).images]
    device = torch.device("cpu")
    train_idx, hold_idx = split_holdout(len(images), config)
    torch.manual_seed(config.seed)
    backbone = create_feature_extractor(config.backbone, device=device)
    features = extract_features(backbone, images, device)
    train_features = [f[torch.as_tensor(train_idx)] for f in features]
    hold_features = [f[torch.as_tensor(hold_idx)] for f in features]
    del features
    synthetic = selfcheck.make_synthetic_images([images[i] for i in hold_idx], config.seed)
    check_set = selfcheck.SelfCheckSet(hold_features, extract_features(backbone, synthetic, device))
    del synthetic, images
    test = bset.test
    labels = np.array([t.label for t in test])
    test_images = [img for _, img in load_images([t.path for t in test], config.image_size).images]
    test_features = extract_features(backbone, test_images, device)
    del test_images
    defect_idx = torch.as_tensor(np.flatnonzero(labels == 1)[:SUMMARY_IMAGES])
    defect_features = [f[defect_idx] for f in test_features]
    good_summary = [f[:SUMMARY_IMAGES] for f in hold_features]

    model = create_model(config, backbone.channels, backbone.strides).to(device)
    model.set_reference_features(
        [to_tokens(f).mean(0) for f in train_features],
        [channel_statistics(f) for f in train_features] if config.normalize_features else None,
    )
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    n = train_features[0].shape[0]
    records = []
    step = 0
    terms_sum: dict[str, float] = {}
    order = torch.randperm(n, generator=generator)
    position = 0
    print(f"{args.set} seed {args.seed}: {n} training, {len(hold_idx)} held-out, {len(test)} test images; "
          f"setup {time.perf_counter() - started:.0f} s", flush=True)
    while step < args.steps:
        if position >= n:
            order, position = torch.randperm(n, generator=generator), 0
        idx = order[position : position + config.batch_size]
        position += config.batch_size
        for key, value in _train_step(model, [f[idx] for f in train_features], config, optimizer, device).items():
            terms_sum[key] = terms_sum.get(key, 0.0) + value
        step += 1
        if step % args.every:
            continue
        evaluation = selfcheck.evaluate(model, check_set, config)
        statistics = evaluation.specs["reconstruction"].statistics  # the held-out good statistics it computed
        specs = {b: ScoreSpec("standardized", {b: 1.0}, statistics) for b in BRANCHES}
        scores = selfcheck.candidate_image_scores(model, test_features, specs, statistics, config)
        good_shape = branch_shapes(model, good_summary, sigma_high)
        defect_shape = branch_shapes(model, defect_features, sigma_high)
        # The same good images with every position given the image's mean feature: what weight the own position
        # still gets comes from the position alone (the positional encoding), not from what the patch looks like.
        flat_shape = branch_shapes(model, [f.mean((-2, -1), keepdim=True).expand_as(f).contiguous()
                                           for f in good_summary], sigma_high)
        record = {
            "step": step,
            "selfcheck": {b: evaluation.per_branch.get(b) for b in BRANCHES},
            "test": {b: float(image_auroc(labels, scores[b])) for b in BRANCHES},
            "sigma": {b: {k: v for k, v in good_shape[b].items() if k != "self_weight"} for b in ("intra", "inter")},
            "self_weight": {b: {"good": good_shape[b]["self_weight"], "defect": defect_shape[b]["self_weight"],
                                "good_flat": flat_shape[b]["self_weight"]} for b in ("intra", "inter")},
            "loss": {k: v / args.every for k, v in terms_sum.items()},
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        terms_sum = {}
        records.append(record)
        print(json.dumps(record), flush=True)
        Path(args.out).write_text(json.dumps({"set": args.set, "seed": args.seed, "overrides": overrides,
                                              "sigma_max": args.sigma_max,
                                              "reference_without_position": args.reference_without_position,
                                              "command": " ".join(sys.argv), "records": records}, indent=1))


if __name__ == "__main__":
    main()
