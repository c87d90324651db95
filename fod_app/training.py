"""Training: cache frozen backbone features once, fit FOD within a step budget, self-check, calibrate.

No test labels influence anything here. Good images are split into training and held-out images; the
held-out ones, with synthetic defects made on them (``fod_app.selfcheck``), decide when to stop (early stopping
on the self-check AUROC, within the step budget) and how the branches combine into the score; the threshold
comes from the held-out good images' scores.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import __version__, bank_search, familiarity, memory_bank, selfcheck
from .backbone import create_feature_extractor
from .calibration import Calibration, holdout_count
from .config import FODConfig
from .data import check_enough_images, stack_unit_float, to_unit_float
from .exposure import choose_exposure
from .ignore_regions import IgnoreRegions
from .inference import Detector, autocast_context, device_label, resolve_device
from .losses import level_loss
from .model import create_model, to_tokens


class TrainingCancelled(Exception):
    """Raised inside ``train`` when the cancel token is set; nothing is saved."""


class CancelToken:
    """Thread-safe cancel flag shared between a UI and a training worker."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class Progress:
    """A training progress report, sent to the progress callback.

    phase: 'features' | 'reference' | 'training' | 'calibration' | 'done'.
    """

    phase: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    fraction: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    message: str = ""


ProgressCallback = Callable[[Progress], None]


#: Images per batch when bank tokens are computed (the joint tokens of all images at once would be N x 1024 x 152).
BANK_BATCH = 32
#: Flips used by ``augment="flips"`` on (3, S, S) images: horizontal, vertical, both.
FLIPS = (lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, :], lambda a: a[:, ::-1, ::-1])


def split_holdout(n_images: int, config: FODConfig) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of image indices into (train, calibration hold-out)."""
    check_enough_images(n_images)  # DatasetError (a ValueError) with the user-facing message
    order = np.random.default_rng(config.seed).permutation(n_images)
    n_hold = holdout_count(n_images, config.holdout_fraction, config.min_holdout)
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


#: Seconds per optimisation step of the paper-sized model (d_model 256/512, 8 heads, 3 layers, batch 1, every
#: correlation row) on the 2-core CPU VM: 1200 steps took 2210 s (BENCHMARKS.md "Thirty-third session").
PAPER_MODEL_CPU_SECONDS_PER_STEP = 1.84


def cpu_time_warning(config: FODConfig, n_images: int, device: str = "auto") -> str | None:
    """One line for the user where the ``paper`` preset would train ``n_images`` good images on a CPU — it is
    meant for a GPU — with the time that takes on 2 cores; None for any other preset or device."""
    if config.preset != "paper" or resolve_device(device).type != "cpu":
        return None
    n_fit = n_images - holdout_count(n_images, config.holdout_fraction, config.min_holdout)
    steps = config.step_budget(n_fit)
    minutes = steps * PAPER_MODEL_CPU_SECONDS_PER_STEP / 60
    took = f"{minutes / 60:.1f} hours" if minutes >= 90 else f"{minutes:.0f} minutes"
    return (f"The paper preset is meant for a GPU: on this computer's CPU its {steps} training steps take about "
            f"{took} (2 cores). On two few-shot sets of the benchmark it was less accurate than the Standard preset "
            "(`cpu`), which takes minutes.")


@torch.inference_mode()
def extract_features(
    backbone: torch.nn.Module,
    images: list[np.ndarray],
    device: torch.device,
    batch_size: int | None = None,
    cancel: CancelToken | None = None,
    report: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Frozen backbone features for all images (``train``'s float or uint8 arrays): per level (N, C, H, W) on
    ``device``.

    Default batch: 4 on CPU (measured 18 ms/image vs 33 ms/image at batch 16 on 2 cores: large batches are
    allocator-bound there), 16 on a GPU.
    """
    batch_size = batch_size or (16 if device.type == "cuda" else 4)
    parts: list[list[torch.Tensor]] = []
    for start in range(0, len(images), batch_size):
        if cancel is not None and cancel.cancelled:
            raise TrainingCancelled()
        batch = torch.as_tensor(stack_unit_float(images[start : start + batch_size]), dtype=torch.float32,
                                device=device)
        parts.append([f.float() for f in backbone(batch)])
        if report is not None:
            report(min(start + batch_size, len(images)))
    return [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))]


