"""What an ablation variant is (paper Table 4, official ``EncoderLayer``): the one place that says it.

Every other module asks a ``Variant`` instead of comparing variant names, so the forward pass, the losses
and the score cannot disagree about what "intra" means.

- ``full``: layer ``LN(Z_intra - Z_inter)`` (official; the skip cancels) or ``LN(x + Z_intra - Z_inter)``
  (``residual_cancellation=False``); losses: reconstruction, intra, inter; product score ``rec * w(Div_inter)``.
- ``intra``: layer ``LN(x + Z_intra)``; losses: reconstruction, intra; product score
  ``rec * softmax(-Div_intra)``.
- ``inter``: layer ``LN(x + Z_inter)``; losses: reconstruction, inter; product score ``rec * w(Div_inter)``.
- ``reconstruction``: layer ``LN(x + SelfAttention(x))``, a plain transformer; loss: reconstruction; score
  ``rec``.

``w`` is the ``score_weight`` switch (paper Eq. 12 ``1 - p`` or the official ``max(p) - p``, with
``p = softmax(-Div)`` over the image's tokens). The intra direction is reversed: the intra correlation is trained
*away* from its local prior, so a normal patch has a *large* intra divergence and a defect a small one; the
official code therefore weights by ``softmax(-Div_intra)``, which is large where the divergence is small.
Only ``full`` and ``inter`` build the reference embedding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A network/score variant: which correlation branches exist, are trained and are scored."""

    name: str
    intra: bool  # intra-correlation branch (self-attention with a learnable local prior and its minimax losses)
    inter: bool  # inter-correlation branch (cross-attention to the embedded reference features)

    @property
    def plain_self_attention(self) -> bool:
        """Reconstruction-only: a plain self-attention transformer, no correlation branch at all."""
        return not (self.intra or self.inter)

    @property
    def uses_reference(self) -> bool:
        """Only the inter branch reads the reference features (and has a reference embedding)."""
        return self.inter

    @property
    def single_branch(self) -> bool:
        """One attention per layer, with the residual kept: ``LN(x + A(x))``."""
        return not (self.intra and self.inter)

    @property
    def product_divergence(self) -> str | None:
        """Which divergence weights the reconstruction error in the product score: 'inter', 'intra' or None."""
        if self.inter:
            return "inter"
        return "intra" if self.intra else None


VARIANTS: dict[str, Variant] = {
    "full": Variant("full", intra=True, inter=True),
    "reconstruction": Variant("reconstruction", intra=False, inter=False),
    "intra": Variant("intra", intra=True, inter=False),
    "inter": Variant("inter", intra=False, inter=True),
}


def get_variant(name: str) -> Variant:
    """The ``Variant`` called ``name``; ValueError for an unknown one."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {name!r}") from None
