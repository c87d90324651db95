"""Training-set health check, shown to the user before training.

It looks for the problems that most often spoil an anomaly-detection model: too few
images, unreadable files, copies of the same photo, pictures that clearly do not belong
(another part, a blank frame, a different camera setting) and mixed sizes or colour modes.
It only uses cheap image statistics (tiny thumbnails), so it runs in about a second for a
few hundred images and needs no model.

Outlier detection uses robust z-scores (distance from the median in units of the scaled
median absolute deviation, MAD) of a few per-image statistics: brightness, contrast, fine
detail, colourfulness and how different the thumbnail looks from the rest (nearest
neighbours and median thumbnail). Thresholds were tuned on two real training sets
(MVTec AD "bottle", 209 images; magnetic tile, 762 images) where they flag none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.stats import median_abs_deviation

from fod_app.data import MIN_TRAIN_IMAGES, RECOMMENDED_TRAIN_IMAGES
from fod_app.exposure import light_varies, relative_spread

__all__ = [
    "DUPLICATE_RMS",
    "OUTLIER_Z",
    "HealthReport",
    "check_training_set",
    "outlier_limit",
]

DUPLICATE_RMS = 1.0 / 255.0
"""Two images whose 32x32 grey thumbnails differ by at most this RMS (0-1 scale) are duplicates.

A JPEG re-save at quality 60 or a resized copy differs by about 0.2-0.7/255; the closest two
distinct photos in the real bottle / magnetic-tile training sets differ by 2.0 / 2.8 /255.
"""

OUTLIER_Z = 5.0
"""Base robust z-score for outliers (see :func:`outlier_limit`; largest on real sets: 4.0)."""

KNN_RATIO = 4.0
"""An image whose thumbnail is this many times farther from its 5 nearest neighbours than
is typical gets score OUTLIER_Z (largest ratio seen on real sets and their subsets: 3.4)."""

MIN_IMAGES_FOR_OUTLIERS = 8
"""Below this many images the statistics are too unreliable to call anything an outlier."""

BLANK_STD = 0.01
"""An image whose grey values vary less than this (0-1 scale) is reported as blank."""

GREY_SATURATION = 0.01
"""Mean per-pixel channel spread below which an RGB image counts as grayscale."""

MINORITY_KIND_FRACTION = 0.1
"""Colour images among mostly-grey ones (or the reverse) are outliers up to this fraction."""

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_ASPECT_TOLERANCE = 1.05
_KNN = 5
_CHUNK = 512

# (statistic, lowest scale used in the z-score, text when high, text when low)
_STAT_TEXT: dict[str, tuple[float, str, str]] = {
    "brightness": (
        0.02,
        "much brighter than the others",
        "much darker than the others",
    ),
    "contrast": (
        0.01,
        "much more contrast than the others",
        "much less contrast than the others",
    ),
    "detail": (
        0.005,
        "much more fine detail or noise than the others (grainy, noisy or a different texture?)",
        "much smoother than the others (out of focus or motion blur?)",
    ),
    "colour": (
        0.01,
        "much more colourful than the others",
        "much less colourful than the others",
    ),
}
_LAYOUT_TEXT = "its content looks unlike the other images (a different part, position, zoom, background or lighting?)"


@dataclass
class HealthReport:
    """Findings of :func:`check_training_set`; ``warnings`` are ready-to-show sentences."""

    count: int
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    near_duplicates: list[list[str]] = field(default_factory=list)
    outliers: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)
    """How many images are ``"colour"`` and how many ``"grayscale"`` (judged by content)."""
    outlier_scores: dict[str, float] = field(default_factory=dict)
    """Largest robust z-score per image (empty when there are too few images)."""
    min_images: int = MIN_TRAIN_IMAGES
    lighting_spread: dict[str, float] = field(default_factory=dict)
    """Relative spread of the photos' ``brightness`` and ``contrast`` (empty when there are too few images)."""
    notes: list[str] = field(default_factory=list)
    """Ready-to-show suggestions about settings; not problems (``ok`` does not look at them)."""

    @property
    def enough_images(self) -> bool:
        """True if there are enough readable images to train."""
        return self.count >= self.min_images

    @property
    def ok(self) -> bool:
        """True if nothing at all was found worth telling the user."""
        return not (self.warnings or self.failures or self.near_duplicates or self.outliers)


