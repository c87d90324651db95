"""Where the nearest good patch is searched: everywhere (PatchCore) or near the patch's own position (FOD's idea).

Not part of FOD's score. FOD's inter-image correlation compares each patch with the good images *at the same
position*; PatchCore's nearest-good-patch distance (the product's ``nearest`` branch, ``fod_app.memory_bank``)
searches every position of every good image. Searching only the good patches within ``PLACE_RADIUS`` grid cells of
the patch's own place is FOD's positional reference applied to that distance. Measured on the benchmark sets
(BENCHMARKS.md "The positional search, shipped"), it helps where what is good depends on where (magnetic-tile crops:
+0.011 to +0.026 test image AUROC in seven runs) and hurts where it does not (ELPV cells: -0.012 to -0.022).

Which one a model uses is chosen per model without labels (``choose``): a **leave-one-out self-check on the
training images** — each training image and synthetic defects cut from itself, scored against the *other*
training images only, once with each search — keeps the positional search only where it separates them better.
On 15 few-shot benchmark runs (parts moved at random included) it picked the better search on 12 and kept the
global one, at no cost, on the other 3 (BENCHMARKS.md "Sixteenth session"). The held-out self-check (4-5 images)
could not: it was wrong on 2 of 3 moved magnetic-tile runs.

A positional model stores a **place bank** (``memory_bank.place_bank``, (L, R, D)): for each of the L stride-8
positions a greedy k-center coreset of R good patches from its (2r+1)^2 neighbourhood, picked from all training images
(up to ``MAX_PLACE_IMAGES``), R one per image between 32 and 256 (``memory_bank.place_rows``): 20 MB and 5 M
multiply-adds per image for a few-shot set, 160 MB and 40 M for a large one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import metrics
from .memory_bank import MAX_PLACE_IMAGES, PLACE_RADIUS
from .scoring import gaussian_smooth, upsample_tokens
from .synthetic import KINDS, synthetic_defects

#: Training images the leave-one-out self-check uses (a seeded subset above it). Its cost grows with the square: on
#: 2 cores 4 s with 20 images and one defect each, 7 s with 27 (7-11 s with 20 and three defects each). With 20
#: instead of all 27 it chose the same search on four of five 32-image runs and a tie (global) on the fifth
#: (magnetic_tile@32 seeds 0-2, elpv_mono@32 seeds 0-1; label-free: choices compared with each other).
MAX_CHOICE_IMAGES = 20
#: Synthetic defects cut from each of them (one of each kind). With one, a 20-image check has 400 good/defect pairs
#: and tied on magnetic_tile@32 seed 0 (0.855 both); with three and with six the 12 few-shot benchmark runs chose
#: the same search on all 12 (label-free: choices compared with each other; BENCHMARKS.md "Eighteenth session").
DEFECTS_PER_IMAGE = 3
#: Above this many training images "auto" keeps the global search without a choice: the place bank is picked from at
#: most this many images (``memory_bank.MAX_PLACE_IMAGES``), and a bank from a subset of a large set lost to the
#: global search wherever it was measured (256 of 648 magnetic tiles: 0.90-0.93 vs 0.944-0.951). From all 648 images
#: it gained (full magnetic tile seeds 1 and 2, chosen by this check: 0.959 / 0.955 vs 0.946 / 0.944; BENCHMARKS.md
#: "Eighteenth session"). Was 32 until the place bank's build fitted the 3 GB memory target ("Nineteenth session").
MAX_POSITIONAL_IMAGES = MAX_PLACE_IMAGES


@dataclass
class SearchChoice:
    """What ``choose`` decided: the search, each search's leave-one-out self-check AUROC, the images it used."""

    search: str
    auroc: dict[str, float] = field(default_factory=dict)
    n_images: int = 0
    reason: str = ""  # why there was no choice ("" : chosen, or set in the configuration)

    def to_dict(self) -> dict[str, Any]:
        return {"search": self.search, "leave_one_out_auroc": dict(self.auroc), "n_images": self.n_images,
                **({"reason": self.reason} if self.reason else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchChoice:
        """From ``to_dict`` (a bundle's ``self_check.nearest_search``); malformed figures are dropped."""
        auroc = data.get("leave_one_out_auroc")
        auroc = {str(k): float(v) for k, v in auroc.items() if isinstance(v, (int, float))} if isinstance(
            auroc, dict) else {}
        n = data.get("n_images")
        return cls(str(data.get("search", "global")), auroc, int(n) if isinstance(n, int) else 0,
                   str(data.get("reason", ""))[:200])

    def describe(self) -> str:
        where = "near its own position" if self.search == "positional" else "anywhere in the good images"
        if not self.auroc:
            return f"The nearest good patch is searched {where} ({self.reason or 'set in the configuration'})."
        labels = {"global": "anywhere", "positional": "near its own position"}
        figures = ", ".join(f"{labels.get(name, name)} {value:.2f}" for name, value in self.auroc.items())
        return (f"The nearest good patch is searched {where}, chosen by a leave-one-out self-check on {self.n_images} "
                f"training images (AUROC {figures}).")


def defect_images(images: list[np.ndarray], seed: int, per_image: int = 1) -> list[np.ndarray]:
    """``per_image`` synthetic defects on each good image (3, S, S), cut from that image itself (kinds cycling), in
    order image 0's, image 1's, ...: the leave-one-out self-check's defects. Never from another training image, whose
    patches the search would find."""
    return [synthetic_defects([image], [image], 1, seed + i * per_image + k,
                              kinds=(KINDS[(i * per_image + k) % len(KINDS)],))[0][0]
            for i, image in enumerate(images) for k in range(per_image)]


def _global_leave_one_out(good: Tensor, queries: Tensor) -> Tensor:
    """(n, Q, L) distance of each query token (n, Q, L, D) of image i to the nearest token of the *other* good
    images (n, L, D) — all their tokens, no coreset."""
    n = good.shape[0]
    flat = queries.flatten(1, 2)  # (n, Q * L, D)
    q_sq = (flat * flat).sum(-1)
    out = torch.full(flat.shape[:2], math.inf, device=good.device)
    for j in range(n):  # one image's tokens per chunk: (Q * L, L) temporaries, the fastest chunk on 2 cores
        b = good[j]
        smallest = torch.baddbmm((b * b).sum(-1)[None, None], flat, b.T.expand(n, -1, -1), alpha=-2.0).amin(-1)
        smallest[j] = math.inf
        out = torch.minimum(out, smallest)
    return (out + q_sq).clamp_min(0).sqrt().reshape(queries.shape[:3])


def _positional_leave_one_out(good: Tensor, queries: Tensor, grid: tuple[int, int], radius: int) -> Tensor:
    """(n, Q, L) distance of each query token (n, Q, L, D) of image i to the nearest token of the other good images
    (n, L, D) within ``radius`` grid cells of its own position (all their tokens, no per-position coreset)."""
    n, n_queries, _, dim = queries.shape
    height, width = grid
    g = good.reshape(n, height, width, dim)
    q = queries.reshape(n, n_queries, height, width, dim)
    best = torch.full(q.shape[:4], math.inf, device=good.device)
    others = ~torch.eye(n, dtype=torch.bool, device=good.device)  # (i, j): j is another image than i
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            i0, i1, j0, j1 = max(0, -di), min(height, height - di), max(0, -dj), min(width, width - dj)
            a = q[:, :, i0:i1, j0:j1]  # (n, Q, h, w, D)
            b = g[:, i0 + di : i1 + di, j0 + dj : j1 + dj]  # (n, h, w, D)
            sq = ((a * a).sum(-1)[..., None] + (b * b).sum(-1).permute(1, 2, 0)[None, None]
                  - 2 * torch.einsum("iqhwd,jhwd->iqhwj", a, b))  # (n, Q, h, w, n)
            sq = sq.masked_fill(~others[:, None, None, None, :], math.inf)
            best[:, :, i0:i1, j0:j1] = torch.minimum(best[:, :, i0:i1, j0:j1], sq.amin(-1))
    return best.clamp_min(0).sqrt().flatten(2)


def _image_scores(distances: Tensor, grid: tuple[int, int], image_size: int, sigma: float) -> np.ndarray:
    """(N, L) token distances -> (N,) image scores as the product makes them: bilinear upsampling, smoothing, max."""
    maps = gaussian_smooth(upsample_tokens(distances.float(), grid, image_size), sigma)
    return maps.flatten(1).amax(1).cpu().numpy()


@torch.inference_mode()
def leave_one_out_scores(good: Tensor, defects: Tensor, grid: tuple[int, int], image_size: int, sigma: float,
                         radius: int = PLACE_RADIUS) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The leave-one-out self-check's labels and each search's image scores: every good training image i (n, L, D)
    and the synthetic defects cut from it (n, K, L, D) scored against the other n - 1 training images only; "global"
    searches all their tokens, "positional" those within ``radius`` cells. Tokens are in the bank's space
    (``FODModel.bank_queries``). Labels (n * (1 + K),): 0 for the good images, then 1 for the defects."""
    n, per_image = defects.shape[:2]
    queries = torch.cat([good[:, None], defects], 1).float()  # (n, 1 + K, L, D)
    labels = np.r_[np.zeros(n), np.ones(n * per_image)]
    scores = {}
    for name, distances in (("global", _global_leave_one_out(good.float(), queries)),
                            ("positional", _positional_leave_one_out(good.float(), queries, grid, radius))):
        scores[name] = _image_scores(distances.transpose(0, 1).flatten(0, 1), grid, image_size, sigma)  # goods, defects
    return labels, scores


def leave_one_out_auroc(good: Tensor, defects: Tensor, grid: tuple[int, int], image_size: int, sigma: float,
                        radius: int = PLACE_RADIUS) -> dict[str, float]:
    """Leave-one-out self-check AUROC of each search (``leave_one_out_scores``)."""
    labels, scores = leave_one_out_scores(good, defects, grid, image_size, sigma, radius)
    return {name: float(metrics.image_auroc(labels, values)) for name, values in scores.items()}


def choose(auroc: dict[str, float], n_images: int) -> SearchChoice:
    """The positional search where it separates the leave-one-out defects better than the global one; else the
    global one (PatchCore's: what the nearest branch always was)."""
    search = "positional" if auroc.get("positional", 0.0) > auroc.get("global", 0.0) else "global"
    return SearchChoice(search, auroc, n_images)
