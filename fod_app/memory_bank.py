"""Nearest good patch: a memory bank of good training tokens and each token's distance to it.

Not part of FOD. PatchCore (Roth et al., CVPR 2022) scores a patch by its distance to the nearest patch of the
good training images; FOD Inspector adds that distance as a fourth score branch next to FOD's reconstruction
error and correlation divergences (``fod_app.scoring``), on the tokens ``FODModel.bank_queries`` gives (by default
exactly PatchCore's patch feature: raw stride-8 and upsampled stride-16 backbone features, one bank on the finest
level; older models: a bank per level of standardised features). Whether
(and with which other branches) it enters the score is chosen per model by the label-free self-check. The bank is
a greedy k-center coreset (Sener & Savarese 2018, as in PatchCore and anomalib) picked in a seeded random
projection; it is stored in the model (a buffer, saved with the weights).

A model may instead search near each patch's own position (``fod_app.bank_search`` chooses): its **place bank**
(L, R, D) holds, for each of the L positions, a greedy coreset of the good patches within ``PLACE_RADIUS`` cells of
it (``place_bank``), and ``place_distance`` searches only the patch's own row of it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Candidate tokens the coreset is picked from (a seeded random subset when there are more): bounds the
#: O(bank x candidates) cost of the greedy selection. Chosen without test labels by ``bench/bank_probe.py`` (the
#: branch's self-check AUROC): 262 144 beat 65 536 on magnetic tile (0.930 vs 0.920; bank built in 31 s vs 11 s on
#: 2 cores) and ELPV (0.986 vs 0.981; 23 s vs 11 s).
MAX_CANDIDATES = 262144
#: Dimensions of the random projection the coreset is picked in. 64, not PatchCore's 128: picking 2048 rows of
#: 205k joint (152-dim) tokens took 9.8 s at 64 vs 27.8 s at 128 on 2 cores (the projected candidates then stay in
#: cache); the branch's self-check AUROC with each is in BENCHMARKS.md ("Joint bank features").
PROJECTION_DIM = 64
#: Bank rows per distance chunk: (B*L, chunk) float32 temporaries stay below ~70 MB at batch 8, L = 1024 (2048 rows
#: measured as fast as 1024 and faster than 4096 or more on 2 cores).
BANK_CHUNK = 2048
#: Neighbourhood of the positional search (``place_bank``), in stride-8 grid cells (1: a 3 x 3 neighbourhood, +-8 px
#: at 256 px). r = 1 and r = 2 measured alike on magnetic tile (BENCHMARKS.md "The nearest good patch searched near
#: its own position"); the smaller one keeps the bank's candidates few.
PLACE_RADIUS = 1
#: Good patches kept per position: one per training image, at least ``PLACE_ROWS`` and at most ``MAX_PLACE_ROWS``
#: (``place_rows``). 32 kept the full local search's figures on the few-shot sets (BENCHMARKS.md "Sixteenth
#: session"); on full magnetic tile (648 images) 256 rows from all images came within 0.003 of it, 128 within 0.009,
#: and any bank from a 256-image subset lost 0.04 ("Eighteenth session"): the images matter, then the rows.
PLACE_ROWS = 32
#: Largest place bank per position (160 MB at 1024 positions x 152 channels; tampered bundles are refused above it).
MAX_PLACE_ROWS = 256
#: Training images a place bank is picked from (a seeded subset above it): bounds its tokens to ~640 MB.
MAX_PLACE_IMAGES = 1024
#: Positions whose greedy coreset is picked at once. Four keep the projected candidates of 648 images (4 x 5832 x
#: 64 float32, 6 MB) in cache: 30 s for 256 rows instead of 302 s with a whole grid row at once (2 cores; 15 s since
#: ``place_bank`` reuses its buffers).
PLACE_CHUNK = 4


@torch.inference_mode()
def greedy_coreset(features: Tensor, n: int, projection_dim: int = PROJECTION_DIM, seed: int = 0) -> Tensor:
    """Indices (n,) of a greedy k-center coreset of ``features`` (N, D), picked in a random projection.

    Start: a seeded random row; then repeatedly the row farthest from all picked ones. Squared distances to the
    newest pick c are ``|z|^2 + [z, 1] . [-2c, |c|^2]``: one matrix-vector product per pick (few, large ops, which
    matters on a busy 2-core CPU); ``min_d`` (N,) is updated in place.
    """
    g = torch.Generator().manual_seed(seed)
    n_points, dim = features.shape
    n = max(1, min(n, n_points))
    z = features.float()
    if dim > projection_dim:
        projection = torch.randn(dim, projection_dim, generator=g) / math.sqrt(projection_dim)
        z = z @ projection.to(z.device)
    sq_norms = (z * z).sum(1)
    z_aug = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)  # (N, d + 1)
    del z
    min_d = torch.full((n_points,), math.inf, device=features.device)
    selected = torch.empty(n, dtype=torch.long, device=features.device)
    idx = torch.randint(n_points, (1,), generator=g).to(features.device)
    for i in range(n):
        selected[i] = idx[0]
        c = z_aug.index_select(0, idx)[0]
        c = torch.cat([-2.0 * c[:-1], sq_norms.index_select(0, idx)])
        torch.minimum(min_d, torch.addmv(sq_norms, z_aug, c), out=min_d)
        min_d.index_fill_(0, idx, 0.0)  # never pick the same row twice (rounding)
        idx = torch.argmax(min_d).view(1)
    return selected


def candidate_rows(n_tokens: int, seed: int, max_candidates: int | None = None) -> Tensor:
    """Sorted indices of the tokens a coreset is picked from: all ``n_tokens``, or a seeded random subset of
    ``max_candidates`` (default ``MAX_CANDIDATES``) of them. Callers that gather tokens batch by batch use it to
    materialise only these."""
    max_candidates = MAX_CANDIDATES if max_candidates is None else max_candidates
    if n_tokens <= max_candidates:
        return torch.arange(n_tokens)
    return torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))[:max_candidates].sort().values


@torch.inference_mode()
def build_bank(tokens: Tensor, size: int, seed: int = 0, max_candidates: int | None = None,
               projection_dim: int = PROJECTION_DIM) -> Tensor:
    """Memory bank (M, C), M = min(size, N), of good tokens (N, C): a greedy coreset of the ``candidate_rows``."""
    if size <= 0 or tokens.shape[0] == 0:
        return tokens.new_zeros((0, tokens.shape[-1]))
    rows = candidate_rows(tokens.shape[0], seed, max_candidates)
    candidates = tokens if len(rows) == tokens.shape[0] else tokens[rows.to(tokens.device)]
    if candidates.shape[0] <= size:
        return candidates.float().clone()
    return candidates[greedy_coreset(candidates, size, projection_dim, seed)].float().contiguous()


def nearest_distance(queries: Tensor, bank: Tensor, chunk: int = BANK_CHUNK) -> Tensor:
    """Euclidean distance of each query (..., C) to its nearest bank row (M, C): (...).

    The nearest row is the argmin of ``|b|^2 - 2 q.b`` (``|q|^2`` is the same for every row, so it is left out), one
    fused ``addmm`` per bank chunk (not ``torch.cdist``, so that it also traces to ONNX); memory stays bounded. The
    distance to that row is then computed directly, which avoids the cancellation error of the matmul form (scores
    then do not depend on the batch they were computed in). Measured on 2 cores, 1024 queries x 8192 rows x 152
    dims: half the time of the unfused ``|q|^2 - 2 q.b + |b|^2`` in 1024-row chunks.
    """
    shape = queries.shape[:-1]
    q = queries.float().reshape(-1, queries.shape[-1])  # (N, C)
    best = best_index = None
    for start in range(0, bank.shape[0], chunk):
        part = bank[start : start + chunk].float()
        smallest, index = torch.addmm((part * part).sum(-1), q, part.T, alpha=-2.0).min(-1)  # (N,) each
        index = index + start
        if best is None:
            best, best_index = smallest, index
        else:
            better = smallest < best
            best = torch.where(better, smallest, best)
            best_index = torch.where(better, index, best_index)
    if best_index is None:
        raise ValueError("the memory bank is empty")
    nearest = bank.float()[best_index]  # (N, C)
    return (q - nearest).pow(2).sum(-1).sqrt().reshape(shape)


@torch.inference_mode()
def place_bank(tokens: Tensor, rows: int = PLACE_ROWS, seed: int = 0, radius: int = PLACE_RADIUS) -> Tensor:
    """(H * W, R, D) place bank of good tokens (M, H, W, D): per position, a greedy k-center coreset (seeded random
    projection, as ``greedy_coreset``) of the M * (2r+1)^2 tokens within ``radius`` cells of it (edges
    padded by repetition), ordered (image, row, column); R = min(rows, candidates).

    Not ``greedy_coreset``, which picks from one set of rows: this runs the same greedy rule for ``PLACE_CHUNK``
    positions of a grid row at once (one small op per pick and chunk instead of per pick and position), gathers
    only those positions' candidates and reuses two buffers for every pick. Measured on 648 images x 256 rows
    (2 cores): 15 s and 0.33 GB above the tokens, against 27-41 s and 1.8 GB when each pick allocated its
    temporaries and a grid row's candidates were unfolded at once (the same rows, bit for bit).
    """
    m, height, width, dim = tokens.shape
    k = 2 * radius + 1
    generator = torch.Generator().manual_seed(seed)
    device = tokens.device
    projection = (torch.randn(dim, PROJECTION_DIM, generator=generator) / math.sqrt(PROJECTION_DIM)).to(device)
    n_candidates = m * k * k
    n_rows = min(rows, n_candidates)
    offsets = range(-radius, radius + 1)
    bank = torch.empty((height * width, n_rows, dim), device=device)
    difference = torch.empty((PLACE_CHUNK, n_candidates, PROJECTION_DIM), device=device)
    distance = torch.empty((PLACE_CHUNK, n_candidates), device=device)
    for i in range(height):
        near = tokens[:, [min(max(i + d, 0), height - 1) for d in offsets]]  # (M, k, W, D)
        for lo in range(0, width, PLACE_CHUNK):
            columns = torch.tensor([[min(max(j + e, 0), width - 1) for e in offsets]
                                    for j in range(lo, min(lo + PLACE_CHUNK, width))], device=device)  # (P, k)
            p = columns.shape[0]
            # (M, k, P, k, D) -> (P, M * k * k, D): each position's candidates
            chunk = near[:, :, columns].permute(2, 0, 1, 3, 4).reshape(p, n_candidates, dim).float()
            z = chunk @ projection  # (P, C, 64)
            places = torch.arange(p, device=device)
            min_d = torch.full((p, n_candidates), math.inf, device=device)
            index = torch.zeros(p, dtype=torch.long, device=device)
            chosen = torch.empty((p, n_rows), dtype=torch.long, device=device)
            diff, dist = difference[:p], distance[:p]
            for r in range(n_rows):
                chosen[:, r] = index
                torch.sub(z, z[places, index][:, None], out=diff)
                torch.sum(diff.square_(), -1, out=dist)
                torch.minimum(min_d, dist, out=min_d)
                index = min_d.argmax(1)
            bank[i * width + lo : i * width + lo + p] = chunk[places[:, None], chosen]
    return bank


def place_rows(n_images: int) -> int:
    """Rows per position of the place bank of ``n_images`` training images: one per image, between ``PLACE_ROWS``
    and ``MAX_PLACE_ROWS``."""
    return min(MAX_PLACE_ROWS, max(PLACE_ROWS, n_images))


def place_distance(queries: Tensor, bank: Tensor) -> Tensor:
    """Distance of each query token (B, L, D) to the nearest row of its own position's bank (L, R, D): (B, L).

    The nearest row is the argmin of ``|b|^2 - 2 q.b`` (one batched matmul over positions; traces to ONNX), and
    the distance to it is then computed directly, as ``nearest_distance`` does (no cancellation error).
    """
    q = queries.float().transpose(0, 1)  # (L, B, D)
    rows = bank.float()
    # |b|^2 as a norm reduction, not (rows * rows).sum(-1): that allocated and read a bank-sized temporary, 49 of the
    # 61 ms of a batch-1 search in a 1024 x 256 x 152 bank (2 cores); this takes 4 ms (same values to ~4e-7)
    squared_norms = torch.linalg.vector_norm(rows, dim=-1).square()  # (L, R)
    index = torch.baddbmm(squared_norms.unsqueeze(1), q, rows.transpose(1, 2), alpha=-2.0).argmin(-1)
    nearest = torch.gather(rows, 1, index.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))  # (L, B, D)
    return (q - nearest).pow(2).sum(-1).sqrt().transpose(0, 1)
