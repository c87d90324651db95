"""Time one label-free self-check (``selfcheck.evaluate``) and its parts on a benchmark set, `cpu` preset, 2 threads.

    python bench/selfcheck_time.py [--set magnetic_tile@32] [--seed 1] [--rounds 3] [--source DIR]

Builds what training builds before its first step (split, backbone features, synthetic defects on the held-out good
images, reference, memory bank; an untrained model: the work per check does not depend on training) and prints the
median of ``--rounds`` calls of the whole self-check and of the model's forward pass over the synthetic images,
with and without the nearest-patch search. ``--source`` imports ``fod_app`` from another checkout (e.g. a
``git worktree`` of an older commit), so that two engines can be timed by the same script on the same machine.
Time it on an idle machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.source_checkout import timing_arguments, training_images, use_source  # noqa: E402


def median_s(call, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = timing_arguments(__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    use_source(args.source)

    import torch

    from fod_app import selfcheck, training
    from fod_app.backbone import create_feature_extractor
    from fod_app.config import create_config
    from fod_app.model import create_model, to_tokens

    config = create_config("cpu", seed=args.seed)
    images = training_images(args.set, args.seed, config.image_size)
    device = torch.device("cpu")
    train_idx, hold_idx = training.split_holdout(len(images), config)
    backbone = create_feature_extractor(config.backbone, device=device)
    features = training.extract_features(backbone, images, device)
    train_features = [f[torch.as_tensor(train_idx)] for f in features]
    synthetic = selfcheck.make_synthetic_images([images[i] for i in hold_idx], args.seed)
    check_set = selfcheck.SelfCheckSet([f[torch.as_tensor(hold_idx)] for f in features],
                                       training.extract_features(backbone, synthetic, device))
    model = create_model(config, backbone.channels, backbone.strides)
    model.set_reference_features([to_tokens(f).mean(0) for f in train_features],
                                 [training.channel_statistics(f) for f in train_features])
    model.set_patch_banks(training.patch_banks(model, train_features, config))
    model.train()

    def forward(**flags) -> None:
        with torch.inference_mode():
            for start in range(0, check_set.n_synthetic, 8):
                model.eval()([f[start : start + 8] for f in check_set.synthetic], **flags)
        model.train()

    selfcheck.evaluate(model, check_set, config)  # warm-up
    whole = median_s(lambda: selfcheck.evaluate(model, check_set, config), args.rounds)
    plain = median_s(lambda: forward(with_nearest=False), args.rounds)
    nearest = median_s(lambda: forward(with_reconstruction=False), args.rounds)
    print(f"source: {args.source.resolve()}")
    print(f"{args.set} seed {args.seed}: {check_set.n_good} held-out good images, {check_set.n_synthetic} synthetic")
    print(f"self-check: {whole:.2f} s; forward over the synthetic images: {plain:.2f} s without the nearest-patch "
          f"search, {nearest:.2f} s for the search alone (medians of {args.rounds})")


if __name__ == "__main__":
    main()
