"""Unit tests of the FOD pieces: targets, divergences, stop-gradients, shapes, scoring helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fod_app.config import create_config
from fod_app.correlation import (
    correlation_terms,
    entropy,
    kl_divergence,
    sigma_from_projection,
    symmetric_kl,
    target_correlation,
)
from fod_app.losses import level_loss
from fod_app.model import create_model, positional_encoding_2d, reconstruction_error, to_tokens
from fod_app.scoring import divergence_weight, gaussian_smooth, score_maps

GRID = (6, 5)
L = GRID[0] * GRID[1]


def tiny_config(**overrides):
    base = dict(d_models=(16, 16), n_heads=2, n_layers=2, image_size=48, batch_size=2, correlation_rows=0)
    base.update(overrides)
    return create_config("cpu", **base)


def official_target(sigma: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The official computation: unnormalised RBF on squared distance grids, then row-normalised."""
    h, w = grid
    idx = torch.arange(h * w)
    dy = ((idx[:, None] // w - idx[None, :] // w) ** 2).float()
    dx = ((idx[:, None] % w - idx[None, :] % w) ** 2).float()
    s1, s2 = sigma[..., 0:1], sigma[..., 1:2]
    t = 1.0 / (2 * torch.pi * s1 * s2) * torch.exp(-dy / (2 * s1**2) - dx / (2 * s2**2))
    return t / t.sum(-1, keepdim=True)


def random_sigma(batch=2, heads=3, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sigma_from_projection(torch.randn(batch, length, heads, 2, generator=g))


def test_target_rows_sum_to_one_and_match_official_formula():
    sigma = random_sigma()
    target = target_correlation(sigma, GRID)
    assert target.shape == (2, 3, L, L)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 3, L))
    torch.testing.assert_close(target, official_target(sigma.double(), GRID).float(), atol=1e-6, rtol=1e-4)
    # centred on the query's own position: the diagonal is each row's maximum
    assert torch.equal(target.argmax(-1), torch.arange(L).expand(2, 3, L))


def test_target_for_query_subset_equals_rows_of_full_target():
    sigma = random_sigma()
    rows = torch.tensor([0, 7, 29])
    full = target_correlation(sigma, GRID)
    sub = target_correlation(sigma[:, :, rows], GRID, rows)
    torch.testing.assert_close(sub, full[:, :, rows])


def test_sigma_range_is_as_official():
    sigma = sigma_from_projection(torch.tensor([-100.0, 0.0, 100.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2))
    assert sigma.min() > 0 and sigma.min() < 1e-4
    assert abs(float(sigma.max()) - 2.0) < 1e-4


def test_kl_nonnegative_symmetric_and_entropy_bounds():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 3, L, L, generator=g), -1)
    q = torch.softmax(torch.randn(2, 3, L, L, generator=g), -1)
    assert (kl_divergence(p, q) >= 0).all()
    torch.testing.assert_close(kl_divergence(p, p), torch.zeros(2, L), atol=1e-6, rtol=0)
    torch.testing.assert_close(symmetric_kl(p, q).mean(1), kl_divergence(p, q) + kl_divergence(q, p))
    ent = entropy(p)
    assert (ent > 0).all() and (ent <= np.log(L) + 1e-5).all()


