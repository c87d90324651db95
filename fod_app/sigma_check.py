"""Model-quality notes on the learned target widths σ (paper Eq. 5-6), so the Explore pictures do not mislead.

σ comes from ``3**(sigmoid(5 s) + 1e-5) - 1`` (``correlation.sigma_from_projection``), so it lives in
(``SIGMA_LOW`` ≈ 1e-5, ``SIGMA_HIGH`` ≈ 2.0) grid steps and starts near ``SIGMA_START`` ≈ 0.73 (s = 0).
A branch whose σ sits at either end for most patches has a degenerate target: a single dot (a delta, the KL
then measures only the weight on the patch itself) or the widest bell the model allows (the same for every
patch). σ that has not moved from its start value means the branch's target was never trained.
"""

from __future__ import annotations

from dataclasses import dataclass

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
#: Why, as measured on full magnetic tile and bottle (BENCHMARKS.md "Twenty-fourth session", bench/branch_dynamics.py).
INTRA_SATURATED_CAUSE = (
    " Training pushes the intra correlation away from its target while the target follows it, and the target cannot"
    " follow past this width: the correlation settles on patches out of its reach, and the KL only tells how much"
    " weight a patch still keeps near itself (measured: enough to separate defects on bottles, hardly on magnetic"
    " tile; the branch's self-check line says which)."
)
INTER_COLLAPSED_CAUSE = (
    " Training pulls the inter correlation onto that dot. On aligned parts it finds the spot by what the patch looks"
    " like (measured on bottles); on parts that are not aligned largely by the position code alone, for good and"
    " defective patches alike, and the branch then separates defects less the longer it trains (magnetic tile)."
)


def sigma_values(explanation: ImageExplanation, branch: str, level: int) -> np.ndarray:
    """All σ values of a branch at a level (every layer, head, patch and axis), flattened."""
    states = explanation.intra if branch == "intra" else explanation.inter
    return np.concatenate([sigma.numpy().ravel() for _, sigma in states[level]])


@dataclass
class SigmaFlag:
    """A degenerate σ: ``kind`` is 'collapsed', 'saturated' or 'untrained'; ``fraction`` of values affected."""

    branch: str
    level: int
    grid: tuple[int, int]
    kind: str
    fraction: float
    median: float


def sigma_flags(explanation: ImageExplanation) -> list[SigmaFlag]:
    """Every (branch, level) whose σ is degenerate for most patches of this image."""
    flags = []
    for level, grid in enumerate(explanation.grids):
        for branch in ("intra", "inter"):
            values = sigma_values(explanation, branch, level)
            if values.size == 0:
                continue
            median = float(np.median(values))
            collapsed = float(np.mean(values < COLLAPSED_BELOW))
            saturated = float(np.mean(values > SIGMA_HIGH - SATURATED_WITHIN))
            if collapsed >= FLAG_FRACTION:
                flags.append(SigmaFlag(branch, level, tuple(grid), "collapsed", collapsed, median))
            elif saturated >= FLAG_FRACTION:
                flags.append(SigmaFlag(branch, level, tuple(grid), "saturated", saturated, median))
            elif float(np.std(values)) < 0.01 and abs(median - SIGMA_START) < 0.05:
                flags.append(SigmaFlag(branch, level, tuple(grid), "untrained", 1.0, median))
    return flags


def sigma_notes(explanation: ImageExplanation) -> list[str]:
    """Plain-words notes on degenerate σ, one per (branch, level) that is flagged; empty when σ looks healthy."""
    notes = []
    for flag in sigma_flags(explanation):
        where = f"{flag.branch.capitalize()} targets at level {flag.level + 1} ({flag.grid[0]}×{flag.grid[1]} patches)"
        if flag.kind == "collapsed":
            notes.append(
                f"{where}: the learned width σ has collapsed to almost zero for {flag.fraction:.0%} of the values "
                f"(median {flag.median:.2g} patches). The target is then a single dot on the patch itself, not a bell; "
                "its KL mostly measures how little weight the correlation puts on the patch's own position."
                + (INTER_COLLAPSED_CAUSE if flag.branch == "inter" else "")
            )
        elif flag.kind == "saturated":
            notes.append(
                f"{where}: σ sits at the widest value the model allows ({SIGMA_HIGH:.1f} patches) for "
                f"{flag.fraction:.0%} of the values. The target is then the same bell for every patch; it does not "
                "adapt to the part." + (INTRA_SATURATED_CAUSE if flag.branch == "intra" else "")
            )
        else:
            notes.append(f"{where}: σ is still at its starting value ({SIGMA_START:.2f} patches) everywhere: this "
                         "target was not trained.")
    return notes


def sigma_summary(explanation: ImageExplanation) -> str | None:
    """One short sentence over all flags, e.g. 'inter σ collapsed to a dot (levels 1, 2); intra σ at its maximum
    (level 2)'; None when σ looks healthy."""
    words = {"collapsed": "σ collapsed to a dot", "saturated": f"σ stuck at its maximum {SIGMA_HIGH:.0f}",
             "untrained": "σ never trained"}
    groups: dict[tuple[str, str], list[int]] = {}
    for flag in sigma_flags(explanation):
        groups.setdefault((flag.branch, flag.kind), []).append(flag.level + 1)
    if not groups:
        return None
    return "; ".join(f"{branch} {words[kind]} (level{'s' if len(levels) > 1 else ''} {', '.join(map(str, levels))})"
                     for (branch, kind), levels in groups.items())


def patch_sigma_note(sigma: tuple[float, float], branch: str) -> str | None:
    """A short warning for one patch's σ (row, column), or None."""
    if max(sigma) < COLLAPSED_BELOW:
        return f"{branch} σ ≈ {max(sigma):.1g}: the target is a single dot"
    if min(sigma) > SIGMA_HIGH - SATURATED_WITHIN:
        return f"{branch} σ at its maximum ({SIGMA_HIGH:.1f})"
    return None
