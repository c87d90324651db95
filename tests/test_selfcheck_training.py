"""Training within a step budget, early stopping on the label-free self-check, and its record in the bundle.

Real images: the bundled solar cells (sample_data/train_good) and the session's trained test model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fod_app import metrics, selfcheck, training
from fod_app.bundle import BundleError, load_bundle, read_metadata
from fod_app.config import create_config
from fod_app.data import list_images, load_images
from fod_app.metrics import image_auroc

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cells() -> list[np.ndarray]:
    paths = list_images(REPO / "sample_data" / "train_good")[:16]
    return [image for _, image in load_images(paths, 256).images]


def test_step_budget_is_honoured_and_the_self_check_curve_recorded(cells):
    config = create_config("quick", max_steps=4, selfcheck_every=2, patience=10)
    steps_seen = []

    def progress(p):
        if p.phase == "training":
            steps_seen.append(p.step)

    detector = training.train(cells, config, device="cpu", progress=progress)
    meta = detector.metadata
    assert meta["training"]["steps"] == 4 == meta["training"]["step_budget"]
    assert max(steps_seen) == 4
    record = meta["self_check"]
    assert [point["step"] for point in record["curve"]] == [2, 4]
    # the self-check uses exactly the held-out good images, with 3 synthetic defects on each
    assert record["n_good"] == meta["training"]["n_calibration"]
    assert record["n_synthetic"] == selfcheck.defects_per_image(record["n_good"]) * record["n_good"] == 40
    assert 0.0 <= record["auroc"] <= 1.0
    assert set(record["per_branch"]) == {"reconstruction", "intra", "inter", "nearest", "combined"}
    assert record["score"]["name"] in record["candidates"]
    assert detector.score_spec.mode == record["score"]["mode"]


def test_a_budget_at_the_step_floor_is_self_checked_once_at_the_end(cells):
    """Training cannot stop before ``min_steps``; when the budget is that floor, the self-checks during training
    could only roll back, and they are skipped: one check, after the last step, chooses the score."""
    config = create_config("quick", epochs=1, min_steps=4, max_steps=0, selfcheck_every=1, patience=10)
    meta = training.train(cells, config, device="cpu").metadata
    assert meta["training"]["step_budget"] == 4 == meta["training"]["steps"]
    assert [point["step"] for point in meta["self_check"]["curve"]] == [4]
    assert meta["self_check"]["best_step"] == 4


def _constant_evaluation(auroc: float) -> selfcheck.Evaluation:
    from fod_app.scoring import ScoreSpec

    return selfcheck.Evaluation({"product": auroc}, {"product": ScoreSpec()}, "product", {"combined": auroc})


def test_early_stopping_after_patience_checks_without_gain_but_not_before_min_steps(cells, monkeypatch):
    monkeypatch.setattr(selfcheck, "evaluate", lambda model, data, config: _constant_evaluation(0.9))
    config = create_config("quick", max_steps=40, selfcheck_every=1, patience=2, min_steps=0)
    meta = training.train(cells, config, device="cpu").metadata
    # check 1 sets the best, checks 2 and 3 do not improve it -> stop at step 3; a tie keeps the later state
    assert meta["training"]["steps"] == 3
    assert meta["self_check"]["best_step"] == 3
    config = create_config("quick", max_steps=40, selfcheck_every=1, patience=2, min_steps=6)
    assert training.train(cells, config, device="cpu").metadata["training"]["steps"] == 6


def _nearest_kept(nearest: float, reconstruction: float, statistics: list | None = None) -> selfcheck.Evaluation:
    """A check that keeps the nearest-good-patch distance (which training does not change) while the
    reconstruction error, a trained branch, separates ``reconstruction``; ``statistics``: the branches' good-token
    statistics, which the kept score needs for calibration."""
    from fod_app.scoring import ScoreSpec

    specs = {"nearest": ScoreSpec("standardized", {"reconstruction": 0.0, "nearest": 1.0}, statistics or []),
             "reconstruction": ScoreSpec("standardized", {"reconstruction": 1.0, "nearest": 0.0}, statistics or [])}
    return selfcheck.Evaluation({"nearest": nearest, "reconstruction": reconstruction}, specs, "nearest",
                                {"reconstruction": reconstruction, "nearest": nearest, "combined": nearest})


def test_early_stopping_follows_the_trained_branches_not_a_flat_nearest_distance(cells, monkeypatch):
    """The score kept is the nearest distance, flat at 0.95; the reconstruction error rises until check 5, then
    falls beyond the self-check's noise. Training runs on while it rises (it used to stop at check 3: patience 2
    without a gain of the flat curve), keeps the state of its best check, and records both curves."""
    values = iter([0.60, 0.66, 0.72, 0.78, 0.90, 0.70, 0.65, 0.60, 0.55, 0.50])
    real_evaluate = selfcheck.evaluate
    statistics: list = []  # the good-token statistics the calibration after training needs, from one real check

    def fake(model, data, config):
        if not statistics:
            statistics.extend(real_evaluate(model, data, config).spec.statistics)
        return _nearest_kept(0.95, next(values), statistics)

    monkeypatch.setattr(selfcheck, "evaluate", fake)
    config = create_config("quick", epochs=100, max_steps=10, selfcheck_every=1, patience=2, min_steps=0)
    record = training.train(cells, config, device="cpu").metadata["self_check"]
    assert record["steps_run"] == 7, "two checks without a gain of the trained branches after check 5"
    assert record["best_step"] == 5
    assert [p["auroc"] for p in record["curve"]] == [0.95] * 7
    assert [p["trained"] for p in record["curve"]] == [0.60, 0.66, 0.72, 0.78, 0.90, 0.70, 0.65]
    assert record["score"]["name"] == "nearest" and record["auroc"] == 0.95


def test_which_scores_are_the_trained_branches_alone():
    from fod_app.scoring import ScoreSpec

    assert ScoreSpec("product").trained_only
    assert ScoreSpec("standardized", {"intra": 1.0, "nearest": 0.0}).trained_only
    assert ScoreSpec("standardized", {"reconstruction": 0.5, "intra": 0.3, "inter": 0.2}).trained_only
    # the nearest distance mixed in dominates the combination's self-check: not followed
    assert not ScoreSpec("standardized", {"reconstruction": 0.2, "nearest": 0.8}).trained_only
    assert not ScoreSpec("standardized", {"reconstruction": 0.0, "intra": 0.0, "nearest": 1.0}).trained_only
    evaluation = _nearest_kept(0.97, 0.91)
    assert evaluation.auroc == 0.97 and evaluation.trained_auroc == 0.91


def test_best_self_check_state_is_restored(cells, monkeypatch):
    """The kept weights are those of the best check, not the last step."""
    values = iter([0.7, 0.95, 0.8, 0.75, 0.74])
    snapshots = {}

    def fake(model, data, config):
        auroc = next(values)
        snapshots[auroc] = {k: v.clone() for k, v in model.state_dict().items()}
        return _constant_evaluation(auroc)

    monkeypatch.setattr(selfcheck, "evaluate", fake)
    config = create_config("quick", max_steps=5, selfcheck_every=1, patience=10)
    detector = training.train(cells, config, device="cpu")
    assert detector.metadata["self_check"]["best_step"] == 2
    kept = detector.model.state_dict()
    best = snapshots[0.95]
    # the memory banks change after training on purpose: the held-out images join them (held_out_in_bank)
    banks = {k for k in best if k.endswith(("patch_bank", "place_bank"))}
    assert banks and all(kept[k].shape[0] >= best[k].shape[0] for k in banks)
    assert all(np.array_equal(kept[k].cpu().numpy(), v.cpu().numpy()) for k, v in best.items() if k not in banks)
    assert not all(np.array_equal(kept[k].cpu().numpy(), v.cpu().numpy())
                   for k, v in snapshots[0.74].items() if k not in banks), "the last step's weights were kept"


def test_trained_model_separates_synthetic_defects_and_saves_its_score(trained_models_dir):
    """The session's real model (solar cells): the self-check is recorded, meaningful, and the score spec
    that it chose is what the loaded detector uses."""
    meta = read_metadata("test-model", root=trained_models_dir)
    record = meta["self_check"]
    assert record["auroc"] >= 0.7, record
    detector = load_bundle("test-model", root=trained_models_dir, device="cpu")
    assert detector.score_spec.to_dict() == meta["score"]
    assert record["score"]["mode"] == meta["score"]["mode"]
    # the final model's scores of the same synthetic defects are kept beside the held-out good scores: ranked
    # against them they give the self-check's AUROC again, and the share above the threshold is what the user sees
    calibration = detector.calibration
    assert len(calibration.synthetic_scores) == record["n_synthetic"]
    assert len(calibration.good_scores) == record["n_good"]
    labels = np.r_[np.zeros(record["n_good"]), np.ones(record["n_synthetic"])]
    again = image_auroc(labels, np.r_[calibration.good_scores, calibration.synthetic_scores])
    assert again == pytest.approx(record["auroc"], abs=1e-3)
    caught = np.mean(np.asarray(calibration.synthetic_scores) >= calibration.threshold)
    assert calibration.synthetic_catch_rate() == pytest.approx(caught)


def test_tampered_score_record_is_refused(models_env_copy):
    path = models_env_copy / "test-model" / "bundle.json"
    meta = json.loads(path.read_text())
    meta["score"] = {"mode": "standardized", "weights": {"reconstruction": 1.0}, "statistics": [{}]}
    path.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="invalid settings"):
        read_metadata("test-model", root=models_env_copy)


def test_flip_augmentation_adds_three_flipped_copies_of_each_training_image(cells):
    plain = training.train(cells, create_config("quick", max_steps=1), device="cpu").metadata["training"]
    flipped = training.train(cells, create_config("quick", max_steps=1, augment="flips"), device="cpu")
    meta = flipped.metadata["training"]
    assert plain["n_fit_samples"] == plain["n_train"]
    assert meta["n_fit_samples"] == 4 * meta["n_train"]
    assert meta["steps"] == plain["steps"] == 1  # the budget counts passes over the images, not the copies


def test_the_self_check_never_reads_test_images_or_labels(tmp_path, monkeypatch):
    """Training from a real MVTec-layout category: the test folder's images and masks are never opened, and
    replacing every test image and mask with garbage changes nothing in the self-check or the score."""
    from fod_app import data
    from fod_app.data import resolve_training_images

    category = tmp_path / "cells"
    (category / "train" / "good").mkdir(parents=True)
    for source in list_images(REPO / "sample_data" / "train_good")[:12]:
        (category / "train" / "good" / source.name).write_bytes(source.read_bytes())
    for folder in ("test/good", "test/crack", "ground_truth/crack"):
        (category / folder).mkdir(parents=True)
    for index, source in enumerate(list_images(REPO / "sample_data" / "inspect")[:4]):
        (category / "test" / "crack" / f"{index:03d}.png").write_bytes(source.read_bytes())
        (category / "ground_truth" / "crack" / f"{index:03d}_mask.png").write_bytes(source.read_bytes())
    opened: list[str] = []
    real_load_image = data.load_image

    def spy(source, name=None):
        opened.append(str(source))
        return real_load_image(source, name)

    monkeypatch.setattr(data, "load_image", spy)
    monkeypatch.setattr(data, "load_mask", lambda *a, **k: pytest.fail("a mask was read during training"))
    config = create_config("quick", max_steps=2)

    def run() -> dict:
        images = [image for _, image in load_images(resolve_training_images(category), 256).images]
        return training.train(images, config, device="cpu").metadata

    first = run()
    assert opened and all("/train/good/" in path for path in opened)
    for path in (category / "test").rglob("*.png"):
        path.write_bytes(b"not an image")
    for path in (category / "ground_truth").rglob("*.png"):
        path.write_bytes(b"not a mask")
    second = run()
    assert first["self_check"] == second["self_check"]


def test_separation_weights_follow_each_branch_and_ignore_chance():
    """A branch at or below chance gets no weight, a stronger branch more than a weaker one, a perfect one a finite
    weight; the weights sum to 1 (what the ``weighted`` candidate uses)."""
    weights = selfcheck.separation_weights(
        {"reconstruction": 0.9, "intra": 0.5, "inter": 0.45, "nearest": 1.0, "combined": 0.99}
    )
    assert set(weights) == {"reconstruction", "nearest"}  # chance-level branches and "combined" are out
    assert weights["nearest"] > weights["reconstruction"] > 0
    assert sum(weights.values()) == pytest.approx(1.0, abs=2e-3)
    assert selfcheck.separation_weights({"reconstruction": 0.5, "intra": None}) == {}


def test_separation_weights_do_not_count_two_branches_that_see_the_same_thing_twice():
    """With the branches' good-pixel maps, the weights are Fisher's (correlation-aware, non-negative): when the
    reconstruction error is nearly a copy of the nearest-patch distance but separates less, it gets (almost) no
    weight, while an independent branch keeps its share."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 64, 64, generator=generator)
    maps = {
        "reconstruction": shared + 0.05 * torch.randn(6, 64, 64, generator=generator),
        "nearest": shared,
        "inter": torch.randn(6, 64, 64, generator=generator),
    }
    per_branch = {"reconstruction": 0.9, "inter": 0.8, "nearest": 0.95}
    independent = selfcheck.separation_weights(per_branch)
    correlated = selfcheck.separation_weights(per_branch, maps)
    assert independent["reconstruction"] > 0.25  # d'-proportional: a full share for the copy
    assert correlated.get("reconstruction", 0.0) < 0.05
    assert correlated["nearest"] > 0.4 and correlated["inter"] > 0.2
    assert sum(correlated.values()) == pytest.approx(1.0, abs=2e-3)


