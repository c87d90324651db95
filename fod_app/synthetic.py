"""Synthetic defects on good images, for the label-free self-check (``fod_app.selfcheck``).

Three kinds, after published self-supervised anomaly methods, all made from the user's own good images (no
outside data; the self-check cuts them from its held-out images, never from training images — see
``selfcheck.make_synthetic_images``):

- ``patch``: CutPaste (Li et al., CVPR 2021) — a rectangle (0.2-3 % of the image) cut from another good image
  at another place, colour-jittered, pasted.
- ``scar``: CutPaste-scar — a thin rotated stripe (1.5-5 px wide at 256 px) from another good image, colour-jittered.
- ``blend``: DRAEM (Zavrtanik et al., ICCV 2021) — a smooth random blob mask (Gaussian-filtered noise
  thresholded, standing in for Perlin noise) filled with foreign texture, blended with factor 0.3-1. The
  texture is a flipped/rotated, contrast-changed region of another good image (DRAEM uses DTD textures;
  none ship offline).

Two more kinds draw *new appearance* instead of moving good pixels — ``crack`` (a thin wandering dark or bright
line) and ``stain`` (a soft blob of shifted colour) — and ``opacity`` blends any defect more faintly. The self-check
does not use them: ``bench/selfcheck_probe.py`` compares these designs (BENCHMARKS.md "Which score the self-check
keeps"), and none ranked the score combinations better.

Images are (3, S, S) float32 arrays in [0, 1]; every function is seeded through a ``numpy.random.Generator``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

KINDS = ("patch", "scar", "blend")


def _jitter(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness/contrast change from subtle to strong: (3, h, w) -> (3, h, w).

    Graded on purpose: with only strong defects every model separates them perfectly and the self-check cannot
    tell models or score combinations apart.
    """
    gain = rng.choice([-1.0, 1.0]) * rng.uniform(0.02, 0.3)
    mean = region.mean()
    contrast = np.exp(rng.uniform(np.log(0.7), np.log(1.4)))
    return np.clip((region - mean) * contrast + mean + gain, 0.0, 1.0)


def _rectangle_mask(size: int, rng: np.random.Generator, area: tuple[float, float], aspect: tuple[float, float]
                    ) -> tuple[slice, slice]:
    frac = rng.uniform(*area)
    ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    h = int(np.clip(round(size * np.sqrt(frac * ratio)), 2, size - 1))
    w = int(np.clip(round(size * np.sqrt(frac / ratio)), 2, size - 1))
    top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    return slice(top, top + h), slice(left, left + w)