def train(
    images: list[np.ndarray],
    config: FODConfig,
    *,
    device: str = "auto",
    weights: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    metadata: dict[str, Any] | None = None,
    ignore_regions: IgnoreRegions | None = None,
) -> Detector:
    """Train a FOD detector on good images and calibrate it.

    ``images``: (3, S, S) float32 arrays in [0, 1] (``data.prepare_image``) or, a quarter of the memory, uint8 ones
    (``data.prepare_image_uint8``, ``load_images(..., compact=True)``); both train the same model.

    Returns a ``Detector`` whose ``metadata`` holds timings, counts and versions for the bundle.
    Raises ``TrainingCancelled`` when ``cancel`` is set, ``ValueError`` for too few images.
    """
    started = time.perf_counter()
    report = progress or (lambda _p: None)
    dev = resolve_device(device)
    train_idx, hold_idx = split_holdout(len(images), config)
    torch.manual_seed(config.seed)

    # "auto": the good photos' own light decides (``fod_app.exposure``); the model keeps what was decided.
    exposure_choice = {"requested": config.exposure}
    if config.exposure == "auto":
        chosen, exposure_choice["lighting_spread"] = choose_exposure(images)
        config = config.with_overrides(exposure=chosen)
    exposure_choice["used"] = config.exposure
    report(Progress("features", message="Loading backbone"))
    backbone = create_feature_extractor(config.backbone, weights=weights, device=dev, exposure=config.exposure)
    n_total = len(images)
    all_features = extract_features(
        backbone,
        images,
        dev,
        cancel=cancel,
        report=lambda done: report(
            Progress(
                "features",
                step=done,
                steps=n_total,
                fraction=done / n_total,
                elapsed_s=time.perf_counter() - started,
                message=f"Backbone features {done}/{n_total}",
            )
        ),
    )
    train_sel = torch.as_tensor(train_idx, device=dev)
    train_features = [f.index_select(0, train_sel) for f in all_features]
    hold_features = [f.index_select(0, torch.as_tensor(hold_idx, device=dev)) for f in all_features]
    del all_features  # the two splits are copies: 212 MB for 762 images
    report(Progress("features", fraction=1.0, elapsed_s=time.perf_counter() - started,
                    message="Self-check: synthetic defects on the held-out good images"))
    synthetic = selfcheck.make_synthetic_images([to_unit_float(images[i]) for i in hold_idx], config.seed)
    check_set = selfcheck.SelfCheckSet(hold_features, extract_features(backbone, synthetic, dev, cancel=cancel))
    del synthetic
    t_features = time.perf_counter() - started

    report(Progress("reference", message="Reference features (per-position mean)"))
    model = create_model(config, backbone.channels, backbone.strides).to(dev)
    model.set_reference_features(
        [to_tokens(f).mean(0) for f in train_features],
        [channel_statistics(f) for f in train_features] if config.normalize_features else None,
    )
    t_bank = time.perf_counter()
    if config.patch_bank_size:
        report(Progress("reference", elapsed_s=time.perf_counter() - started,
                        message="Memory bank of good patches (nearest-good-patch branch)"))
        model.set_patch_banks(patch_banks(model, train_features, config))
    search = None
    if config.patch_bank_size and config.nearest_search != "global" and config.bank_features == "patchcore":
        report(Progress("reference", elapsed_s=time.perf_counter() - started,
                        message="Where to search the nearest good patch (leave-one-out self-check)"))
        search = choose_search(model, backbone, [images[i] for i in train_idx], train_features, config, dev, cancel)
        if search.search == "positional":
            model.set_place_banks(place_banks(model, train_features, config))
    t_bank = time.perf_counter() - t_bank

    fit_features = train_features
    if config.augment == "flips":
        report(Progress("features", fraction=1.0, elapsed_s=time.perf_counter() - started,
                        message="Backbone features of flipped training images"))
        flipped = [np.ascontiguousarray(flip(images[i])) for flip in FLIPS for i in train_idx]
        extra = extract_features(backbone, flipped, dev, cancel=cancel)
        fit_features = [torch.cat([f, e]) for f, e in zip(train_features, extra)]
        del flipped, extra
    outcome = _fit(model, fit_features, config, dev, report, cancel, started, check_set, len(train_idx))
    t_train = time.perf_counter() - started - t_features

    report(
        Progress(
            "calibration",
            fraction=1.0,
            elapsed_s=time.perf_counter() - started,
            message="Calibrating on held-out good images",
        )
    )
    detector = Detector(
        backbone, model, None, device=dev, score_spec=outcome.evaluation.spec, ignore_regions=ignore_regions
    )  # the held-out scores below, hence the threshold, already leave the ignore regions out
    # how many synthetic defects the threshold catches (shown to the user, never used to set the threshold); scored
    # before the held-out images, from which they are made, join the banks
    synthetic_scores = _image_scores(detector, check_set.synthetic).tolist()
    if config.held_out_in_bank and config.patch_bank_size:
        hold_scores = calibrate_with_held_out_in_banks(detector, train_features, hold_features, config, search)
    else:
        hold_scores = _image_scores(detector, hold_features)
    detector.calibration = Calibration.from_scores(
        hold_scores, config.threshold_quantile, origin=detector.score_spec.score_origin()
    )
    detector.calibration.synthetic_scores = synthetic_scores
    appearance = familiarity.fit_reference(  # wrong-part check: what good parts look like globally
        familiarity.descriptors(train_features), familiarity.descriptors(hold_features)
    )
    elapsed = time.perf_counter() - started
    detector.metadata = {
        **(metadata or {}),
        "training": {
            "n_images": n_total,
            "n_train": len(train_idx),
            "n_calibration": len(hold_idx),
            "n_bank_images": n_total if config.held_out_in_bank and config.patch_bank_size else len(train_idx),
            "seconds_total": round(elapsed, 2),
            "seconds_features": round(t_features, 2),
            "seconds_fit": round(t_train, 2),
            "steps": outcome.steps_run,
            "n_fit_samples": int(fit_features[0].shape[0]),  # training images plus augmented copies
            "patch_bank_rows": [int(level.patch_bank.shape[0]) for level in model.levels],
            "seconds_patch_bank": round(t_bank, 2),
            "place_bank_rows": [int(level.place_bank.shape[1]) for level in model.levels],
            "step_budget": outcome.budget,
            "device": device_label(dev),
            "fod_inspector_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "exposure": exposure_choice,
        },
        "self_check": selfcheck.record(
            outcome.evaluation, check_set, outcome.curve, outcome.best_step, outcome.steps_run, search
        ),
        "familiarity": appearance.to_dict(),
        "backbone": {
            "name": config.backbone,
            "weights_sha256": backbone.weights_sha256,
            "channels": list(backbone.channels),
            "strides": list(backbone.strides),
        },
    }
    report(Progress("done", fraction=1.0, elapsed_s=elapsed, message="Done"))
    return detector


