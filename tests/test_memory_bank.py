"""The nearest-good-patch branch (``fod_app.memory_bank``; not part of FOD): exact distances, a covering coreset,
the bank stored with the model, and the branch's score direction on real defects.

Real images: the bundled solar cells (sample_data) and the session's trained test model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fod_app import memory_bank
from fod_app.backbone import create_feature_extractor
from fod_app.bundle import METADATA_FILE, WEIGHTS_FILE, BundleError, load_bundle
from fod_app.data import list_images, load_images
from fod_app.metrics import image_auroc
from fod_app.model import to_tokens

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cell_tokens() -> list[torch.Tensor]:
    """Stride-8 backbone tokens of six real training cells: six (1024, 40) tensors."""
    paths = list_images(REPO / "sample_data" / "train_good")[:6]
    images = np.stack([image for _, image in load_images(paths, 256).images])
    backbone = create_feature_extractor("tf_efficientnet_lite0", device="cpu")
    with torch.inference_mode():
        level0 = backbone(torch.as_tensor(images))[0].float()
    return list(to_tokens(level0))


def test_nearest_distance_equals_brute_force_and_is_zero_on_bank_rows(cell_tokens):
    bank = memory_bank.build_bank(torch.cat(cell_tokens[:5]), 700, seed=1)
    assert bank.shape == (700, cell_tokens[0].shape[1])
    queries = cell_tokens[5].unsqueeze(0)  # (1, 1024, C): an image the bank has not seen
    expected = torch.cdist(queries[0].double(), bank.double()).amin(1).float()
    torch.testing.assert_close(memory_bank.nearest_distance(queries, bank, chunk=128)[0], expected,
                               rtol=1e-3, atol=1e-3)
    # its own rows are at distance ~0 (float rounding of |q|^2 - 2 q.b + |b|^2), far below an unseen image's
    assert memory_bank.nearest_distance(bank[:50], bank).max() < 0.02 * expected.median()


def test_greedy_coreset_covers_the_tokens_better_than_a_random_subset(cell_tokens):
    tokens = torch.cat(cell_tokens)
    coreset = memory_bank.build_bank(tokens, 300, seed=0)
    random_subset = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))[:300]]
    radius_coreset = memory_bank.nearest_distance(tokens, coreset).max()
    radius_random = memory_bank.nearest_distance(tokens, random_subset).max()
    assert radius_coreset < 0.8 * radius_random  # k-center: the farthest token is much closer
    # fewer tokens than the bank size: all are kept
    assert memory_bank.build_bank(tokens[:100], 300).shape[0] == 100


def test_training_banks_pick_from_the_same_seeded_candidates_as_build_bank(cell_tokens, monkeypatch):
    """Above the candidate cap, training (which gathers the tokens batch by batch) and ``build_bank`` (given all
    tokens at once) draw the same seeded subset (``candidate_rows``): the same bank either way."""
    from fod_app.config import create_config
    from fod_app.model import create_model
    from fod_app.training import patch_banks

    monkeypatch.setattr(memory_bank, "MAX_CANDIDATES", 3000)  # 6 images x 1024 stride-8 tokens > 3000
    rows = memory_bank.candidate_rows(6144, seed=5, max_candidates=3000)
    assert len(rows) == 3000 == len(set(rows.tolist())) and torch.equal(rows, rows.sort().values)
    assert torch.equal(rows, memory_bank.candidate_rows(6144, seed=5, max_candidates=3000))  # seeded
    assert torch.equal(memory_bank.candidate_rows(100, seed=5, max_candidates=3000), torch.arange(100))

    c8 = cell_tokens[0].shape[1]
    config = create_config("cpu", bank_features="level", normalize_features=False, patch_bank_size=500, seed=7)
    model = create_model(config, [c8, 4], [8, 16])  # a dummy second level: only level 0 is compared
    features = [torch.stack(cell_tokens).transpose(1, 2).reshape(6, c8, 32, 32), torch.zeros(6, 4, 16, 16)]
    in_training = patch_banks(model, features, config)[0]
    direct = memory_bank.build_bank(torch.cat(cell_tokens), 500, seed=7, max_candidates=3000)
    torch.testing.assert_close(in_training, direct)


def test_trained_model_keeps_patchcores_bank_and_the_branch_points_at_real_defects(models_env: Path):
    detector = load_bundle("test-model", root=models_env, device="cpu")
    training = detector.metadata["training"]
    rows = [int(level.patch_bank.shape[0]) for level in detector.model.levels]
    assert rows == training["patch_bank_rows"]
    # bank_features "patchcore": PatchCore's bank, on the finest level only, 10 % of the training tokens (at most
    # 8192), then the held-out images' tokens joined at the same rows per image (held_out_in_bank)
    n_tokens = training["n_train"] * detector.model.grids[0][0] * detector.model.grids[0][1]
    train_rows = min(detector.config.patch_bank_size, int(0.1 * n_tokens))
    held_out_rows = round(train_rows * training["n_calibration"] / training["n_train"])
    assert held_out_rows > 0 and training["n_bank_images"] == training["n_images"]
    assert rows[0] == train_rows + held_out_rows and rows[1:] == [0]
    assert detector.metadata["self_check"]["per_branch"]["nearest"] is not None
    named = load_images(list_images(REPO / "sample_data" / "inspect"), 256).images
    labels = np.array([name.startswith("defect") for name, _ in named], dtype=int)
    batch = detector.to_batch([image for _, image in named])
    maps = detector.score_batch(batch, with_branches=True)
    nearest = maps.branch_image_scores["nearest"].numpy()
    # larger distance to the nearest good patch = more anomalous: real cracked cells score higher than good ones
    assert image_auroc(labels, nearest) >= 0.8
    assert image_auroc(labels, -nearest) <= 0.2


def test_held_out_images_join_the_bank_only_after_their_scores_set_the_threshold(models_env: Path):
    """``held_out_in_bank``: the threshold comes from held-out scores against banks without those images (two folds,
    each scored with the other's images in the bank), and the final bank holds them. So every held-out cell now
    scores below the score that calibrated the threshold, and those scores look like unseen good cells' scores."""
    from fod_app.training import split_holdout

    detector = load_bundle("test-model", root=models_env, device="cpu")
    assert detector.config.held_out_in_bank
    images = [image for _, image in load_images(list_images(REPO / "sample_data" / "train_good"), 256).images]
    _, hold_idx = split_holdout(len(images), detector.config)
    calibration = np.asarray(detector.calibration.good_scores)
    now = detector.raw_scores([images[i] for i in hold_idx])
    assert len(calibration) == len(hold_idx) >= 4
    # their own patches are in the bank now; they were not when they were scored (the calibration keeps its scores
    # sorted, so the two are compared as sorted lists: lower one by one implies lower in sorted order)
    assert np.all(np.sort(now) < np.sort(calibration))
    named = load_images(list_images(REPO / "sample_data" / "inspect"), 256).images
    unseen_good = detector.raw_scores([image for name, image in named if name.startswith("good")])
    assert 0.5 < np.median(calibration) / np.median(unseen_good) < 2.0


def _rewrite_weights(folder: Path, change) -> None:
    """Edit a bundle's tensors and record the new size and checksum (as a careless tool, not an attacker, would)."""
    import hashlib
    import json

    tensors = load_file(str(folder / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    payload = (folder / WEIGHTS_FILE).read_bytes()
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta["weights"].update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    return meta


def test_a_bundle_without_a_bank_loads_but_a_score_that_needs_it_is_refused(models_env_copy: Path):
    import json

    folder = models_env_copy / "test-model"
    meta = _rewrite_weights(folder, lambda t: [t.pop(k) for k in [k for k in t if k.endswith("patch_bank")]])
    weights = meta["score"]["weights"]
    if weights.get("nearest", 0) > 0:
        with pytest.raises(BundleError, match="nearest"):
            load_bundle("test-model", root=models_env_copy, device="cpu")
    # a bundle from before the bank: no bank tensors, a score of FOD's own branches -> loads, empty banks
    meta["score"].update(mode="standardized", weights={"reconstruction": 1.0})
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    detector = load_bundle("test-model", root=models_env_copy, device="cpu")
    assert [level.patch_bank.shape[0] for level in detector.model.levels] == [0, 0]
    image = load_images(list_images(REPO / "sample_data" / "inspect")[:1], 256).images[0][1]
    assert np.isfinite(detector.raw_scores([image])).all()


def test_a_bank_larger_than_the_config_allows_is_refused(models_env_copy: Path):
    folder = models_env_copy / "test-model"

    def grow(tensors):
        tensors["levels.0.patch_bank"] = tensors["levels.0.patch_bank"][:1].repeat(8193, 1)  # config: 8192

    _rewrite_weights(folder, grow)
    with pytest.raises(BundleError, match="patch bank is larger"):
        load_bundle("test-model", root=models_env_copy, device="cpu")


def test_joint_bank_tokens_are_patchcores_multiscale_feature_and_level_tokens_stay_per_level():
    """``bank_features`` "joint": on the stride-8 grid a bank token is the standardised stride-8 feature next to the
    bilinearly upsampled standardised stride-16 feature (PatchCore's patch feature); on the stride-16 grid the
    stride-8 map is 2x2 average-pooled. "level" (models saved before the switch): the level's own tokens."""
    from torch.nn import functional as F

    from fod_app.config import create_config
    from fod_app.model import create_model

    paths = list_images(REPO / "sample_data" / "train_good")[:2]
    images = torch.as_tensor(np.stack([image for _, image in load_images(paths, 256).images]))
    backbone = create_feature_extractor("tf_efficientnet_lite0", device="cpu")
    with torch.inference_mode():
        features = [f.float() for f in backbone(images)]
    c8, c16 = (f.shape[1] for f in features)
    stats = [(f.mean((0, 2, 3)), f.std((0, 2, 3))) for f in features]
    standardised = [(f - m[:, None, None]) / s[:, None, None] for f, (m, s) in zip(features, stats)]

    joint = create_model(create_config("cpu", bank_features="joint"), [c8, c16], [8, 16])
    level = create_model(create_config("cpu", bank_features="level"), [c8, c16], [8, 16])
    for model in (joint, level):
        model.set_reference_features([to_tokens(f).mean(0) for f in features], stats)
    assert [lv.patch_bank.shape[1] for lv in joint.levels] == [c8 + c16, c8 + c16]
    assert [lv.patch_bank.shape[1] for lv in level.levels] == [c8, c16]

    with torch.inference_mode():
        q8, q16 = joint.bank_queries(features)
        expected8 = torch.cat([standardised[0], F.interpolate(standardised[1], size=(32, 32), mode="bilinear")], 1)
        expected16 = torch.cat([F.avg_pool2d(standardised[0], 2), standardised[1]], 1)
        torch.testing.assert_close(q8, to_tokens(expected8), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(q16, to_tokens(expected16), rtol=1e-4, atol=1e-4)
        for got, f in zip(level.bank_queries(features), standardised):
            torch.testing.assert_close(got, to_tokens(f), rtol=1e-4, atol=1e-4)
        # the forward pass searches the bank with these tokens: a bank made of image 0's tokens gives it distance ~0
        joint.set_patch_banks([q[0] for q in (q8, q16)])
        outputs = joint.eval()(features, with_intra=False, with_inter=False)
    assert all(out.nearest.shape == (2, out.tokens.shape[1]) for out in outputs)
    assert all(out.nearest[0].max() < 0.02 * out.nearest[1].median() for out in outputs)


def test_a_nearest_only_score_skips_the_transformer_and_scores_the_same(models_env: Path):
    """A score of the nearest distance alone needs no reconstruction: the transformer is not run, and the maps and
    image scores equal those of a full forward pass scored with the same spec; a score that uses an FOD branch runs it.
    """
    from fod_app.scoring import ScoreSpec, needs_branches, score_maps

    detector = load_bundle("test-model", root=models_env, device="cpu")
    statistics = detector.score_spec.statistics
    nearest_only = ScoreSpec("standardized", {"reconstruction": 0.0, "nearest": 1.0}, statistics)
    with_rec = ScoreSpec("standardized", {"reconstruction": 0.5, "nearest": 0.5}, statistics)
    assert needs_branches(detector.config, nearest_only, False) == (False, False, True, False)
    assert needs_branches(detector.config, with_rec, False)[3] is True
    assert needs_branches(detector.config, nearest_only, True)[3] is True  # the Explore page gets every branch

    paths = sorted((REPO / "sample_data" / "inspect").glob("*.png"))[:3]
    batch = detector.to_batch([image for _, image in load_images(paths, 256).images])
    with torch.inference_mode():
        features = detector.backbone(batch)
        full = score_maps(detector.model(features), detector.model.grids, detector.config, nearest_only)
    runs = []
    hook = detector.model.levels[0].input_embedding.register_forward_hook(lambda *_: runs.append(1))
    try:
        detector.score_spec = nearest_only
        fast = detector.score_features(features)
        assert not runs
        detector.score_spec = with_rec
        detector.score_features(features)
        assert runs
    finally:
        hook.remove()
    torch.testing.assert_close(fast.anomaly_map, full.anomaly_map)
    torch.testing.assert_close(fast.image_score, full.image_score)


def test_patchcore_bank_makes_the_nearest_branch_patchcores_own_patch_score():
    """``bank_features="patchcore"``: one bank, on the finest level, of PatchCore's *raw* multi-scale patch feature,
    at most ``patch_bank_ratio`` of the training tokens. With PatchCore's own memory bank in it, the nearest branch
    alone scores exactly PatchCore's map (``bench/patchcore.py``) up to its z-scoring: same distances, and the score
    map is (PatchCore's map - mu) / sigma. The level without a bank adds nothing to the score and no statistics."""
    from bench.patchcore import PatchCore
    from fod_app.config import create_config
    from fod_app.model import create_model
    from fod_app.scoring import ScoreSpec, good_statistics, level_scores, score_maps
    from fod_app.training import channel_statistics, patch_banks

    paths = list_images(REPO / "sample_data" / "train_good")[:8]
    images = [image for _, image in load_images(paths, 256).images]
    backbone = create_feature_extractor("tf_efficientnet_lite0", device="cpu")
    with torch.inference_mode():
        features = [f.float() for f in backbone(torch.as_tensor(np.stack(images)))]
    train, good, test = [f[:5] for f in features], [f[5:7] for f in features], [f[7:] for f in features]
    config = create_config("cpu", bank_features="patchcore", patch_bank_ratio=0.1)
    model = create_model(config, backbone.channels, backbone.strides).eval()
    model.set_reference_features([to_tokens(f).mean(0) for f in train], [channel_statistics(f) for f in train])
    banks = patch_banks(model, train, config)
    assert [tuple(b.shape) for b in banks] == [(512, sum(backbone.channels)), (0, sum(backbone.channels))]  # 10 %

    patchcore = PatchCore(backbone, coreset_ratio=0.1, smoothing_sigma=config.smoothing_sigma).fit(images[:5])
    model.set_patch_banks([patchcore.memory_bank, banks[1]])
    with torch.inference_mode():
        good_levels = [level_scores(o, g, config, ScoreSpec(), i)
                       for i, (o, g) in enumerate(zip(model(good), model.grids))]
        statistics = good_statistics([good_levels])
        assert "nearest" in statistics[0] and "nearest" not in statistics[1]
        spec = ScoreSpec.from_dict(ScoreSpec("standardized", {"nearest": 1.0}, statistics).to_dict())
        outputs = model(test, False, False, with_reconstruction=False)
        assert outputs[1].nearest is None
        ours = score_maps(outputs, model.grids, config, spec)
        reference_map, reference_score = patchcore.score_batch(torch.as_tensor(np.stack(images[7:])))
    mean, std = statistics[0]["nearest"]
    assert float(ours.levels[1].score.abs().max()) == 0.0  # the level without a bank adds nothing
    torch.testing.assert_close(ours.anomaly_map * std + mean, reference_map, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ours.image_score * std + mean, reference_score, rtol=1e-4, atol=1e-3)
    # the score's natural zero is a zero distance: PatchCore's 0
    assert spec.score_origin() == pytest.approx(-mean / std)
