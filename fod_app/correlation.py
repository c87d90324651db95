"""Correlation distributions and their divergences (FOD paper §3.2-3.3, spec §4-5).

Shapes: ``B`` batch, ``h`` heads, ``L`` query tokens, ``S`` key tokens (= L, same grid),
``(H, W)`` token grid with ``L = H * W`` and token index ``row * W + col``.
"""

from __future__ import annotations

import torch


def sigma_from_projection(raw: torch.Tensor, sigma_max: float = 2.0) -> torch.Tensor:
    """Map the sigma head's raw output to sigma in grid steps: ``(m + 1)**(sigmoid(5 s) + 1e-5) - 1`` with the
    widest sigma ``m`` = ``sigma_max`` (official: 2, i.e. ``3**(...) - 1``; other values only in probes).

    raw: (B, L, h, 2) -> sigma (B, h, L, 2); [..., 0] pairs with row distance, [..., 1] with column.
    """
    sigma = torch.pow(sigma_max + 1.0, torch.sigmoid(5.0 * raw) + 1e-5) - 1.0
    return sigma.permute(0, 2, 1, 3)


def target_correlation(
    sigma: torch.Tensor, grid: tuple[int, int], query_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Row-normalised 2-D Gaussian target ("prior") correlation on the token grid.

    ``T[i, j] = softmax_j(-drow(i,j)^2 / (2 s1_i^2) - dcol(i,j)^2 / (2 s2_i^2))`` — identical to the
    official normalised RBF. Computed in separable form: the normaliser of a full grid factorises into
    a row sum times a column sum, so no (L, L) logsumexp is needed.

    sigma: (B, h, l, 2) -> T: (B, h, l, L), rows sum to 1. ``query_index`` (l,) gives the grid
    positions of the l query rows (default: all L tokens in order).
    """
    height, width = grid
    device, dtype = sigma.device, sigma.dtype
    index = torch.arange(height * width, device=device) if query_index is None else query_index
    rows = torch.arange(height, device=device, dtype=dtype)
    cols = torch.arange(width, device=device, dtype=dtype)
    d_row = (torch.div(index, width, rounding_mode="floor").to(dtype)[:, None] - rows[None, :]) ** 2
    d_col = ((index % width).to(dtype)[:, None] - cols[None, :]) ** 2  # (L, W)
    row = torch.softmax(-d_row / (2.0 * sigma[..., 0:1] ** 2), dim=-1)  # (B, h, L, H)
    col = torch.softmax(-d_col / (2.0 * sigma[..., 1:2] ** 2), dim=-1)  # (B, h, L, W)
    # exp(a + b) = exp(a) exp(b): the (L, L) target is an outer product, no (L, L) exponential (3x faster on CPU).
    return (row.unsqueeze(-1) * col.unsqueeze(-2)).flatten(-2)


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``KL_eps(p || q) = sum_j p (ln(p+eps) - ln(q+eps))``, averaged over heads.

    p, q: (B, h, L, S) -> (B, L).
    """
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1).mean(1)


def entropy(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``H_eps(p) = -sum_j p ln(p+eps)``, averaged over heads. p: (B, h, L, S) -> (B, L)."""
    return -(p * torch.log(p + eps)).sum(-1).mean(1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``KL(p||q) + KL(q||p)`` per head, without head averaging: (B, h, L, S) -> (B, h, L).

    One logarithm of the ratio instead of two logarithms (the same value; half the transcendental work).
    """
    return ((p - q) * torch.log((p + eps) / (q + eps))).sum(-1)


def _graph_capture() -> bool:
    """True while the model is being traced or exported (ONNX, TorchScript, torch.export): plain ops only."""
    compiler = torch.compiler
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or compiler.is_compiling()
                or getattr(compiler, "is_exporting", lambda: False)())