def _image_scores(detector: Detector, features: list[torch.Tensor], batch_size: int = 8) -> np.ndarray:
    """Raw image scores (N,) of cached backbone features (per level (N, C, H, W)), scored in batches."""
    return torch.cat([
        detector.score_features([f[start : start + batch_size] for f in features]).image_score.float().cpu()
        for start in range(0, features[0].shape[0], batch_size)
    ]).numpy()


@dataclass
class FitOutcome:
    """What the optimisation loop did: steps, self-check curve, and the self-check of the kept state."""

    budget: int
    steps_run: int
    best_step: int
    curve: list[dict[str, float]]
    evaluation: selfcheck.Evaluation


def _fit(
    model: torch.nn.Module,
    features: list[torch.Tensor],
    config: FODConfig,
    device: torch.device,
    report: ProgressCallback,
    cancel: CancelToken | None,
    started: float,
    check_set: selfcheck.SelfCheckSet,
    n_images: int,
) -> FitOutcome:
    """The optimisation loop: Adam on shuffled mini-batches of cached features, ``config.step_budget`` steps.

    Every ``selfcheck_every`` steps (and at the end) the self-check scores synthetic defects; the latest state
    within the self-check's noise of the best is kept and training stops after ``patience`` checks without a gain.
    A budget of no more than ``min_steps`` cannot stop early: the self-check then runs once, at the end.
    """
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    n = features[0].shape[0]
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    total_steps = config.step_budget(n_images)  # in passes over the images, augmented copies not counted
    epochs = -(-total_steps // steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    fit_start = time.perf_counter()
    curve: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor], selfcheck.Evaluation] | None = None
    checks_without_gain = 0
    step = 0

    # Self-checks during training serve early stopping. When the budget is the floor (every set up to ~120 training
    # images with the `cpu` preset) training cannot stop early, so the model is checked once, at the end: in every
    # few-shot benchmark run the kept state was the last one anyway, and the final check still chooses the score
    # (a poorly trained FOD branch loses the paired test to the nearest branch, which does not depend on training).
    # Each check is ~4 s of a 2-minute training on 2 cores (BENCHMARKS.md "Cheaper self-checks").
    check_every = config.selfcheck_interval(total_steps)
    noise = selfcheck.tolerance(check_set.n_good)
    best_auroc = -1.0

    def check() -> bool:
        """Self-check now; returns True when training should stop early.

        Both follow the best self-check AUROC of a score of FOD's trained branches alone
        (``Evaluation.trained_auroc``), not that of the score the check would keep, which is often the
        nearest-good-patch distance that training does not change (BENCHMARKS.md "Twenty-third session"). The kept
        state is the latest one within the self-check noise of the best so far (more training wins unless an earlier
        state was clearly better); stop after ``patience`` checks without a new best.
        """
        nonlocal best, checks_without_gain, best_auroc
        evaluation = selfcheck.evaluate(model, check_set, config)
        trained = evaluation.trained_auroc
        curve.append({"step": step, "auroc": round(evaluation.auroc, 4), "trained": round(trained, 4)})
        gained = trained > best_auroc + 1e-3
        best_auroc = max(best_auroc, trained)
        checks_without_gain = 0 if gained else checks_without_gain + 1
        if best is None or trained >= best_auroc - noise:
            best = None  # the state it kept is replaced: never two copies at once
            best = (trained, step, _fitted_state(model), evaluation)
        return checks_without_gain >= config.patience

    stop = False
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, config.batch_size):
            if step >= total_steps or stop:
                break
            if cancel is not None and cancel.cancelled:
                raise TrainingCancelled()
            idx = order[start : start + config.batch_size]
            terms = _train_step(
                model,
                [f.index_select(0, idx) for f in features],
                config,
                optimizer,
                device,
            )
            step += 1
            per_step = (time.perf_counter() - fit_start) / step
            message = f"Step {step}/{total_steps}"
            if check_every and step % check_every == 0 and step < total_steps:
                stop = check() and step >= config.min_steps
                point = curve[-1]
                message += f" · self-check AUROC {point['auroc']:.3f} (FOD's own branches {point['trained']:.3f})"
            report(
                Progress(
                    "training",
                    epoch=epoch + 1,
                    epochs=epochs,
                    step=step,
                    steps=total_steps,
                    fraction=step / total_steps,
                    elapsed_s=time.perf_counter() - started,
                    eta_s=per_step * (total_steps - step),
                    losses=terms,
                    message=message + (" · stopping early" if stop else ""),
                )
            )
        if step >= total_steps or stop:
            break
    if not curve or curve[-1]["step"] != step:
        check()
    assert best is not None
    missing, unexpected = model.load_state_dict(best[2], strict=False)
    assert not unexpected and all(_is_fixed(key) for key in missing)
    model.eval()
    return FitOutcome(total_steps, step, best[1], curve, best[3])


