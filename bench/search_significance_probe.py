"""How sure is the leave-one-out search choice? Positional − global AUROC and its DeLong standard error per run.

``fod_app.training.choose_search`` keeps the positional search wherever its leave-one-out self-check AUROC is higher
than the global one's, by any margin. This probe rebuilds that check for benchmark runs (the same seeded subset of
training's own split, the same synthetic defects, the same bank tokens) and prints both AUROCs, their paired
difference and its standard error (``fod_app.metrics.auroc_difference``): would the self-check's own test of
significance (``selfcheck.choose``) have kept the same choice? Label-free; no test image is read.

    python bench/search_significance_probe.py mvtec_bottle_posed@32:0 magnetic_tile@16:1 ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.datasets import load_set  # noqa: E402
from fod_app import bank_search, memory_bank, metrics, training  # noqa: E402
from fod_app.backbone import create_feature_extractor  # noqa: E402
from fod_app.config import create_config  # noqa: E402
from fod_app.data import load_images  # noqa: E402
from fod_app.model import create_model, to_tokens  # noqa: E402


@torch.inference_mode()
def run(set_name: str, seed: int) -> dict[str, float]:
    """The leave-one-out check of one (set, seed) as training makes it, with per-image scores kept."""
    config = create_config("cpu", seed=seed)
    images = [image for _, image in load_images(load_set(set_name, seed).train, config.image_size).images]
    train_idx, _ = training.split_holdout(len(images), config)
    device = torch.device("cpu")
    backbone = create_feature_extractor(config.backbone, device=device)
    features = training.extract_features(backbone, [images[i] for i in train_idx], device)
    model = create_model(config, backbone.channels, backbone.strides).to(device)
    statistics = [training.channel_statistics(f) for f in features] if config.normalize_features else None
    model.set_reference_features([to_tokens(f).mean(0) for f in features], statistics)
    index = memory_bank.candidate_rows(len(train_idx), config.seed, bank_search.MAX_CHOICE_IMAGES)
    per_image = bank_search.DEFECTS_PER_IMAGE
    defects = bank_search.defect_images([images[train_idx[i]] for i in index.tolist()], config.seed, per_image)
    good = training._bank_tokens(model, [(features, index)])
    bad = training._bank_tokens(model, [(training.extract_features(backbone, defects, device),
                                         torch.arange(len(defects)))]).unflatten(0, (len(index), per_image))
    labels, scores = bank_search.leave_one_out_scores(good, bad, model.grids[0], config.image_size,
                                                      config.smoothing_sigma)
    difference, error = metrics.auroc_difference(labels, scores["positional"], scores["global"])
    return {"global": metrics.image_auroc(labels, scores["global"]),
            "positional": metrics.image_auroc(labels, scores["positional"]),
            "difference": difference, "standard_error": error, "z": difference / error}


def main() -> None:
    torch.set_num_threads(2)
    for spec in sys.argv[1:]:
        name, seed = spec.rsplit(":", 1)
        started = time.perf_counter()
        r = run(name, int(seed))
        print(f"{name} seed {seed}: global {r['global']:.4f}  positional {r['positional']:.4f}  difference "
              f"{r['difference']:+.4f}  standard error {r['standard_error']:.4f}  z {r['z']:+.2f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
