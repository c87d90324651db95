"""FOD training objective (paper Eq. 3, 8, 10; spec §5), with explicit stop-gradients.

Intra branch: the correlation is pushed *away* from its Gaussian target with its entropy maximised,
while the target (sigma) is pulled toward the detached correlation. Inter branch: the opposite.
"""

from __future__ import annotations

import torch

from .config import FODConfig
from .correlation import correlation_terms, target_correlation
from .model import BranchState, LevelOutput, reconstruction_error


def branch_terms(
    states: list[BranchState],
    grid: tuple[int, int],
    config: FODConfig,
    sign: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-averaged (divergence, entropy) losses for one branch; scalar tensors.

    ``sign=+1`` is the intra branch (correlation pushed away, target pulled), ``sign=-1`` the inter
    branch. The returned tensors carry gradients such that ``divergence + entropy`` added to the loss
    reproduces ``loss1 + loss2`` of the official code for this branch (spec §5).
    """
    lam_div, lam_ent = config.lambda_divergence, config.lambda_entropy
    divergences, entropies = [], []
    for state in states:
        target = target_correlation(state.sigma, grid, state.rows)
        div, ent = correlation_terms(
            state.correlation,
            target,
            config.eps,
            scale_corr=-sign * lam_div,
            scale_target=sign * lam_div,
            scale_entropy=-sign * lam_ent,
        )
        divergences.append(div.mean())
        entropies.append(ent.mean())
    return torch.stack(divergences).mean(), torch.stack(entropies).mean()


def level_loss(
    output: LevelOutput, grid: tuple[int, int], config: FODConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one level and its readable terms.

    The target is ``output.tokens`` (B, L, C). The returned scalar has the official gradient; its *value* is
    ``w_rec * L_rec`` plus the (unsigned) divergence/entropy terms, so log ``terms`` rather than it.
    """
    reconstruction = reconstruction_error(output.tokens.float(), output.reconstruction.float()).mean()
    total = config.reconstruction_weight * reconstruction
    terms = {"reconstruction": float(reconstruction.detach())}
    for name, states, sign, enabled in (
        ("intra", output.intra, 1.0, config.branches.intra),
        ("inter", output.inter, -1.0, config.branches.inter),
    ):
        if not enabled:
            continue
        div, ent = branch_terms(states, grid, config, sign)
        total = total + div + ent
        terms[f"{name}_divergence"] = float(div.detach())
        terms[f"{name}_entropy"] = float(ent.detach())
    return total, terms