#: Buffers that fitting never changes: the memory banks (a large set's place bank is 160 MB). The kept state leaves
#: them out: training on 762 images then peaked at 2.91 GB instead of 3.10 (BENCHMARKS.md "Nineteenth session").
FIXED_BUFFERS = ("patch_bank", "place_bank")


def _is_fixed(key: str) -> bool:
    """Whether a state-dict key (e.g. "levels.0.place_bank") names one of the ``FIXED_BUFFERS``."""
    return key.rsplit(".", 1)[-1] in FIXED_BUFFERS


def _fitted_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state without the ``FIXED_BUFFERS`` (restored with ``load_state_dict(strict=False)``)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items() if not _is_fixed(key)}


def _train_step(
    model: torch.nn.Module,
    features: list[torch.Tensor],
    config: FODConfig,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> dict[str, float]:
    """One optimisation step over all levels; returns loss terms averaged over levels.

    Backward runs per level, which frees that level's (L, L) maps before the next level's forward. With
    ``zero_grad_quirk`` (official torch-1.13 behaviour) gradients are zeroed, not freed, and Adam steps after
    every level, so each parameter gets two Adam steps per batch.
    """
    terms: dict[str, float] = {}
    quirk = config.zero_grad_quirk
    optimizer.zero_grad(set_to_none=not quirk)
    for level, feat, grid in zip(model.levels, features, model.grids):
        if quirk:
            optimizer.zero_grad(set_to_none=False)
        with autocast_context(device):
            rows = sample_rows(grid, config, device)
            output = level(to_tokens(feat), rows, config.branches.intra, config.branches.inter, False)
        loss, level_terms = level_loss(output, grid, config)
        loss.backward()
        if quirk:
            optimizer.step()
        _accumulate(terms, level_terms, len(features))
    if not quirk:
        optimizer.step()
    return terms


#: Folds of the held-out images when they join the banks (``calibrate_with_held_out_in_banks``): each fold is scored
#: against banks with the other folds' images, so 1/2 of them are missing where a new image meets all of them.
HELD_OUT_FOLDS = 2


@torch.inference_mode()
def calibrate_with_held_out_in_banks(detector: Detector, train_features: list[torch.Tensor],
                                     hold_features: list[torch.Tensor], config: FODConfig,
                                     search: bank_search.SearchChoice | None) -> np.ndarray:
    """Put the held-out good images into the memory banks and return their cross-fitted image scores (n_hold,).

    Until now the banks hold the training images only (the self-check and the score choice need unseen images).
    Afterwards every good image should inform the nearest-good-patch branch: with 16 images, 4 are held out, and a
    PatchCore bank of all 16 instead of 12 scored +0.008 test image AUROC on few-shot ELPV and magnetic tile
    (BENCHMARKS.md "Twenty-seventh session"). The threshold still needs scores of images the banks do not hold, so
    the held-out images are split into ``HELD_OUT_FOLDS`` folds and each fold is scored with banks of the training
    images and the other folds: a slightly conservative stand-in for a new image scored against all of them.

    Per level, the patch bank becomes the training images' bank joined with a coreset of the added images' tokens
    at the same rows per image; where that passes ``patch_bank_size`` (sets of about 80 images and more), a greedy
    coreset of the joined rows brings it back to the cap (k-center coresets compose: a coreset of the union of two
    coresets covers the union of their tokens). A greedy coreset of all tokens would cost another full build per
    fold (13 s each for bottle's 209 images on 2 cores, against a 5-minute budget); the join costs two small ones.
    The per-position bank (positional search) is rebuilt from all the images it may hold (``place_banks``: 0.4 s for
    32 images, 15 s for 762).
    """
    model = detector.model
    train_banks = [level.patch_bank for level in model.levels]
    n_hold = hold_features[0].shape[0]
    positional = search is not None and search.search == "positional"
    scores = np.empty(n_hold, dtype=np.float64)
    folds = [fold for fold in np.array_split(np.arange(n_hold), HELD_OUT_FOLDS) if len(fold)]
    for fold in folds:
        others = torch.as_tensor(np.setdiff1d(np.arange(n_hold), fold))
        _join_banks(model, train_banks, train_features, [f[others.to(f.device)] for f in hold_features], config,
                    positional)
        index = torch.as_tensor(fold)
        scores[fold] = _image_scores(detector, [f[index.to(f.device)] for f in hold_features])
    _join_banks(model, train_banks, train_features, hold_features, config, positional)
    return scores


def _join_banks(model: torch.nn.Module, train_banks: list[torch.Tensor], train_features: list[torch.Tensor],
                extra_features: list[torch.Tensor], config: FODConfig, positional: bool) -> None:
    """Set the model's banks to the training images' ``train_banks`` joined with a coreset of the
    ``extra_features`` images' tokens (rows per image as in the training bank; back to ``patch_bank_size`` by a
    coreset of the joined rows where they pass it), and, with ``positional``, its per-position banks to those of
    all the images."""
    n_train, n_extra = train_features[0].shape[0], extra_features[0].shape[0]
    extra = patch_banks(model, extra_features, config,
                        rows=[round(bank.shape[0] * n_extra / n_train) for bank in train_banks])
    joined = []
    for i, (bank, more) in enumerate(zip(train_banks, extra)):
        both = torch.cat([bank, more.to(bank.device)])
        if both.shape[0] > config.patch_bank_size:
            both = memory_bank.build_bank(both, config.patch_bank_size, config.seed + i)
        joined.append(both)
    model.set_patch_banks(joined)
    if positional:  # the old per-position banks (160 MB for 762 images) go before the new ones are built
        model.set_place_banks([level.place_bank.new_zeros((0, 0, level.place_bank.shape[-1]))
                               for level in model.levels])
        model.set_place_banks(place_banks(model, train_features, config, more=extra_features))


@torch.inference_mode()
def patch_banks(model: torch.nn.Module, features: list[torch.Tensor], config: FODConfig,
                rows: list[int] | None = None) -> list[torch.Tensor]:
    """Per level, a coreset (M, D) of the training images' bank tokens (``FODModel.bank_queries``,
    ``fod_app.memory_bank``); training images only (held-out images stay unseen, so the self-check is fair).
    M = ``rows[l]`` if given, else ``bank_size`` (``patch_bank_size``, or ``patch_bank_ratio`` of the level's
    tokens if smaller); a level without bank tokens (``bank_features`` "patchcore": all but the finest) gets an
    empty (0, D) bank.

    At most ``memory_bank.MAX_CANDIDATES`` tokens per level (a seeded random subset) are ever materialised.
    """
    n_images = features[0].shape[0]
    sizes = [grid[0] * grid[1] for grid in model.grids]  # tokens per image, per level
    keep = [memory_bank.candidate_rows(n_images * n, config.seed + i) for i, n in enumerate(sizes)]
    parts: list[list[torch.Tensor]] = [[] for _ in sizes]
    for start, queries in _bank_query_batches(model, features):  # every level at once
        for i, (tokens, n) in enumerate(zip(queries, sizes)):
            if tokens is None:  # a level without a bank (bank_features "patchcore": the finest level only)
                continue
            lo, hi = torch.searchsorted(keep[i], torch.tensor([start * n, (start + BANK_BATCH) * n]))
            parts[i].append(tokens.flatten(0, 1)[(keep[i][lo:hi] - start * n).to(tokens.device)])
    banks = []
    for i, (level, p) in enumerate(zip(model.levels, parts)):
        if not p:
            banks.append(level.patch_bank.new_zeros((0, level.patch_bank.shape[1])))
            continue
        size = bank_size(config, n_images * sizes[i]) if rows is None else rows[i]
        banks.append(memory_bank.build_bank(torch.cat(p), size, config.seed + i))
    return banks


def _bank_query_batches(model: torch.nn.Module, features: list[torch.Tensor], index: torch.Tensor | None = None
                        ) -> Iterator[tuple[int, list[torch.Tensor | None]]]:
    """(start, per-level bank tokens (B, L, D) or None) of the images ``index`` (default: all) of the per-level
    features (N, C, H, W), ``BANK_BATCH`` images at a time (``FODModel.bank_queries``)."""
    n = features[0].shape[0] if index is None else len(index)
    for start in range(0, n, BANK_BATCH):
        if index is None:
            batch = [f[start : start + BANK_BATCH] for f in features]
        else:
            rows = index[start : start + BANK_BATCH].to(features[0].device)
            batch = [f.index_select(0, rows) for f in features]
        yield start, model.bank_queries(batch)


def _bank_tokens(model: torch.nn.Module, parts: list[tuple[list[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """(n, L, D) float32 bank tokens of the finest level (``bank_features`` "patchcore") of the images ``index`` of
    each ``(features, index)`` of ``parts``, in that order (n: all the indices).

    Written batch by batch into one tensor, not concatenated at the end: one copy of the tokens (403 MB for 648
    images), not two, and no batch-sized leftovers on the heap; several feature sets, so that images of two sets
    never have to be joined into a copy of both first."""
    tokens, row = None, 0
    total = sum(len(index) for _, index in parts)
    for features, index in parts:
        for _, queries in _bank_query_batches(model, features, index):
            part = queries[0]
            if tokens is None:
                tokens = torch.empty((total, *part.shape[1:]), device=part.device)
            tokens[row : row + part.shape[0]] = part
            row += part.shape[0]
    return tokens


@torch.inference_mode()
def choose_search(model: torch.nn.Module, backbone: torch.nn.Module, train_images: list[np.ndarray],
                  features: list[torch.Tensor], config: FODConfig, device: torch.device,
                  cancel: CancelToken | None = None) -> bank_search.SearchChoice:
    """``config.nearest_search`` as a ``SearchChoice``; for "auto", chosen by the leave-one-out self-check on at most
    ``bank_search.MAX_CHOICE_IMAGES`` training images (a seeded subset) and ``bank_search.DEFECTS_PER_IMAGE``
    synthetic defects cut from each; with more than ``bank_search.MAX_POSITIONAL_IMAGES`` training images, global
    without a choice."""
    if config.nearest_search != "auto":
        return bank_search.SearchChoice(config.nearest_search)
    n = len(train_images)
    if n > bank_search.MAX_POSITIONAL_IMAGES:
        return bank_search.SearchChoice("global", reason=f"more than {bank_search.MAX_POSITIONAL_IMAGES} training "
                                        "images: the per-position bank is picked from at most that many")
    index = memory_bank.candidate_rows(n, config.seed, bank_search.MAX_CHOICE_IMAGES)  # a seeded subset above it
    per_image = bank_search.DEFECTS_PER_IMAGE
    defects = bank_search.defect_images([to_unit_float(train_images[i]) for i in index.tolist()], config.seed,
                                         per_image)
    defect_features = extract_features(backbone, defects, device, cancel=cancel)
    good = _bank_tokens(model, [(features, index)])
    bad = _bank_tokens(model, [(defect_features, torch.arange(len(defects)))]).unflatten(0, (len(index), per_image))
    auroc = bank_search.leave_one_out_auroc(good, bad, model.grids[0], config.image_size, config.smoothing_sigma)
    return bank_search.choose(auroc, len(index))


@torch.inference_mode()
def place_banks(model: torch.nn.Module, features: list[torch.Tensor], config: FODConfig,
                more: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per level, the per-position bank (L, R, D) of the bank tokens of the images of ``features`` and ``more``
    (per-level (N, C, H, W), as if joined: at most ``MAX_PLACE_IMAGES`` images, a seeded subset;
    ``memory_bank.place_bank``); levels without bank tokens get an empty (0, 0, D) one."""
    n_first = features[0].shape[0]
    n_more = 0 if more is None else more[0].shape[0]
    index = memory_bank.candidate_rows(n_first + n_more, config.seed, memory_bank.MAX_PLACE_IMAGES)
    parts = [(features, index[index < n_first])]
    if more is not None:
        parts.append((more, index[index >= n_first] - n_first))
    tokens = _bank_tokens(model, parts)
    height, width = model.grids[0]
    first = memory_bank.place_bank(tokens.reshape(len(index), height, width, -1), memory_bank.place_rows(len(index)),
                                   seed=config.seed)
    return [first] + [level.place_bank.new_zeros((0, 0, level.place_bank.shape[-1])) for level in model.levels[1:]]


def bank_size(config: FODConfig, n_tokens: int) -> int:
    """Rows of a level's bank built from ``n_tokens`` training tokens: ``patch_bank_size``, or ``patch_bank_ratio``
    (PatchCore's coreset ratio) of the tokens when that is smaller."""
    if config.patch_bank_ratio > 0:
        return min(config.patch_bank_size, max(1, int(config.patch_bank_ratio * n_tokens)))
    return config.patch_bank_size


def channel_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over images and positions: (N, C, H, W) -> two (C,)."""
    flat = features.transpose(0, 1).flatten(1)
    return flat.mean(1), flat.std(1)


def sample_rows(grid: tuple[int, int], config: FODConfig, device: torch.device) -> torch.Tensor | None:
    """Random query rows (sorted) for the correlation losses, or None for all rows."""
    n_tokens = grid[0] * grid[1]
    if config.correlation_rows <= 0 or config.correlation_rows >= n_tokens:
        return None
    return torch.randperm(n_tokens, device=device)[: config.correlation_rows].sort().values


def _accumulate(terms: dict[str, float], new: dict[str, float], n_levels: int) -> None:
    for key, value in new.items():
        terms[key] = terms.get(key, 0.0) + value / n_levels