def _self_check_scores(n_good: int, n_synthetic: int, shifts: dict[str, float], seed: int,
                       order: list[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels (good 0, synthetic 1) and image scores per candidate: unit noise, synthetic defects shifted by
    ``shifts[name]`` (drawn in that order); returned in ``order`` (the candidates' preference order), others 0."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good), np.ones(n_synthetic)]
    drawn = {name: rng.normal(0, 1, labels.size) + shift * labels for name, shift in shifts.items()}
    return labels, {name: drawn.get(name, rng.normal(0, 1, labels.size)) for name in order or drawn}


def test_auroc_difference_is_delongs_paired_test():
    labels, scores = _self_check_scores(40, 40, {"a": 1.8, "b": 1.0}, seed=0)
    difference, error = metrics.auroc_difference(labels, scores["a"], scores["b"])
    assert difference == pytest.approx(
        metrics.image_auroc(labels, scores["a"]) - metrics.image_auroc(labels, scores["b"]))
    rng = np.random.default_rng(1)  # the standard error agrees with a bootstrap over goods and defects
    good, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    boot = []
    for _ in range(1000):
        i = np.r_[rng.choice(good, good.size), rng.choice(bad, bad.size)]
        boot.append(metrics.image_auroc(labels[i], scores["a"][i]) - metrics.image_auroc(labels[i], scores["b"][i]))
    assert error == pytest.approx(np.std(boot), rel=0.15)
    assert metrics.auroc_difference(labels, scores["a"], scores["a"]) == (0.0, 0.0)


def test_holm_step_down_rejects_in_order_of_p_values():
    assert selfcheck.holm({"a": 0.01, "b": 0.04}) == ["a", "b"]  # 0.01 < 0.05 / 2, then 0.04 < 0.05 / 1
    assert selfcheck.holm({"a": 0.03, "b": 0.04}) == []  # 0.03 is not below 0.05 / 2: it stops there
    assert selfcheck.holm({"a": 0.049}) == ["a"]  # one hypothesis: the plain test at 5 %
    assert selfcheck.one_sided_p(0.1, 0.0) == 0.0 and selfcheck.one_sided_p(float("nan"), float("nan")) == 1.0
    assert selfcheck.one_sided_p(1.645, 1.0) == pytest.approx(0.05, abs=1e-4)


def test_auto_score_switches_on_noise_at_most_at_the_significance_level():
    """Every candidate exactly as good as the nearest branch (the null hypothesis): each of the ~16 candidates tested
    alone at 5 % (the rule until 2026-12-03) switched away from the nearest branch in a quarter of the trials;
    with Holm's correction the family-wise rate stays at the 5 % level."""
    config = create_config("cpu")
    names = [selfcheck.WEIGHTED, *selfcheck.candidate_weights(config), "product"]
    trials, switched, uncorrected = 200, 0, 0
    for seed in range(trials):
        labels, scores = _self_check_scores(20, 40, dict.fromkeys(names, 1.0), seed=seed, order=names)
        switched += selfcheck.choose(scores, labels, config) != "nearest"
        uncorrected += any(
            selfcheck.one_sided_p(*metrics.auroc_difference(labels, scores[name], scores["nearest"])) < 0.05
            for name in names if name != "nearest")
    assert len(names) - 1 >= 15
    assert uncorrected / trials > 0.2  # 54 of 200
    # 5 of 200: the level, within two binomial standard errors
    assert switched / trials <= 0.05 + 2 * (0.05 * 0.95 / trials) ** 0.5


def test_auto_score_keeps_the_nearest_branch_unless_another_is_clearly_better():
    config = create_config("cpu")
    names = [selfcheck.WEIGHTED, *selfcheck.candidate_weights(config), "product"]
    # 4 held-out good images (a 16-image set): reconstruction looks better by 0.09 AUROC, within the noise
    labels, scores = _self_check_scores(4, 40, {"nearest": 1.5, "reconstruction": 2.2}, seed=3, order=names)
    assert metrics.image_auroc(labels, scores["reconstruction"]) > metrics.image_auroc(labels, scores["nearest"]) + 0.08
    assert selfcheck.choose(scores, labels, config) == "nearest"
    # 60 held-out good images: the same gap in separation is clear, and the best clearly better candidate wins
    labels, scores = _self_check_scores(60, 60, {"nearest": 1.0, "reconstruction": 2.2, selfcheck.WEIGHTED: 2.0},
                                        seed=0, order=names)
    assert selfcheck.choose(scores, labels, config) == "reconstruction"
    # without a memory bank the best single branch is the fallback
    no_bank = create_config("cpu", patch_bank_size=0)
    no_bank_scores = {k: v for k, v in scores.items() if "nearest" not in k}
    no_bank_scores["intra"] = no_bank_scores["reconstruction"] + 0.5 * labels  # the best single branch
    assert selfcheck.choose(no_bank_scores, labels, no_bank) == "intra"
    all_branches = next(iter(selfcheck.candidate_weights(config)))
    assert selfcheck.choose(scores, labels, create_config("cpu", score_mode="standardized")) == all_branches
    assert selfcheck.choose(scores, labels, create_config("cpu", score_mode="product")) == "product"
