"""The FOD model: per feature level, a transformer of I2Correlation blocks (paper §3, spec §3-4).

A plain ``torch.nn.Module`` that knows nothing about training loops, data or UIs.
Shapes: ``B`` batch, ``L = H*W`` tokens of one level, ``C`` backbone channels, ``d`` model width,
``h`` heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .config import FODConfig
from .correlation import sigma_from_projection, softmax_scores_
from .memory_bank import nearest_distance, place_distance


def positional_encoding_2d(d_model: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (spec §3): (L, d), first half columns, second half rows."""
    height, width = grid
    half = d_model // 2
    omega = torch.exp(-torch.arange(0, half, 2, dtype=torch.float32) * math.log(10000.0) / half)
    rows = torch.arange(height, dtype=torch.float32).repeat_interleave(width)
    cols = torch.arange(width, dtype=torch.float32).repeat(height)
    enc = torch.zeros(height * width, d_model)
    enc[:, 0:half:2] = torch.sin(cols[:, None] * omega)
    enc[:, 1:half:2] = torch.cos(cols[:, None] * omega)
    enc[:, half::2] = torch.sin(rows[:, None] * omega)
    enc[:, half + 1 :: 2] = torch.cos(rows[:, None] * omega)
    return enc


class TokenEmbedding(nn.Module):
    """Token-wise linear map C -> d plus the fixed 2-D position embedding (``position=False``: without it).
    (B, L, C) -> (B, L, d)."""

    def __init__(self, in_channels: int, d_model: int, grid: tuple[int, int], position: bool = True) -> None:
        super().__init__()
        self.projection = nn.Linear(in_channels, d_model)
        nn.init.kaiming_normal_(self.projection.weight, mode="fan_in", nonlinearity="leaky_relu")
        encoding = positional_encoding_2d(d_model, grid) if position else torch.zeros(grid[0] * grid[1], d_model)
        self.register_buffer("position", encoding, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(tokens) + self.position


@dataclass
class BranchState:
    """One branch (intra or inter) of one layer: correlation (B, h, l, L) and sigma (B, h, l, 2).

    ``rows`` (l,) are the grid indices of the query rows held, or None for all L rows in order.
    """

    correlation: torch.Tensor
    sigma: torch.Tensor
    rows: torch.Tensor | None = None


class CorrelationAttention(nn.Module):
    """One I2Correlation attention: correlation ``S = softmax(QK^T/sqrt(dh))`` and learnable sigma.

    Used as intra-correlation (keys/values from the image itself) or inter-correlation (keys/values
    from the embedded reference features). sigma comes from the raw query input x (spec §4.1).
    """

    def __init__(self, d_model: int, n_heads: int, use_out_projection: bool = False, prior: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        # The learnable prior's width; absent in the plain self-attention of the reconstruction-only variant.
        self.sigma_projection = nn.Linear(d_model, 2 * n_heads) if prior else None
        self.out_projection = nn.Linear(d_model, d_model) if use_out_projection else None

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        rows: torch.Tensor | None = None,
        with_correlation: bool = True,
    ) -> tuple[torch.Tensor, BranchState | None]:
        """x: (B, L, d), source: (B or 1, S, d) -> (Z (B, L, d), BranchState or None).

        ``rows=None`` materialises the full correlation (B, h, L, S) and computes Z from it (exact,
        the official computation). With ``rows`` (l,) given, Z comes from fused attention and only
        those query rows of the correlation are materialised: (B, h, l, S). With
        ``with_correlation=False`` no correlation is returned (inference of a branch that is unused).
        """
        batch, length, d_model = x.shape
        heads = self.n_heads
        head_dim = d_model // heads
        q = self.query(x).view(batch, length, heads, head_dim).transpose(1, 2)
        k = self.key(source).view(source.shape[0], -1, heads, head_dim).transpose(1, 2)
        v = self.value(source).view(source.shape[0], -1, heads, head_dim).transpose(1, 2)
        scale = 1.0 / math.sqrt(head_dim)
        state = None
        with_correlation = with_correlation and self.sigma_projection is not None
        if with_correlation and rows is None:
            # scaled in place (a fresh (B, h, L, L) buffer each way costs as much as the softmax on CPU)
            correlation = softmax_scores_(torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale))
            z = torch.matmul(correlation.to(v.dtype), v)
            sigma = self.sigma(x)
            state = BranchState(correlation, sigma)
        else:
            if k.shape[0] != batch:
                k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
            z = F.scaled_dot_product_attention(q, k, v)
            if with_correlation:
                q_rows = q.index_select(2, rows)
                correlation = torch.softmax(torch.matmul(q_rows, k.transpose(-1, -2)).float().mul_(scale), dim=-1)
                state = BranchState(correlation, self.sigma(x.index_select(1, rows)), rows)
        z = z.transpose(1, 2).reshape(batch, length, d_model)
        if self.out_projection is not None:
            z = self.out_projection(z)
        return z, state

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token, per-head target widths from the raw input: (B, l, d) -> (B, h, l, 2)."""
        if self.sigma_projection is None:
            raise RuntimeError("this attention has no learnable prior (plain self-attention)")
        raw = self.sigma_projection(x).view(x.shape[0], x.shape[1], self.n_heads, 2).float()
        return sigma_from_projection(raw)


class I2CorrelationBlock(nn.Module):
    """Encoder layer of one variant (see ``fod_app.variants``), then ``LN(z + FFN(z))``.

    full: ``z = LN(Z_intra - Z_inter)`` (official; the skip cancels) or ``LN(x + Z_intra - Z_inter)``;
    intra / inter: ``z = LN(x + Z_branch)``; reconstruction: ``z = LN(x + SelfAttention(x))``.
    """

    def __init__(self, config: FODConfig, d_model: int) -> None:
        super().__init__()
        variant = config.branches
        heads, out_proj = config.n_heads, config.use_out_projection
        self.keep_residual = variant.single_branch or not config.residual_cancellation
        self.intra_correlation = CorrelationAttention(d_model, heads, out_proj) if variant.intra else None
        self.inter_correlation = CorrelationAttention(d_model, heads, out_proj) if variant.inter else None
        self.self_attention = (
            CorrelationAttention(d_model, heads, out_proj, prior=False) if variant.plain_self_attention else None
        )
        self.norm_fusion = nn.LayerNorm(d_model)
        self.feed_forward = nn.Sequential(
            nn.Linear(d_model, config.ffn_scale * d_model),
            nn.GELU(),
            nn.Linear(config.ffn_scale * d_model, d_model),
        )
        self.norm_output = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        reference: torch.Tensor | None,
        rows: torch.Tensor | None = None,
        with_intra: bool = True,
        with_inter: bool = True,
    ) -> tuple[torch.Tensor, BranchState | None, BranchState | None]:
        """x: (B, L, d), reference: (1, L, d) or None -> (x', intra state, inter state); see CorrelationAttention.

        A branch's state is None when the variant has no such branch or it was not asked for.
        """
        intra = inter = None
        fused = torch.zeros_like(x)
        if self.intra_correlation is not None:
            z_intra, intra = self.intra_correlation(x, x, rows, with_intra)
            fused = fused + z_intra
        if self.inter_correlation is not None:
            if reference is None:
                raise ValueError("the inter branch needs the reference features")
            z_inter, inter = self.inter_correlation(x, reference, rows, with_inter)
            # Full FOD fuses Z_intra - Z_inter; a single inter branch keeps its own sign, LN(x + Z_inter).
            fused = fused - z_inter if self.intra_correlation is not None else fused + z_inter
        if self.self_attention is not None:
            fused = fused + self.self_attention(x, x, None, False)[0]
        if self.keep_residual:  # paper Eq. 1 LN(I2Corr(X) + X); single-branch layers always keep it
            fused = fused + x
        fused = self.norm_fusion(fused)
        out = self.norm_output(fused + self.feed_forward(fused))
        return out, intra, inter


@dataclass
class LevelOutput:
    """Output of one level: reconstruction (B, L, C) and per-layer intra/inter branch states."""

    reconstruction: torch.Tensor | None  # None when the transformer was skipped (``with_reconstruction=False``)
    intra: list[BranchState]
    inter: list[BranchState]
    tokens: torch.Tensor  # (B, L, C) the (normalised) input tokens = the reconstruction target
    nearest: torch.Tensor | None = None  # (B, L) distance to the nearest good training token (eval, with a bank)


class FODLevel(nn.Module):
    """The FOD transformer of one feature level; holds that level's reference features (L, C)."""

    def __init__(self, config: FODConfig, in_channels: int, d_model: int, grid: tuple[int, int],
                 bank_channels: int | None = None) -> None:
        super().__init__()
        self.grid = grid
        self.input_embedding = TokenEmbedding(in_channels, d_model, grid)
        self.uses_reference = config.branches.uses_reference
        if self.uses_reference:  # only the inter branch reads the per-position mean training features
            self.reference_embedding = TokenEmbedding(in_channels, d_model, grid, config.reference_position)
            self.register_buffer("reference_features", torch.zeros(grid[0] * grid[1], in_channels))
        # Per-channel feature standardisation (identity unless config.normalize_features).
        self.register_buffer("feature_mean", torch.zeros(in_channels))
        self.register_buffer("feature_std", torch.ones(in_channels))
        # Good training bank tokens (M, D) (``FODModel.bank_queries``, ``fod_app.memory_bank``); empty: no such branch.
        self.register_buffer("patch_bank", torch.zeros(0, bank_channels or in_channels))
        # Per-position banks (L, R, D) (``memory_bank.place_bank``): when not empty, the nearest good patch is searched
        # only among this position's rows (``fod_app.bank_search``); empty (0, 0, D): searched in ``patch_bank``.
        self.register_buffer("place_bank", torch.zeros(0, 0, bank_channels or in_channels))
        self.blocks = nn.ModuleList(I2CorrelationBlock(config, d_model) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.output_projection = nn.Linear(d_model, in_channels)

    def forward(
        self,
        tokens: torch.Tensor,
        rows: torch.Tensor | None = None,
        with_intra: bool = True,
        with_inter: bool = True,
        with_nearest: bool = True,
        bank_queries: torch.Tensor | None = None,
        with_reconstruction: bool = True,
    ) -> LevelOutput:
        """tokens: (B, L, C) avg-pooled backbone features -> LevelOutput.

        rows: query rows whose correlations are kept (None: all); with_intra / with_inter: whether
        that branch's correlations are materialised at all (the forward values are the same); with_nearest: whether
        a level with a patch bank gives each token's distance to its nearest bank token (``nearest``);
        bank_queries: (B, L, D) the tokens in the bank's space (None: this level's normalised tokens);
        with_reconstruction: False skips the transformer (a score of the nearest distance alone needs none of it):
        no reconstruction, no correlations.
        """
        tokens = self.normalize(tokens)
        nearest = None
        if with_nearest and self.has_bank:
            queries = tokens if bank_queries is None else bank_queries
            nearest = (place_distance(queries, self.place_bank) if self.place_bank.shape[0]
                       else nearest_distance(queries, self.patch_bank))
        if not with_reconstruction:
            return LevelOutput(None, [], [], tokens, nearest)
        x = self.input_embedding(tokens)
        reference = None
        if self.uses_reference:
            reference = self.reference_embedding(self.normalize(self.reference_features).to(tokens.dtype)).unsqueeze(0)
        intra: list[BranchState] = []
        inter: list[BranchState] = []
        for block in self.blocks:
            x, intra_state, inter_state = block(x, reference, rows, with_intra, with_inter)
            if intra_state is not None:
                intra.append(intra_state)
            if inter_state is not None:
                inter.append(inter_state)
        return LevelOutput(self.output_projection(self.final_norm(x)), intra, inter, tokens, nearest)

    @property
    def has_bank(self) -> bool:
        """Whether this level gives a nearest-good-patch distance (a global or a per-position bank)."""
        return bool(self.patch_bank.shape[0] or self.place_bank.shape[0])

    @property
    def nearest_search(self) -> str | None:
        """Where this level's nearest good patch is searched: "positional", "global", or None (no bank)."""
        return "positional" if self.place_bank.shape[0] else "global" if self.patch_bank.shape[0] else None

    def normalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., C) raw features -> standardised features (identity with the default statistics)."""
        return (tokens - self.feature_mean) / self.feature_std


class FODModel(nn.Module):
    """FOD over several feature levels (strides 8 and 16 by default): one ``FODLevel`` per level."""

    def __init__(self, config: FODConfig, channels: list[int], strides: list[int]) -> None:
        super().__init__()
        if len(config.d_models) != len(channels):
            raise ValueError(f"config has {len(config.d_models)} levels, backbone gives {len(channels)}")
        self.config = config
        self.channels = list(channels)
        self.strides = list(strides)
        self.grids = [(config.image_size // s, config.image_size // s) for s in strides]
        bank_channels = sum(channels) if config.bank_features in ("joint", "patchcore") else None
        self.levels = nn.ModuleList(
            FODLevel(config, c, d, grid, bank_channels) for c, d, grid in zip(channels, config.d_models, self.grids)
        )

    def set_reference_features(
        self, reference: list[torch.Tensor], statistics: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> None:
        """Store per-position mean training features, one (L, C) tensor per level, and optionally the
        per-channel (mean, std) used to standardise that level's features, each (C,)."""
        for i, (level, ref) in enumerate(zip(self.levels, reference)):
            expected = (level.grid[0] * level.grid[1], level.feature_mean.shape[0])
            if tuple(ref.shape) != expected:
                raise ValueError(f"reference shape {tuple(ref.shape)} != {expected}")
            if level.uses_reference:
                level.reference_features.copy_(ref)
            if statistics is not None:
                mean, std = statistics[i]
                level.feature_mean.copy_(mean)
                level.feature_std.copy_(std.clamp_min(1e-6))

    def set_patch_banks(self, banks: list[torch.Tensor]) -> None:
        """Store each level's memory bank of normalised good tokens (M_l, C_l); (0, C_l) removes it."""
        for level, bank in zip(self.levels, banks):
            if bank.ndim != 2 or bank.shape[1] != level.patch_bank.shape[1]:
                raise ValueError(f"patch bank {tuple(bank.shape)} does not fit {level.patch_bank.shape[1]} channels")
            level.patch_bank = bank.detach().to(level.feature_mean.device, torch.float32).contiguous()

    def resize_patch_banks(self, sizes: list[int]) -> None:
        """Make room for banks of ``sizes[l]`` rows (before ``load_state_dict`` of a saved model)."""
        self.set_patch_banks([level.patch_bank.new_zeros((n, level.patch_bank.shape[1]))
                              for level, n in zip(self.levels, sizes)])

    def set_place_banks(self, banks: list[torch.Tensor]) -> None:
        """Store each level's per-position banks (L_l, R, D) (``memory_bank.place_bank``); (0, 0, D) removes them
        (the nearest good patch is then searched in the level's ``patch_bank``)."""
        for level, bank in zip(self.levels, banks):
            n_tokens, dim = level.grid[0] * level.grid[1], level.place_bank.shape[-1]
            if bank.ndim != 3 or bank.shape[-1] != dim or (bank.shape[0] and bank.shape[0] != n_tokens):
                raise ValueError(f"place bank {tuple(bank.shape)} does not fit {n_tokens} positions x {dim} channels")
            level.place_bank = bank.detach().to(level.feature_mean.device, torch.float32).contiguous()

    def resize_place_banks(self, shapes: list[tuple[int, int]]) -> None:
        """Make room for place banks of (positions, rows) ``shapes[l]`` (before ``load_state_dict``)."""
        self.set_place_banks([level.place_bank.new_zeros((n, r, level.place_bank.shape[-1]))
                              for level, (n, r) in zip(self.levels, shapes)])

    def forward(
        self,
        features: list[torch.Tensor],
        with_intra: bool = True,
        with_inter: bool = True,
        with_nearest: bool = True,
        with_reconstruction: bool = True,
    ) -> list[LevelOutput]:
        """features: per level (B, C, H, W) avg-pooled maps -> per level LevelOutput (all rows); the flags as in
        ``FODLevel.forward``."""
        queries: list[torch.Tensor | None] = [None] * len(self.levels)
        if with_nearest and any(level.has_bank for level in self.levels):
            queries = self.bank_queries(features)
        return [level(to_tokens(f), None, with_intra, with_inter, with_nearest, q, with_reconstruction)
                for level, f, q in zip(self.levels, features, queries)]

    def bank_queries(self, features: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """What the patch banks hold and are searched with, per level (B, L_l, D); None: that level has no bank.

        ``bank_features`` "level": the level's own standardised tokens (D = C_l); "joint": every level's standardised
        map resampled to this level's grid (finer levels average-pooled, coarser ones bilinear) and concatenated
        (D = sum C): on the stride-8 grid, PatchCore's multi-scale patch feature, so a patch must look good at
        both scales at once; "patchcore": that feature of the *raw* maps, on the finest grid only (bank on level 0).
        """
        if self.config.bank_features == "patchcore":
            joint = torch.cat([resample(f, self.grids[0]) for f in features], dim=1)
            return [to_tokens(joint)] + [None] * (len(self.levels) - 1)
        maps = [(f - level.feature_mean[:, None, None]) / level.feature_std[:, None, None]
                for level, f in zip(self.levels, features)]
        if self.config.bank_features == "level":
            return [to_tokens(m) for m in maps]
        return [to_tokens(torch.cat([resample(m, grid) for m in maps], dim=1)) for grid in self.grids]


def resample(feature_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *grid): average-pooled down, bilinearly upsampled (as PatchCore), or unchanged."""
    if tuple(feature_map.shape[-2:]) == tuple(grid):
        return feature_map
    if feature_map.shape[-1] > grid[-1]:
        factor = feature_map.shape[-1] // grid[-1]
        if feature_map.shape[-1] == factor * grid[-1] and feature_map.shape[-2] == factor * grid[-2]:
            return F.avg_pool2d(feature_map, factor)  # the usual case (strides 8 -> 16); a plain op in ONNX
        return F.adaptive_avg_pool2d(feature_map, grid)
    return F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)


def to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major token order."""
    return feature_map.flatten(2).transpose(1, 2)


def reconstruction_error(tokens: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-token ``mean_c (X - X^)^2 + 1 - cos(X, X^)``: (B, L, C) x2 -> (B, L)."""
    mse = ((tokens - reconstruction) ** 2).mean(-1)
    return mse + 1.0 - F.cosine_similarity(reconstruction, tokens, dim=-1)


def create_model(config: FODConfig, channels: list[int], strides: list[int]) -> FODModel:
    """Factory for ``FODModel`` (seeded from ``config.seed`` for reproducible initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return FODModel(config, channels, strides)
