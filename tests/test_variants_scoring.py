"""Each ablation variant's forward pass and score direction, pinned against the spec (official EncoderLayer),
the standardised score, the step budget, and the self-check's synthetic defects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fod_app.config import FODConfig, create_config
from fod_app.model import create_model, to_tokens
from fod_app.scoring import EVIDENCE_SIGN, ScoreSpec, level_scores, product_score, score_maps
from fod_app.synthetic import KINDS, synthetic_defects

FEATS = [torch.randn(3, 8, 6, 6, generator=torch.Generator().manual_seed(1)),
         torch.randn(3, 12, 3, 3, generator=torch.Generator().manual_seed(2))]


def tiny_config(**overrides):
    base = dict(d_models=(16, 16), n_heads=2, n_layers=2, image_size=48, batch_size=2, correlation_rows=0)
    base.update(overrides)
    return create_config("cpu", **base)


def tiny_model(**overrides):
    config = tiny_config(**overrides)
    model = create_model(config, [8, 12], [8, 16]).eval()
    model.set_reference_features([to_tokens(f).mean(0) for f in FEATS])
    return config, model


def attention(module, x, source):
    """softmax(QK^T / sqrt(d_h)) V, heads concatenated: the official Attention2D output (no out-projection)."""
    b, n, d = x.shape
    h = module.n_heads
    q = module.query(x).view(b, n, h, d // h).transpose(1, 2)
    k = module.key(source).view(source.shape[0], -1, h, d // h).transpose(1, 2)
    v = module.value(source).view(source.shape[0], -1, h, d // h).transpose(1, 2)
    s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    return (s @ v).transpose(1, 2).reshape(b, n, d)


def expected_block(block, x, reference, fused):
    z = block.norm_fusion(fused)
    return block.norm_output(z + block.feed_forward(z))


@pytest.mark.parametrize(
    ("variant", "residual_cancellation", "formula"),
    [
        ("full", True, lambda x, a_intra, a_inter, a_self: a_intra - a_inter),  # official: the skip cancels
        ("full", False, lambda x, a_intra, a_inter, a_self: x + a_intra - a_inter),  # paper Eq. 1
        ("intra", True, lambda x, a_intra, a_inter, a_self: x + a_intra),  # single branch keeps its residual
        ("inter", True, lambda x, a_intra, a_inter, a_self: x + a_inter),
        ("reconstruction", True, lambda x, a_intra, a_inter, a_self: x + a_self),  # plain transformer
    ],
)
def test_encoder_layer_of_each_variant_matches_the_official_formula(variant, residual_cancellation, formula):
    config, model = tiny_model(variant=variant, residual_cancellation=residual_cancellation)
    level = model.levels[0]
    block = level.blocks[0]
    with torch.no_grad():
        x = level.input_embedding(level.normalize(to_tokens(FEATS[0])))
        reference = None
        if level.uses_reference:
            reference = level.reference_embedding(level.normalize(level.reference_features)).unsqueeze(0)
        out, intra, inter = block(x, reference)
        a_intra = attention(block.intra_correlation, x, x) if block.intra_correlation is not None else None
        a_inter = attention(block.inter_correlation, x, reference) if block.inter_correlation is not None else None
        a_self = attention(block.self_attention, x, x) if block.self_attention is not None else None
        torch.testing.assert_close(out, expected_block(block, x, reference, formula(x, a_intra, a_inter, a_self)))


def test_variants_build_only_their_own_branches():
    expectations = {
        # variant: (intra branch, inter branch, plain self-attention, reference embedding)
        "full": (True, True, False, True),
        "intra": (True, False, False, False),
        "inter": (False, True, False, True),
        "reconstruction": (False, False, True, False),
    }
    for variant, (intra, inter, plain, reference) in expectations.items():
        config, model = tiny_model(variant=variant)
        level, block = model.levels[0], model.levels[0].blocks[0]
        assert (block.intra_correlation is not None) == intra, variant
        assert (block.inter_correlation is not None) == inter, variant
        assert (block.self_attention is not None) == plain, variant
        assert hasattr(level, "reference_embedding") == reference, variant
        if plain:
            assert block.self_attention.sigma_projection is None  # no learnable prior, no correlation losses
        with torch.no_grad():
            outputs = model(FEATS)
        assert bool(outputs[0].intra) == intra and bool(outputs[0].inter) == inter, variant



def test_product_score_direction_per_variant():
    rec = torch.ones(1, 4)
    divergence = torch.tensor([[1.0, 2.0, 8.0, 3.0]])  # token 2 has the largest divergence, token 0 the smallest
    # inter (and full): a defect's inter correlation leaves its local prior -> the largest divergence scores highest
    for variant in ("full", "inter"):
        for weight in ("one_minus_p", "max_minus_p"):
            score = product_score(rec, None, divergence, tiny_config(variant=variant, score_weight=weight))
            assert int(score.argmax()) == 2 and int(score.argmin()) == 0, (variant, weight)
    # intra: trained away from its prior, so the *smallest* divergence is the anomaly (official softmax(-Div))
    score = product_score(rec, divergence, None, tiny_config(variant="intra"))
    torch.testing.assert_close(score, torch.softmax(-divergence, -1))
    assert int(score.argmax()) == 0
    # full FOD ignores the intra divergence in its product score (official code, Eq. 12)
    full = tiny_config(variant="full")
    torch.testing.assert_close(product_score(rec, divergence, divergence, full),
                               product_score(rec, -divergence, divergence, full))
    # reconstruction-only: the score is the reconstruction error
    torch.testing.assert_close(product_score(rec * 3, None, None, tiny_config(variant="reconstruction")), rec * 3)


def test_standardized_score_is_the_weighted_mean_of_branch_z_scores():
    config, model = tiny_model()
    with torch.no_grad():
        outputs = model(FEATS)
    product = level_scores(outputs[0], model.grids[0], config, ScoreSpec())
    stats = [{"reconstruction": (0.5, 2.0), "intra": (-1.0, 4.0), "inter": (3.0, 0.5)}] * 2
    spec = ScoreSpec("standardized", {"reconstruction": 1.0, "intra": 1.0, "inter": 2.0}, stats)
    scores = level_scores(outputs[0], model.grids[0], config, spec)
    z_rec = (product.reconstruction - 0.5) / 2.0
    z_intra = (-product.intra_divergence + 1.0) / 4.0  # intra evidence is the reversed divergence
    z_inter = (product.inter_divergence - 3.0) / 0.5
    torch.testing.assert_close(scores.score, (z_rec + z_intra + 2 * z_inter) / 4)
    torch.testing.assert_close(sum(scores.contributions.values()), scores.score)
    # image score = max of the smoothed level-mean map, and every branch alone is reported
    with torch.no_grad():
        maps = score_maps(outputs, model.grids, config, spec, with_branches=True)
    torch.testing.assert_close(maps.image_score, maps.anomaly_map.flatten(1).max(1).values.clamp_min(1e-6))
    assert set(maps.branch_image_scores) == {"reconstruction", "intra", "inter", "combined"}


def test_score_spec_round_trip_and_validation():
    stats = [{"reconstruction": (0.1, 0.2), "inter": (1.0, 0.5)}]
    spec = ScoreSpec("standardized", {"reconstruction": 1.0, "inter": 1.0}, stats)
    assert ScoreSpec.from_dict(spec.to_dict()) == spec
    assert ScoreSpec.from_dict(None).mode == "product"  # bundles from before the score record
    for bad in (
        {"mode": "magic"},
        {"mode": "standardized", "weights": {"reconstruction": -1.0}, "statistics": stats},
        {"mode": "standardized", "weights": {"intra": 1.0}, "statistics": stats},  # no statistics for intra
        {"mode": "standardized", "weights": {"reconstruction": 0.0}, "statistics": stats},
    ):
        with pytest.raises(ValueError):
            ScoreSpec.from_dict(bad)


def test_step_budget_in_steps_with_floor_and_cap():
    config = create_config("cpu", epochs=10, batch_size=8, min_steps=0, max_steps=0)
    assert config.step_budget(37) == 10 * 5
    assert create_config("cpu", epochs=10, batch_size=8, min_steps=200, max_steps=0).step_budget(37) == 200
    assert create_config("cpu", epochs=10, batch_size=8, min_steps=0, max_steps=30).step_budget(200) == 30


def test_synthetic_defects_change_only_their_mask_and_cycle_kinds():
    rng = np.random.default_rng(0)
    goods = [rng.random((3, 64, 64)).astype(np.float32) * 0.2 + 0.4 for _ in range(3)]
    donors = [rng.random((3, 64, 64)).astype(np.float32) for _ in range(2)]
    images, masks, kinds = synthetic_defects(goods, donors, per_image=3, seed=5)
    assert len(images) == 9 and kinds[:3] == list(KINDS)
    for i, (image, mask) in enumerate(zip(images, masks)):
        original = goods[i // 3]
        assert mask.any() and mask.mean() < 0.25
        np.testing.assert_array_equal(image[:, ~mask], original[:, ~mask])
        assert np.abs(image[:, mask] - original[:, mask]).mean() > 0.02
    again = synthetic_defects(goods, donors, per_image=3, seed=5)[0]
    assert all(np.array_equal(a, b) for a, b in zip(images, again))  # seeded


def test_drawn_cracks_and_stains_stay_near_their_mask_and_opacity_scales_a_defect():
    """The probe-only kinds (``bench/selfcheck_probe.py``): new appearance on a soft-edged mask; ``opacity``
    blends a defect over its image by the drawn factor (the first defect of a seed is the same one, half as strong)."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    goods = [rng.random((3, 128, 128)).astype(np.float32) * 0.2 + 0.4 for _ in range(2)]
    images, masks, kinds = synthetic_defects(goods, goods, per_image=2, seed=3, kinds=("crack", "stain"))
    assert kinds == ["crack", "stain", "crack", "stain"]
    for i, (image, mask) in enumerate(zip(images, masks)):
        change = np.abs(image - goods[i // 2]).max(axis=0)
        near = ndimage.binary_dilation(mask, iterations=4)
        assert change[mask].mean() > 0.02 and change[~near].max() < 1e-3
    full = synthetic_defects(goods, goods, per_image=1, seed=3)[0][0]
    half = synthetic_defects(goods, goods, per_image=1, seed=3, opacity=(0.5, 0.5))[0][0]
    np.testing.assert_allclose(half - goods[0], 0.5 * (full - goods[0]), atol=1e-6)


def test_cutpaste_patch_comes_from_the_donor(monkeypatch):
    """With the colour jitter disabled, the pasted patch is exactly a block of donor pixels."""
    from fod_app import synthetic

    monkeypatch.setattr(synthetic, "_jitter", lambda region, rng: region)
    good = np.zeros((3, 32, 32), np.float32)
    donor = np.arange(3 * 32 * 32, dtype=np.float32).reshape(3, 32, 32) / (3 * 32 * 32)
    image, mask = synthetic.cut_paste(good, donor, np.random.default_rng(3))
    rows, cols = np.where(mask)
    patch = image[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = patch.shape[1:]
    windows = F.unfold(torch.from_numpy(donor)[None], (h, w))[0].T.numpy()
    assert np.isclose(windows, patch.reshape(-1)[None], atol=1e-7).all(axis=1).any()


def test_chunked_branch_divergence_equals_the_direct_formula():
    from fod_app.correlation import sigma_from_projection, symmetric_kl, target_correlation
    from fod_app.model import BranchState
    from fod_app.scoring import DIVERGENCE_CHUNK, branch_divergence

    grid = (9, 10)  # 90 query rows: more than one chunk
    assert grid[0] * grid[1] > DIVERGENCE_CHUNK
    g = torch.Generator().manual_seed(0)
    states = [
        BranchState(torch.softmax(torch.randn(2, 3, 90, 90, generator=g) * 3, -1),
                    sigma_from_projection(torch.randn(2, 90, 3, 2, generator=g)))
        for _ in range(2)
    ]
    direct = torch.stack([symmetric_kl(s.correlation, target_correlation(s.sigma, grid), 1e-4).mean(1)
                          for s in states]).mean(0)
    torch.testing.assert_close(branch_divergence(states, grid, 1e-4), direct)


def test_divergence_that_consumes_its_target_equals_the_plain_formula_bit_for_bit():
    """Scoring's in-place divergence (``symmetric_kl_consuming``) on a chunk of rows of a 32x32 level, as
    ``branch_divergence`` calls it: the same bits as the plain formula, not merely close."""
    from fod_app.correlation import sigma_from_projection, symmetric_kl, symmetric_kl_consuming, target_correlation

    grid = (32, 32)
    g = torch.Generator().manual_seed(1)
    corr = torch.softmax(torch.randn(2, 2, 1024, 1024, generator=g) * 4, -1)
    sigma = sigma_from_projection(torch.randn(2, 1024, 2, 2, generator=g))
    part = slice(64, 128)
    target = target_correlation(sigma[:, :, part], grid, torch.arange(1024)[part])
    plain = symmetric_kl(corr[:, :, part], target, 1e-4)
    consumed = symmetric_kl_consuming(corr[:, :, part], target.clone(), 1e-4)
    assert torch.equal(consumed, plain)
    assert plain.shape == (2, 2, 64) and bool((plain > 0).all())


def _intra_row(near_self_weight: float, grid: tuple[int, int] = (32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    """One intra correlation row as training leaves it (BENCHMARKS.md "Twenty-fourth session"): its weight on 16 far
    patches, ``near_self_weight`` on each of the 25 patches around the query (the centre of the grid), and its
    Gaussian target at the widest sigma (2 grid steps): (1, 1, 1, L) each."""
    from fod_app.correlation import target_correlation

    height, width = grid
    centre = (height // 2) * width + width // 2
    row = torch.zeros(height * width, dtype=torch.float64)
    near = [(height // 2 + dr) * width + width // 2 + dc for dr in range(-2, 3) for dc in range(-2, 3)]
    row[near] = near_self_weight
    far = torch.arange(16) * 2  # first row of the grid, far from the centre
    row[far] = (1.0 - row.sum()) / 16
    target = target_correlation(torch.full((1, 1, 1, 2), 2.0, dtype=torch.float64), grid, torch.tensor([centre]))
    return row.view(1, 1, 1, -1), target


def test_scoring_log_floor_sees_the_weight_a_patch_keeps_near_itself():
    """Why ``score_eps`` exists: with the official floor (1e-4) the intra divergence of a patch that keeps 1e-6 of
    its weight on each neighbour equals, to 0.1 %, that of one keeping 1e-7 (the floor hides both); with the `cpu`
    preset's 1e-8 the first is smaller by about ln 10 times the target's mass there, so its intra evidence
    (``-Div``, the official direction: trained away from the prior, a patch still near it is anomalous) is higher."""
    from fod_app.config import create_config
    from fod_app.correlation import symmetric_kl

    (good, target), (defective, _) = _intra_row(1e-7), _intra_row(1e-6)
    official, preset = FODConfig().score_eps, create_config("cpu").score_eps
    assert official == 1e-4 and preset == 1e-8
    div = {eps: (float(symmetric_kl(good, target, eps)), float(symmetric_kl(defective, target, eps)))
           for eps in (official, preset)}
    assert abs(div[official][0] - div[official][1]) < 1e-3 * div[official][0]
    assert div[preset][0] - div[preset][1] > 1.0  # ln(10) x (target mass on the 25 neighbours, ~0.6)
    evidence = {eps: [EVIDENCE_SIGN["intra"] * d for d in pair] for eps, pair in div.items()}
    assert evidence[preset][1] > evidence[preset][0]


def test_scoring_uses_score_eps_and_training_keeps_eps():
    """``level_scores`` (what scores and what the Explore page shows) takes ``score_eps``; the training losses keep the
    official ``eps``; a bundle saved before ``score_eps`` existed loads with the official floor."""
    from fod_app.correlation import sigma_from_projection
    from fod_app.model import BranchState, LevelOutput
    from fod_app.scoring import branch_divergence, level_scores

    grid = (8, 8)
    g = torch.Generator().manual_seed(2)
    states = [BranchState(torch.softmax(torch.randn(1, 2, 64, 64, generator=g) * 6, -1),
                          sigma_from_projection(torch.randn(1, 64, 2, 2, generator=g)))]
    tokens = torch.randn(1, 64, 8, generator=g)
    output = LevelOutput(tokens=tokens, reconstruction=tokens + 0.1, intra=states, inter=states)
    config = FODConfig(score_eps=1e-8)
    scores = level_scores(output, grid, config, ScoreSpec())
    torch.testing.assert_close(scores.intra_divergence, branch_divergence(states, grid, 1e-8))
    assert not torch.allclose(scores.intra_divergence, branch_divergence(states, grid, 1e-4))
    assert config.eps == 1e-4  # the losses' floor (fod_app.losses) is a separate field
    old = FODConfig().to_dict()
    del old["score_eps"]
    assert FODConfig.from_dict(old).score_eps == 1e-4
    for bad in (0.0, -1e-8, float("nan"), 1.0):
        with pytest.raises(ValueError, match="score_eps"):
            FODConfig(score_eps=bad)


def test_product_score_mode_takes_the_official_floor_unless_told_otherwise():
    """``score_mode="product"`` is the official formula, so it scores with the official floor (``eps``) in every
    preset; the standardized/auto score keeps the preset's finer ``score_eps``; an explicit ``score_eps`` wins."""
    from fod_app.config import PRESETS, create_config

    for preset in PRESETS:
        assert create_config(preset, score_mode="product").score_eps == 1e-4
    assert create_config("cpu").score_eps == 1e-8 and create_config("cpu", score_mode="standardized").score_eps == 1e-8
    assert create_config("cpu", score_mode="product", score_eps=1e-8).score_eps == 1e-8
    assert create_config("cpu", score_mode="product", score_eps=None).score_eps == 1e-4  # the CLI's "not given"
    assert create_config("cpu", score_mode="product", variant="intra").eps == 1e-4  # training unchanged
