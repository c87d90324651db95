"""Reference PatchCore (Roth et al., CVPR 2022) on FOD's frozen backbone: a benchmark baseline, not a product feature.

* Patch features: the backbone's stride-16 map is upsampled (bilinear) to the stride-8 grid and concatenated with the
  stride-8 map, giving one ``C8 + C16``-dim feature per stride-8 cell. The backbone's 3x3 average pooling plays the role
  of PatchCore's local neighbourhood aggregation; there is no channel reduction (152 dims for EfficientNet-Lite0).
* Memory bank: greedy k-center coreset (Sener & Savarese 2018) of the training patches, ``coreset_ratio`` of them (at
  least 1), selected on a seeded Gaussian random projection to ``projection_dim`` dims (as the official code and
  anomalib do); the bank keeps the full features.
* Scoring: Euclidean distance of each test patch to its nearest bank patch, map upsampled to the image size (bilinear,
  align_corners=True), Gaussian-smoothed (sigma 4) with FOD's own ``gaussian_smooth``; image score = max of the map.
  This is FOD's post-processing, so both methods differ only in the patch scores. (The paper's image-score
  re-weighting by the nearest patch's neighbourhood is left out for the same reason.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from fod_app.backbone import FeatureExtractor
from fod_app.memory_bank import greedy_coreset, nearest_distance
from fod_app.scoring import gaussian_smooth


class PatchCore:
    """PatchCore on a frozen :class:`FeatureExtractor`; ``fit`` on good images, then ``score_batch``."""

    def __init__(
        self,
        backbone: FeatureExtractor,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        seed: int = 0,
        smoothing_sigma: float = 4.0,
    ) -> None:
        self.backbone = backbone
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.smoothing_sigma = smoothing_sigma
        self.memory_bank: Tensor | None = None  # (M, D)
        self.bank_sources: Tensor | None = None  # (M,) index of the training image each bank row came from
        self.n_patches = 0  # training patches the coreset was drawn from

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.inference_mode()
    def embed(self, batch: Tensor) -> Tensor:
        """(B, 3, S, S) in [0, 1] -> patch features (B, D, S/8, S/8), D = sum of the levels' channels."""
        levels = [f.float() for f in self.backbone(batch.to(self.device))]
        grid = levels[0].shape[-2:]
        resized = [levels[0]] + [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in levels[1:]]
        return torch.cat(resized, dim=1)

    @torch.inference_mode()
    def fit(self, images: Sequence[np.ndarray], batch_size: int = 16) -> PatchCore:
        """Build the memory bank from good images ((3, S, S) float arrays in [0, 1])."""
        patches = torch.empty(0)
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.stack(images[start : start + batch_size]), dtype=torch.float32)
            emb = self.embed(batch).permute(0, 2, 3, 1)  # (B, H, W, D)
            per_image = emb.shape[1] * emb.shape[2]
            if start == 0:  # (N * H * W, D), filled batch by batch (no second copy)
                patches = torch.empty(len(images) * per_image, emb.shape[3], device=emb.device)
            patches[start * per_image : start * per_image + emb[..., 0].numel()] = emb.reshape(-1, emb.shape[3])
        self.n_patches = len(patches)
        n_keep = max(1, int(self.coreset_ratio * len(patches)))
        rows = greedy_coreset(patches, n_keep, self.projection_dim, self.seed)
        self.memory_bank = patches[rows].contiguous()
        self.bank_sources = torch.div(rows, len(patches) // len(images), rounding_mode="floor")
        return self

    @torch.inference_mode()
    def score_batch(self, batch: Tensor, bank: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) in [0, 1] -> (smoothed anomaly maps (B, S, S), image scores (B,)), raw distance units.

        ``bank``: search these rows instead of the memory bank (e.g. the bank without one image's rows).
        """
        if self.memory_bank is None:
            raise RuntimeError("PatchCore.fit must be called first")
        emb = self.embed(batch)
        b, d, h, w = emb.shape
        bank = self.memory_bank if bank is None else bank
        dist = nearest_distance(emb.permute(0, 2, 3, 1).reshape(-1, d), bank).view(b, 1, h, w)
        size = batch.shape[-2:]
        maps = F.interpolate(dist, size=size, mode="bilinear", align_corners=True)[:, 0]
        maps = gaussian_smooth(maps, self.smoothing_sigma)
        return maps, maps.flatten(1).amax(1)