@dataclass
class _Features:
    thumb32: np.ndarray  # (N, 1024) grey 32x32, 0..1, for duplicates
    thumb16: np.ndarray  # (N, 768) RGB 16x16, 0..1
    stats: dict[str, np.ndarray]  # brightness, contrast, detail, colour: (N,)
    grey: np.ndarray  # (N,) bool


def _features(images: Sequence[Image.Image]) -> _Features:
    t32, t16, bright, contrast, detail, colour, grey = [], [], [], [], [], [], []
    for img in images:
        source_mode = str(img.info.get("fod_source_mode", img.mode))
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        factor = max(rgb.size) // 2048
        if factor > 1:
            rgb = rgb.reduce(factor)
        small64 = np.asarray(rgb.resize((64, 64), Image.Resampling.BOX, reducing_gap=3.0), np.float32)
        small64 /= 255.0
        grey64 = small64.mean(axis=2)
        thumb32 = np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.BOX), np.float32)
        t32.append(thumb32.reshape(-1) / 255.0)
        t16.append(np.asarray(rgb.resize((16, 16), Image.Resampling.BOX), np.float32).reshape(-1) / 255.0)
        sampled = np.asarray(rgb.convert("L").resize((128, 128), Image.Resampling.NEAREST), np.float32)
        sampled /= 255.0
        detail.append(np.abs(np.diff(sampled, axis=1)).mean() + np.abs(np.diff(sampled, axis=0)).mean())
        bright.append(grey64.mean())
        contrast.append(sampled.std())
        saturation = float((small64.max(axis=2) - small64.min(axis=2)).mean())
        colour.append(saturation)
        grey.append(source_mode in _GREY_MODES or saturation < GREY_SATURATION)
    return _Features(
        thumb32=np.stack(t32),
        thumb16=np.stack(t16),
        stats={
            "brightness": np.asarray(bright, np.float64),
            "contrast": np.asarray(contrast, np.float64),
            "detail": np.asarray(detail, np.float64),
            "colour": np.asarray(colour, np.float64),
        },
        grey=np.asarray(grey, bool),
    )


def _robust_z(values: np.ndarray, floor: float) -> np.ndarray:
    """(x - median) / max(scaled MAD, floor); the MAD scaled by 1.4826 estimates the sd of normal data."""
    return (values - np.median(values)) / max(float(median_abs_deviation(values, scale="normal")), floor)


def outlier_limit(n: int) -> float:
    """Score above which an image is flagged: OUTLIER_Z * (1 + 10 / n).

    Median and MAD from a handful of images are noisy, so small sets need a larger margin
    (10 images: 10.0, 50: 6.0, 200: 5.25, 762: 5.07).
    """
    return OUTLIER_Z * (1.0 + 10.0 / max(n, 1))


def _ratio_score(values: np.ndarray) -> np.ndarray:
    """Score = OUTLIER_Z when a value is KNN_RATIO times the median (heavy-tail safe)."""
    ratio = values / max(float(np.median(values)), 1e-6)
    return (ratio - 1.0) / (KNN_RATIO - 1.0) * OUTLIER_Z


def _pairwise_rms(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(sq, 0.0) / a.shape[1])


def _knn_distance(x: np.ndarray, k: int) -> np.ndarray:
    """Mean RMS distance of each row to its ``k`` nearest other rows (chunked)."""
    n = len(x)
    k = max(1, min(k, n - 1))
    out = np.empty(n, np.float64)
    for start in range(0, n, _CHUNK):
        block = _pairwise_rms(x[start : start + _CHUNK], x)
        rows = np.arange(block.shape[0])
        block[rows, rows + start] = np.inf
        out[start : start + _CHUNK] = np.partition(block, k - 1, axis=1)[:, :k].mean(1)
    return out