def test_fused_terms_values_and_gradients_equal_official_two_phase():
    """One fused evaluation must give exactly the gradients of the official loss1 + loss2 with detaches."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, L, L, generator=g, dtype=torch.float64)
    raw = torch.randn(2, L, 3, 2, generator=g, dtype=torch.float64)
    lam1, lam2 = 0.5, 0.5
    for sign in (1.0, -1.0):  # intra, inter
        grads = []
        for fused in (True, False):
            lg, rw = logits.clone().requires_grad_(), raw.clone().requires_grad_()
            corr = torch.softmax(lg, -1)
            target = target_correlation(sigma_from_projection(rw), GRID)
            if fused:
                div, ent = correlation_terms(corr, target, 1e-4, -sign * lam1, sign * lam1, -sign * lam2)
                loss = div.mean() + ent.mean()
            else:
                def kl(a, b):
                    return kl_divergence(a, b)

                phase_target = (kl(target, corr.detach()) + kl(corr.detach(), target)).mean()  # grad -> sigma
                phase_corr = (kl(target.detach(), corr) + kl(corr, target.detach())).mean()  # grad -> S
                ent_value = entropy(corr).mean()
                loss = sign * lam1 * phase_target - sign * lam1 * phase_corr - sign * lam2 * ent_value
            loss.backward()
            grads.append((lg.grad.clone(), rw.grad.clone()))
        torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-10, rtol=1e-7)
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-10, rtol=1e-7)


def test_fused_terms_built_in_place_equal_the_plain_formulas_bit_for_bit():
    """The in-place backward (a speed change) must not move a single bit against the textbook expressions."""
    g = torch.Generator().manual_seed(3)
    corr = torch.softmax(3 * torch.randn(2, 2, 16, L, generator=g), -1)
    target = torch.softmax(3 * torch.randn(2, 2, 16, L, generator=g), -1)
    grad_div, grad_ent = torch.randn(2, 2, 16, generator=g), torch.randn(2, 2, 16, generator=g)
    eps, a, b, c = 1e-4, -0.5, 0.5, -0.5
    log_corr, log_target = torch.log(corr + eps), torch.log(target + eps)
    plain_div = ((corr - target) * (log_corr - log_target)).sum(-1)
    plain_ent = -(corr * log_corr).sum(-1)
    plain_grad_corr = (a * grad_div).unsqueeze(-1) * ((log_corr - log_target) + (corr - target) / (corr + eps)) - (
        c * grad_ent).unsqueeze(-1) * (log_corr + corr / (corr + eps))
    plain_grad_target = (b * grad_div).unsqueeze(-1) * (-(log_corr - log_target) - (corr - target) / (target + eps))
    s, t = corr.clone().requires_grad_(), target.clone().requires_grad_()
    div, ent = correlation_terms(s, t, eps, a, b, c)
    torch.autograd.backward((div, ent), (grad_div, grad_ent))
    assert torch.equal(div, plain_div) and torch.equal(ent, plain_ent)
    assert torch.equal(s.grad, plain_grad_corr) and torch.equal(t.grad, plain_grad_target)


def test_inference_forward_with_in_place_softmax_equals_the_recorded_forward_bit_for_bit():
    """Outside autograd the full correlation is scaled and soft-maxed in place (``softmax_scores_``, a speed
    change): the `cpu` preset model on Lite0-shaped features must give the very bits of a forward that records
    gradients (which uses ``torch.softmax``), correlations and reconstructions alike."""
    config = create_config("cpu")
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(2, 40, 32, 32, generator=g), torch.randn(2, 112, 16, 16, generator=g)]
    model = create_model(config, [40, 112], [8, 16]).eval()
    with torch.inference_mode():
        fast = model(features, with_nearest=False)
    with torch.enable_grad():
        recorded = model(features, with_nearest=False)
    for a, b in zip(fast, recorded):
        assert torch.equal(a.reconstruction, b.reconstruction.detach())
        for x, y in zip(a.intra + a.inter, b.intra + b.inter):
            assert x.correlation.shape[-1] == y.correlation.shape[-2]  # full (L, L) maps
            assert torch.equal(x.correlation, y.correlation.detach())
    assert len(fast[0].intra) == len(fast[0].inter) == config.n_layers


def _grad_norms(model):
    return {n: (0.0 if p.grad is None else float(p.grad.abs().sum())) for n, p in model.named_parameters()}


@pytest.mark.parametrize("phase", ["correlation", "target"])
def test_stop_gradients_reach_only_the_intended_parameters(phase):
    """Correlation phase: S gets gradient, sigma heads none. Target phase: sigma heads only (+ upstream)."""
    config = tiny_config()
    model = create_model(config, [8, 12], [8, 16])
    level = model.levels[0]
    tokens = torch.randn(2, L, 8)
    level.grid = GRID
    level.input_embedding.position = positional_encoding_2d(16, GRID)
    level.reference_embedding.position = positional_encoding_2d(16, GRID)
    level.reference_features = torch.randn(L, 8)
    out = level(tokens)
    total = 0.0
    for state in out.intra + out.inter:
        target = target_correlation(state.sigma, GRID)
        scales = (1.0, 0.0, 0.0) if phase == "correlation" else (0.0, 1.0, 0.0)
        div, _ = correlation_terms(state.correlation, target, 1e-4, *scales)
        total = total + div.mean()
    total.backward()
    grads = _grad_norms(level)
    sigma_grads = [v for n, v in grads.items() if "sigma_projection" in n]
    qk_grads = [v for n, v in grads.items() if n.endswith(("query.weight", "key.weight"))]
    value_grads = [v for n, v in grads.items() if n.endswith("value.weight")]
    if phase == "correlation":
        assert all(v == 0.0 for v in sigma_grads)
        # the last layer's Q/K get gradient through S (earlier layers also through x)
        assert sum(qk_grads) > 0
    else:
        assert all(v > 0 for v in sigma_grads)
        # target phase: no gradient through S, so the last block's Q/K get none
        last = level.blocks[-1]
        for attn in (last.intra_correlation, last.inter_correlation):
            assert attn.query.weight.grad is None or float(attn.query.weight.grad.abs().sum()) == 0.0
            assert attn.key.weight.grad is None or float(attn.key.weight.grad.abs().sum()) == 0.0
    # the output projection never matters for the correlation terms
    assert grads["output_projection.weight"] == 0.0
    assert all(v == 0.0 for v in value_grads[-2:])


def test_model_shapes_and_row_subset_consistency():
    config = tiny_config()
    model = create_model(config, [8, 12], [8, 16]).eval()
    feats = [torch.randn(2, 8, 6, 6), torch.randn(2, 12, 3, 3)]
    model.set_reference_features([to_tokens(f).mean(0) for f in feats])
    outs = model(feats)
    assert [o.reconstruction.shape for o in outs] == [(2, 36, 8), (2, 9, 12)]
    assert len(outs[0].intra) == config.n_layers and len(outs[0].inter) == config.n_layers
    assert outs[0].intra[0].correlation.shape == (2, 2, 36, 36)
    assert outs[0].inter[0].sigma.shape == (2, 2, 36, 2)
    rows = torch.tensor([1, 5, 35])
    sub = model.levels[0](to_tokens(feats[0]), rows)
    torch.testing.assert_close(sub.reconstruction, outs[0].reconstruction, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sub.intra[1].correlation, outs[0].intra[1].correlation[:, :, rows], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sub.inter[0].sigma, outs[0].inter[0].sigma[:, :, rows])


def test_residual_switch_changes_forward_and_out_projection_adds_parameters():
    feats = [torch.randn(1, 8, 6, 6), torch.randn(1, 12, 3, 3)]
    a = create_model(tiny_config(), [8, 12], [8, 16])
    b = create_model(tiny_config(residual_cancellation=False), [8, 12], [8, 16])
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(feats)[0].reconstruction, b(feats)[0].reconstruction)
    c = create_model(tiny_config(use_out_projection=True), [8, 12], [8, 16])
    assert sum(p.numel() for p in c.parameters()) > sum(p.numel() for p in a.parameters())


def test_reference_without_position_embedding_changes_only_the_reference_tokens():
    """Official (spec §3): the reference embedding adds the same fixed 2-D position embedding as the input's;
    ``reference_position=False`` leaves it out of the reference only, with the same weights."""
    feats = [torch.randn(1, 8, 6, 6), torch.randn(1, 12, 3, 3)]
    official = create_model(tiny_config(), [8, 12], [8, 16]).eval()
    content = create_model(tiny_config(reference_position=False), [8, 12], [8, 16]).eval()
    content.load_state_dict(official.state_dict())  # same parameters: the embedding is a non-persistent buffer
    reference = torch.randn(36, 8)
    a, b = official.levels[0].reference_embedding, content.levels[0].reference_embedding
    torch.testing.assert_close(a(reference) - b(reference), positional_encoding_2d(a.position.shape[1], (6, 6)))
    torch.testing.assert_close(b(reference), a.projection(reference))
    torch.testing.assert_close(official.levels[0].input_embedding.position, content.levels[0].input_embedding.position)
    for model in (official, content):
        model.set_reference_features([to_tokens(f).mean(0) for f in feats])
    assert not torch.allclose(official(feats)[0].inter[0].correlation, content(feats)[0].inter[0].correlation)
    assert tiny_config().reference_position  # the official network is the default


def test_level_loss_trains_and_reports_terms():
    config = tiny_config()
    model = create_model(config, [8, 12], [8, 16])
    feats = [torch.randn(2, 8, 6, 6), torch.randn(2, 12, 3, 3)]
    model.set_reference_features([to_tokens(f).mean(0) for f in feats])
    loss, terms = level_loss(model.levels[0](to_tokens(feats[0])), (6, 6), config)
    assert set(terms) == {"reconstruction", "intra_divergence", "intra_entropy", "inter_divergence", "inter_entropy"}
    assert all(np.isfinite(v) for v in terms.values())
    loss.backward()
    assert model.levels[0].output_projection.weight.grad is not None
    rec_only = tiny_config(variant="reconstruction")
    _, terms = level_loss(model.levels[0](to_tokens(feats[0])), (6, 6), rec_only)
    assert set(terms) == {"reconstruction"}


def test_reconstruction_error_zero_for_perfect_reconstruction():
    x = torch.randn(2, 5, 7)
    torch.testing.assert_close(reconstruction_error(x, x.clone()), torch.zeros(2, 5), atol=1e-6, rtol=0)
    assert (reconstruction_error(x, -x) > 2.0).all()


def test_divergence_weight_modes():
    div = torch.tensor([[0.0, 1.0, 5.0]])
    w = divergence_weight(div, "max_minus_p")
    assert float(w[0, 0]) == 0.0 and float(w[0, 2]) > float(w[0, 1]) > 0
    w1 = divergence_weight(div, "one_minus_p")
    torch.testing.assert_close(w1, 1 - torch.softmax(-div, -1))


def test_gaussian_smooth_matches_scipy():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 50)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(maps), 4.0).numpy()
    ref = np.stack([gaussian_filter(m, sigma=4, mode="reflect", truncate=4.0) for m in maps])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_positional_encoding_layout():
    enc = positional_encoding_2d(8, (3, 4))
    assert enc.shape == (12, 8)
    # token (row 2, col 3): first half encodes the column, second half the row
    torch.testing.assert_close(enc[2 * 4 + 3, 0], torch.sin(torch.tensor(3.0)))
    torch.testing.assert_close(enc[2 * 4 + 3, 4], torch.sin(torch.tensor(2.0)))


def test_score_maps_shapes_and_image_score_is_max():
    config = tiny_config()
    model = create_model(config, [8, 12], [8, 16]).eval()
    feats = [torch.randn(3, 8, 6, 6), torch.randn(3, 12, 3, 3)]
    model.set_reference_features([to_tokens(f).mean(0) for f in feats])
    with torch.no_grad():
        scored = score_maps(model(feats), model.grids, config, with_branches=True)
    assert scored.anomaly_map.shape == (3, 48, 48)
    torch.testing.assert_close(scored.image_score, scored.anomaly_map.flatten(1).max(1).values)
    assert set(scored.branch_maps) == {"score", "reconstruction", "intra_divergence", "inter_divergence"}


def test_zero_grad_quirk_gives_two_adam_steps_per_batch_like_torch_1_13():
    from fod_app.training import _train_step

    feats = [torch.randn(2, 8, 6, 6), torch.randn(2, 12, 3, 3)]
    steps = {}
    for quirk in (False, True):
        config = tiny_config(zero_grad_quirk=quirk)
        model = create_model(config, [8, 12], [8, 16])
        model.set_reference_features([to_tokens(f).mean(0) for f in feats])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):
            _train_step(model, feats, config, optimizer, torch.device("cpu"))
        level_steps = [
            {int(optimizer.state[p]["step"]) for p in level.parameters() if p in optimizer.state}
            for level in model.levels
        ]
        steps[quirk] = level_steps
    assert steps[False] == [{2}, {2}]
    # official: level 0 steps twice per batch; level 1 is skipped once on the very first batch
    assert steps[True] == [{4}, {3}]
