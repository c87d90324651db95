"""Model-quality notes on the learned target widths σ (paper Eq. 5-6), so the Explore pictures do not mislead.

σ comes from ``3**(sigmoid(5 s) + 1e-5) - 1`` (``correlation.sigma_from_projection``), so it lives in
(``SIGMA_LOW`` ≈ 1e-5, ``SIGMA_HIGH`` ≈ 2.0) grid steps and starts near ``SIGMA_START`` ≈ 0.73 (s = 0).
A branch whose σ sits at either end for most patches has a degenerate target: a single dot (a delta, the KL
then measures only the weight on the patch itself) or the widest bell the model allows (the same for every
patch). σ that has not moved from its start value means the branch's target was never trained.
"""

from __future__ import annotations

import numpy as np
import torch

from .correlation import sigma_from_projection
from .explain import ImageExplanation

_ENDS = sigma_from_projection(torch.tensor([-1e4, 0.0, 1e4]).view(1, 3, 1, 1)).flatten().tolist()
SIGMA_LOW, SIGMA_START, SIGMA_HIGH = _ENDS
#: σ below this (grid steps) is a collapsed target: a dot on the patch itself.
COLLAPSED_BELOW = 0.05
#: σ within this of ``SIGMA_HIGH`` is saturated at the widest target.
SATURATED_WITHIN = 0.02
#: A branch is flagged when at least this fraction of its σ values (patches x heads x layers x 2 axes) is degenerate.
FLAG_FRACTION = 0.5


def sigma_values(explanation: ImageExplanation, branch: str, level: int) -> np.ndarray:
    """All σ values of a branch at a level (every layer, head, patch and axis), flattened."""
    states = explanation.intra if branch == "intra" else explanation.inter
    return np.concatenate([sigma.numpy().ravel() for _, sigma in states[level]])


def sigma_notes(explanation: ImageExplanation) -> list[str]:
    """Plain-words notes on degenerate σ, one per (branch, level) that is flagged; empty when σ looks healthy."""
    notes = []
    for level, grid in enumerate(explanation.grids):
        for branch in ("intra", "inter"):
            values = sigma_values(explanation, branch, level)
            if values.size == 0:
                continue
            where = f"{branch.capitalize()} targets at level {level + 1} ({grid[0]}×{grid[1]} patches)"
            median = float(np.median(values))
            collapsed = float(np.mean(values < COLLAPSED_BELOW))
            saturated = float(np.mean(values > SIGMA_HIGH - SATURATED_WITHIN))
            if collapsed >= FLAG_FRACTION:
                notes.append(
                    f"{where}: the learned width σ has collapsed to almost zero for {collapsed:.0%} of the values "
                    f"(median {median:.2g} patches). The target is then a single dot on the patch itself, not a bell; "
                    "its KL mostly measures how little weight the correlation puts on the patch's own position."
                )
            elif saturated >= FLAG_FRACTION:
                notes.append(
                    f"{where}: σ sits at the widest value the model allows ({SIGMA_HIGH:.1f} patches) for "
                    f"{saturated:.0%} of the values. The target is then the same bell for every patch; it does not "
                    "adapt to the part."
                )
            elif float(np.std(values)) < 0.01 and abs(median - SIGMA_START) < 0.05:
                notes.append(
                    f"{where}: σ is still at its starting value ({SIGMA_START:.2f} patches) everywhere: this target "
                    "was not trained."
                )
    return notes


def patch_sigma_note(sigma: tuple[float, float], branch: str) -> str | None:
    """A short warning for one patch's σ (row, column), or None."""
    if max(sigma) < COLLAPSED_BELOW:
        return f"{branch} σ ≈ {max(sigma):.1g}: the target is a single dot"
    if min(sigma) > SIGMA_HIGH - SATURATED_WITHIN:
        return f"{branch} σ at its maximum ({SIGMA_HIGH:.1f})"
    return None