def _duplicate_groups(thumbs: np.ndarray, names: Sequence[str]) -> list[list[str]]:
    parent = list(range(len(thumbs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(thumbs), _CHUNK):
        block = _pairwise_rms(thumbs[start : start + _CHUNK], thumbs)
        for i, j in zip(*np.nonzero(block <= DUPLICATE_RMS), strict=True):
            a, b = find(int(i) + start), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(thumbs)):
        groups.setdefault(find(i), []).append(i)
    return [[names[i] for i in members] for members in groups.values() if len(members) > 1]


def _normalised(thumb16: np.ndarray) -> np.ndarray:
    """Grey 16x16 thumbnails with each image's own mean/contrast removed (structure only)."""
    grey = thumb16.reshape(len(thumb16), 16 * 16, 3).mean(axis=2)
    grey = grey - grey.mean(axis=1, keepdims=True)
    return grey / np.maximum(grey.std(axis=1, keepdims=True), 0.02)


_BLANK_TEXT = "almost uniform (a blank frame, lens cap, or badly over/under-exposed?)"


def _outliers(names: Sequence[str], feats: _Features) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """Flag images whose score exceeds :func:`outlier_limit`; strongest reason first."""
    n = len(names)
    limit = outlier_limit(n)
    reasons: list[list[tuple[float, str]]] = [[] for _ in range(n)]
    best = np.zeros(n)
    for stat, (floor, high, low) in _STAT_TEXT.items():
        z = _robust_z(feats.stats[stat], floor)
        best = np.maximum(best, np.abs(z))
        for i in np.nonzero(np.abs(z) > limit)[0]:
            text = high if z[i] > 0 else low
            reasons[i].append((abs(z[i]), f"{text} (score {abs(z[i]):.1f})"))
    structure = _normalised(feats.thumb16)
    median_distance = np.sqrt(((structure - np.median(structure, axis=0)) ** 2).mean(axis=1))
    layout = np.max(
        np.stack(
            [
                _ratio_score(_knn_distance(feats.thumb16, _KNN)),
                _robust_z(_knn_distance(structure, 4 * _KNN), 0.05),
                _robust_z(median_distance, 0.05),
            ]
        ),
        axis=0,
    )
    best = np.maximum(best, layout)
    for i in np.nonzero(layout > limit)[0]:
        reasons[i].append((layout[i], f"{_LAYOUT_TEXT} (score {layout[i]:.1f})"))
    n_grey = int(feats.grey.sum())
    for is_grey, other, count in (
        (False, "grayscale", n_grey),
        (True, "colour", n - n_grey),
    ):
        minority = np.nonzero(feats.grey == is_grey)[0]
        if 0 < len(minority) <= MINORITY_KIND_FRACTION * n:
            kind = "grayscale" if is_grey else "in colour"
            for i in minority:
                text = f"{kind} while {count} of the other images are {other}"
                reasons[i].append((np.inf, text))
    for i in np.nonzero(feats.stats["contrast"] < BLANK_STD)[0]:
        reasons[i].append((np.inf, _BLANK_TEXT))
    flagged = [
        (
            names[i],
            "; ".join(text for _, text in sorted(reasons[i], key=lambda r: -r[0])),
        )
        for i in range(n)
        if reasons[i]
    ]
    return flagged, {names[i]: round(float(best[i]), 2) for i in range(n)}


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_training_set(
    named_images: list[tuple[str, Image.Image]],
    failures: Iterable[tuple[str, str]] = (),
    min_images: int = MIN_TRAIN_IMAGES,
) -> HealthReport:
    """Check a set of good training images and describe anything suspicious.

    ``named_images`` are ``(display name, PIL image)`` pairs, e.g. from
    :func:`fod_app.data.load_image`; ``failures`` are the ``(name, reason)`` pairs of files
    that could not be read. Nothing here stops training except too few images.
    """
    names = [name for name, _ in named_images]
    images = [img for _, img in named_images]
    report = HealthReport(count=len(images), failures=list(failures), min_images=min_images)
    report.sizes = Counter(img.size for img in images)
    report.modes = Counter(str(img.info.get("fod_source_mode", img.mode)) for img in images)
    warnings = report.warnings

    if report.failures:
        warnings.append(
            f"{len(report.failures)} file(s) could not be read and will be left out: "
            + _examples([f"{name} ({reason})" for name, reason in report.failures])
            + "."
        )
    if report.count < min_images:
        warnings.append(
            f"Only {report.count} usable good image(s); at least {min_images} are needed to "
            f"train ({RECOMMENDED_TRAIN_IMAGES} or more recommended). Add more photos of "
            "defect-free parts."
        )
    elif report.count < RECOMMENDED_TRAIN_IMAGES:
        warnings.append(
            f"{report.count} good images is enough to train, but {RECOMMENDED_TRAIN_IMAGES} or "
            "more give a model that is less likely to flag normal variation as a defect."
        )
    if not images:
        return report

    if len(report.sizes) > 1:
        common = ", ".join(f"{_size_text(s)} ({c})" for s, c in report.sizes.most_common(3))
        ratios = [w / h for w, h in report.sizes]
        if max(ratios) / min(ratios) > _ASPECT_TOLERANCE:
            warnings.append(
                f"Images have different shapes ({len(report.sizes)} sizes, e.g. {common}). Every "
                "image is squashed to a square, so parts will look stretched differently; use "
                "photos from the same camera setup and crop."
            )
        else:
            warnings.append(
                f"Images come in {len(report.sizes)} different sizes (e.g. {common}). They are all "
                "resized to the same size, but a different zoom or resolution can look like a "
                "defect; use photos from the same camera setup."
            )

    feats = _features(images)
    n_grey = int(feats.grey.sum())
    report.kinds = Counter({"grayscale": n_grey, "colour": report.count - n_grey})
    report.kinds = +report.kinds
    if 0 < n_grey < report.count:
        colour_names = [names[i] for i in np.nonzero(~feats.grey)[0]]
        grey_names = [names[i] for i in np.nonzero(feats.grey)[0]]
        warnings.append(
            f"Mixed colour and grayscale images: {report.count - n_grey} in colour (e.g. "
            f"{_examples(colour_names, 2)}) and {n_grey} grayscale (e.g. {_examples(grey_names, 2)}). "
            "Use one camera setting for all images."
        )

    report.near_duplicates = _duplicate_groups(feats.thumb32, names)
    if len(report.near_duplicates) == 1 and len(report.near_duplicates[0]) == report.count > 1:
        warnings.append(
            f"All {report.count} images are identical or nearly identical. The model needs "
            "several different good parts (or the same part photographed several times), not "
            "copies of one photo."
        )
    elif report.near_duplicates:
        extra = sum(len(g) - 1 for g in report.near_duplicates)
        warnings.append(
            f"{len(report.near_duplicates)} group(s) of identical or near-identical images "
            f"({extra} extra copies), e.g. {' = '.join(report.near_duplicates[0][:3])}. Copies add "
            "no information; remove the extras."
        )

    blank = [names[i] for i in np.nonzero(feats.stats["contrast"] < BLANK_STD)[0]]
    if report.count >= MIN_IMAGES_FOR_OUTLIERS:
        report.outliers, report.outlier_scores = _outliers(names, feats)
        report.lighting_spread = {stat: relative_spread(feats.stats[stat]) for stat in ("brightness", "contrast")}
        if light_varies(report.lighting_spread):
            report.notes.append(
                f"The light differs between these photos: brightness spreads by "
                f"{100 * report.lighting_spread['brightness']:.0f} % and contrast by "
                f"{100 * report.lighting_spread['contrast']:.0f} % from photo to photo. If that is the line's "
                "lighting drifting (not the parts themselves), evening out each photo's brightness and contrast "
                "(Advanced settings: Automatic or Even out) makes the model ignore it."
            )
    elif blank:
        report.outliers = [(name, _BLANK_TEXT) for name in blank]
    if report.outliers:
        warnings.append(
            f"{len(report.outliers)} image(s) look very different from the rest: "
            + _examples([name for name, _ in report.outliers])
            + ". Check that they show the same part, camera and lighting, and contain no defect; "
            "remove them if not."
        )
    return report
