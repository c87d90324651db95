"""Probe: FOD alone on one benchmark set with another patch-bank cap (``patch_bank_size``), without the peer.

    python bench/bank_cap_probe.py --set elpv_mono --seed 2 --cap 16384

Trains the ``cpu`` preset with the cap given (and ``--set-field name=value`` overrides), scores every test image and
prints the test image AUROC, pixel AUROC where the set has masks, the false reject / miss rates at the calibrated
threshold (the figures ``bench/compare.py`` reports for FOD; with the default cap it reproduces them), the score the
self-check kept and the steps trained. Test labels only measure; nothing here chooses a setting.

    python bench/bank_cap_probe.py --set magnetic_tile --seed 2 \
        --peer-from bench/results/compare_bank_all_mt_full_s2.json --out bench/results/rerun_mt_full_s2.json

``--peer-from`` / ``--out``: write the run in ``bench/compare.py``'s format (so ``nine_sets.py`` and
``threshold_replay.py`` read it), with this FOD and the stored PatchCore of the same set, seed and test images
(the peer's code did not change; its 1 % coreset on full magnetic tile alone takes 22 minutes). The FOD record has
what those scripts read (metrics, threshold, per-image scores, held-out scores); not the candidate scores.
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
    parser.add_argument("--set-field", nargs="*", default=[], metavar="NAME=VALUE",
                        help="cpu-preset field overrides, e.g. score_eps=1e-4 or exposure=even")
    parser.add_argument("--peer-from", type=Path, help="stored bench/compare.py run of the same set and seed")
    parser.add_argument("--out", type=Path, help="with --peer-from: write the run here (compare.py's format)")
    args = parser.parse_args()
    if (args.peer_from is None) != (args.out is None):
        parser.error("--peer-from and --out go together")

    import numpy as np
    import torch

    from bench.compare import threshold_rates
    from bench.datasets import load_set
    from fod_app.config import create_config
    from fod_app.data import load_images, load_mask
    from fod_app.metrics import image_auroc, pixel_auroc
    from fod_app.training import train

    def parsed(text: str) -> object:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text  # a name, e.g. exposure=even

    torch.set_num_threads(2)
    overrides = {k: parsed(v) for k, v in (item.split("=", 1) for item in args.set_field)}
    config = create_config("cpu", seed=args.seed, patch_bank_size=args.cap, **overrides)
    bset = load_set(args.set, args.seed)
    images = [image for _, image in load_images(bset.train, config.image_size, compact=True).images]
    started = time.perf_counter()
    detector = train(images, config, device="cpu")
    seconds = time.perf_counter() - started
    scores: list[float] = []
    maps: list[np.ndarray] = []
    size = config.image_size
    for start in range(0, len(bset.test), 32):
        chunk = load_images([item.path for item in bset.test[start : start + 32]], size).images
        out = detector.score_batch(detector.to_batch([image for _, image in chunk]))
        scores += out.image_score.float().cpu().tolist()
        if bset.has_masks:
            maps.append(out.anomaly_map.float().cpu().numpy())
    labels, values = np.array([item.label for item in bset.test]), np.array(scores)
    rates = threshold_rates(labels, values, detector.calibration.threshold)
    pixel, masks, all_maps = "", None, None
    if bset.has_masks:
        masks = np.stack([load_mask(t.mask_path, size) if t.label else np.zeros((size, size), bool) for t in bset.test])
        all_maps = np.concatenate(maps)
        pixel = f", pixel AUROC {pixel_auroc(masks, all_maps):.4f}"
    check = detector.metadata["self_check"]
    print(f"{args.set} seed {args.seed}, cap {args.cap} {overrides}: train {seconds:.0f} s, "
          f"bank rows {detector.metadata['training']['patch_bank_rows']}, kept {check['score']['name']} after "
          f"{check['best_step']} of {check['steps_run']} steps, self-check {check['auroc']:.4f} "
          f"{check['per_branch']}, image AUROC {image_auroc(labels, values):.4f}{pixel}, "
          f"FRR test good {rates['frr_test_good']:.4f}, miss {rates['miss_rate']:.4f}")
    if args.peer_from is not None:
        write_run(args, bset, detector, labels, values, masks, all_maps, seconds, overrides)


def write_run(args: argparse.Namespace, bset: object, detector: object, labels: object, scores: object,
              masks: object, maps: object, seconds: float, overrides: dict) -> None:
    """``args.out``: the stored run of ``args.peer_from`` with its ``fod`` record replaced by this run's."""
    import json

    from bench.compare import _clean as clean
    from bench.compare import method_record, test_image_names

    stored = [run for run in json.loads(args.peer_from.read_text())
              if run["set"] == args.set and run["seed"] == args.seed]
    if len(stored) != 1:
        raise SystemExit(f"{args.peer_from} holds {len(stored)} runs of {args.set} seed {args.seed}, not one")
    run = stored[0]
    if test_image_names(bset.test) != run["test_images"]:
        raise SystemExit("the stored run scored other test images")
    run["fod"] = {
        **method_record(labels, scores, masks, maps, [t.defect_type for t in bset.test],
                        detector.calibration.threshold),
        "train_s": seconds, "self_check": detector.metadata.get("self_check"),
        "holdout_scores_raw": detector.calibration.good_scores,
        "synthetic_scores_raw": detector.calibration.synthetic_scores,
        "synthetic_catch": detector.calibration.synthetic_catch_rate(),
        "score_origin": detector.calibration.origin,
        "rerun_of": str(args.peer_from), "overrides": overrides,
    }
    run["command"] = "bench/bank_cap_probe.py " + " ".join(sys.argv[1:])
    args.out.write_text(json.dumps(clean([run]), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