def cut_paste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste 'patch': returns (defective image (3, S, S), mask (S, S) bool)."""
    size = image.shape[-1]
    rows, cols = _rectangle_mask(size, rng, (0.002, 0.03), (0.3, 3.3))
    h, w = rows.stop - rows.start, cols.stop - cols.start
    src_top, src_left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    patch = _jitter(donor[:, src_top : src_top + h, src_left : src_left + w], rng)
    out = image.copy()
    out[:, rows, cols] = patch
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return out, mask


def scar(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste 'scar': a thin rotated stripe of donor pixels. Returns (image, mask)."""
    size = image.shape[-1]
    length = rng.uniform(0.08, 0.25) * size
    width = rng.uniform(1.5, 5.0) * size / 256
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    across = -(yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
    mask = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
    shift = rng.integers(-size // 4, size // 4 + 1, size=2)
    source = _jitter(np.roll(donor, tuple(shift), axis=(1, 2)), rng)
    out = np.where(mask[None], source, image)
    return out.astype(np.float32), mask


def blob_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random blob (Perlin-like): Gaussian-filtered noise thresholded in a random window. (S, S)."""
    for _ in range(20):
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=rng.uniform(4, 12) * size / 256)
        mask = noise > np.quantile(noise, 0.97)
        rows, cols = _rectangle_mask(size, rng, (0.02, 0.12), (0.5, 2.0))
        window = np.zeros((size, size), bool)
        window[rows, cols] = True
        mask &= window
        if mask.sum() >= 0.002 * size * size:
            return mask
    centre = size // 2
    mask = np.zeros((size, size), bool)
    mask[centre - size // 16 : centre + size // 16, centre - size // 16 : centre + size // 16] = True
    return mask


def blend(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM-style: blob mask filled with foreign texture, blended with factor 0.5-1. Returns (image, mask)."""
    size = image.shape[-1]
    texture = np.rot90(donor, k=int(rng.integers(1, 4)), axes=(1, 2))
    if rng.random() < 0.5:
        texture = texture[:, ::-1]
    texture = _jitter(np.ascontiguousarray(texture), rng)
    mask = blob_mask(size, rng)
    beta = rng.uniform(0.3, 1.0)
    out = np.where(mask[None], beta * texture + (1 - beta) * image, image)
    return out.astype(np.float32), mask


def crack(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A drawn crack or scratch: a thin wandering line (random walk, 1-3 px wide at 256 px), darker or
    brighter than its surroundings by 0.1-0.5. New appearance, not pixels of a good image (``donor`` unused).
    Returns (image, mask)."""
    size = image.shape[-1]
    steps = int(rng.integers(20, 80))
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.25, steps))
    step = size / 256 * 1.5
    start = rng.uniform(0.15, 0.85, size=2) * size
    points = start + np.cumsum(np.stack([np.sin(heading), np.cos(heading)], 1) * step, 0)
    points = np.clip(np.round(points).astype(int), 0, size - 1)
    mask = np.zeros((size, size), bool)
    mask[points[:, 0], points[:, 1]] = True
    width = max(1, int(round(rng.uniform(0.5, 1.5) * size / 256)))
    mask = ndimage.binary_dilation(mask, iterations=width)
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), 0.7 * size / 256)
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.5)
    out = np.clip(image + alpha[None] * delta, 0.0, 1.0)
    return out.astype(np.float32), mask


def stain(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A stain or spot: a smooth blob (``blob_mask``, soft-edged) whose colour is shifted by 0.05-0.3 per
    channel, with a little grain. New appearance (``donor`` unused). Returns (image, mask)."""
    size = image.shape[-1]
    mask = blob_mask(size, rng)
    alpha = ndimage.gaussian_filter(mask.astype(np.float32), 2.0 * size / 256)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.05, 0.3) * rng.uniform(0.7, 1.0, size=3)
    grain = rng.normal(0, 0.03, (1, size, size))
    out = np.clip(image + alpha[None] * (shift[:, None, None] + grain), 0.0, 1.0)
    return out.astype(np.float32), mask


MAKERS = {"patch": cut_paste, "scar": scar, "blend": blend, "crack": crack, "stain": stain}


def synthetic_defects(
    images: list[np.ndarray], donors: list[np.ndarray], per_image: int, seed: int,
    opacity: tuple[float, float] = (1.0, 1.0), kinds: tuple[str, ...] = KINDS,
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """``per_image`` synthetic defects on each image, kinds cycling through ``kinds``, donors other images.

    ``opacity`` (low, high): each defect is blended over its image with a factor drawn uniformly from this
    range (1 = as made; smaller = subtler). Returns (defective images, masks, kinds), in order image 0's
    defects, image 1's, ...
    """
    if not donors:
        raise ValueError("synthetic defects need at least one donor image")
    rng = np.random.default_rng(seed)
    out, masks, made = [], [], []
    for i, image in enumerate(images):
        for j in range(per_image):
            kind = kinds[(i * per_image + j) % len(kinds)]
            donor = donors[int(rng.integers(len(donors)))]
            defective, mask = MAKERS[kind](image, donor, rng)
            if opacity != (1.0, 1.0):
                alpha = rng.uniform(*opacity)
                defective = image + alpha * (defective - image)
            out.append(defective.astype(np.float32))
            masks.append(mask)
            made.append(kind)
    return out, masks, made