def softmax_scores_(scores: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(scores, -1)``, bit for bit, written over ``scores`` when nothing records gradients.

    The full correlation of a 32x32 level at batch 8 is (8, h, 1024, 1024), 67 MB: on 2 CPU cores a fresh buffer
    of that size (page faults) was about 40 % of the attention's time at inference (115 vs 68 ms). Only on CPU
    (whose last-dim kernel reads each row before writing it), outside autograd and graph capture;
    ``tests/test_model.py`` pins the equality.
    """
    if scores.device.type != "cpu" or torch.is_grad_enabled() or not scores.is_contiguous() or _graph_capture():
        return torch.softmax(scores, dim=-1)
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


def symmetric_kl_consuming(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``symmetric_kl(p, q, eps)``, bit for bit, overwriting ``q`` (a fresh target the caller owns).

    Two temporaries of the correlation's size instead of five: scoring a 32x32 level spends most of its divergence
    time allocating them on 2 CPU cores (``tests/test_variants_scoring.py`` pins the equality).
    """
    difference = p - q
    return torch.add(p, eps).div_(q.add_(eps)).log_().mul_(difference).sum(-1)


class _CorrelationTerms(torch.autograd.Function):
    """Fused symmetric KL and entropy with per-argument gradient scales (the minimax in one pass).

    Forward returns the true values; backward applies ``scale_corr`` to d(Div)/dS, ``scale_target``
    to d(Div)/dT and ``scale_entropy`` to d(Ent)/dS. A scale of 0 is an exact stop-gradient. This equals
    the official two-phase optimisation (two backward passes with detached copies) while evaluating
    the (L, L) terms once. The shifted correlation, the logarithms and the difference are kept for backward (four
    more tensors of the correlation's size, small with ``correlation_rows``), and the gradients are built in place:
    on 2 CPU cores these (l, L) element-wise passes were a third of a training step, mostly allocating fresh
    buffers. Values and gradients are bit-identical to the plain formulas (IEEE sums and products commute and
    negation is exact; ``tests/test_model.py`` pins it).
    """

    @staticmethod
    def forward(ctx, corr, target, eps, scale_corr, scale_target, scale_entropy):  # type: ignore[override]
        shifted = corr + eps
        log_corr = torch.log(shifted)
        log_ratio = torch.add(target, eps).log_().neg_().add_(log_corr)  # log(corr + eps) - log(target + eps)
        difference = corr - target
        product = difference * log_ratio  # one scratch buffer for both sums
        divergence = product.sum(-1)
        entropy_value = -torch.mul(corr, log_corr, out=product).sum(-1)
        ctx.save_for_backward(corr, target, shifted, log_corr, log_ratio, difference)
        ctx.constants = (eps, scale_corr, scale_target, scale_entropy)
        return divergence, entropy_value

    @staticmethod
    def backward(ctx, grad_div, grad_ent):  # type: ignore[override]
        corr, target, shifted, log_corr, log_ratio, difference = ctx.saved_tensors
        eps, scale_corr, scale_target, scale_entropy = ctx.constants
        grad_corr = grad_target = None
        if ctx.needs_input_grad[0] and (scale_corr or scale_entropy):
            # scale_corr * dDiv/dS = scale_corr * g_div * (log_ratio + difference / (corr + eps))
            grad_corr = torch.div(difference, shifted).add_(log_ratio).mul_((scale_corr * grad_div).unsqueeze(-1))
            if scale_entropy:  # minus scale_entropy * g_ent * (log(corr + eps) + corr / (corr + eps))
                grad_corr.sub_(torch.div(corr, shifted).add_(log_corr).mul_((scale_entropy * grad_ent).unsqueeze(-1)))
        if ctx.needs_input_grad[1] and scale_target:
            # scale_target * g_div * (-log_ratio - difference / (target + eps))
            shifted_target = target + eps
            grad_target = torch.div(difference, shifted_target, out=shifted_target).add_(log_ratio).mul_(
                (-scale_target * grad_div).unsqueeze(-1))
        return grad_corr, grad_target, None, None, None, None


def correlation_terms(
    corr: torch.Tensor,
    target: torch.Tensor,
    eps: float = 1e-4,
    scale_corr: float = 1.0,
    scale_target: float = 1.0,
    scale_entropy: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric KL(corr, target) and entropy(corr), per head: (B, h, L, S) -> two (B, h, L).

    Values are exact; gradients are scaled per argument (see ``_CorrelationTerms``).
    """
    return _CorrelationTerms.apply(corr, target, eps, scale_corr, scale_target, scale_entropy)
