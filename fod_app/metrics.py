"""Evaluation metrics for anomaly detection: image/pixel AUROC, AUPRO, F1-max and curves.

Conventions
-----------
* ``labels``: ``int`` array of shape ``[N]``, ``1`` = defective (NG), ``0`` = good (OK).
* ``scores``: ``float`` array of shape ``[N]``; higher means more anomalous.  An image is
  called NG when ``score >= threshold``.
* ``masks``: ``bool`` array of shape ``[N, H, W]`` (non-zero = defective pixel).
* ``maps``: ``float`` array of shape ``[N, H, W]``, the anomaly maps aligned with ``masks``.

Metrics that are undefined for the data (e.g. an AUROC with only one class present, an
AUPRO without any defect region) return ``nan`` instead of raising.

Pixel-level metrics are *exact* (no binning): all pixel values are sorted once (in chunks,
on a couple of threads) and each defective pixel is ranked against the normal pixels with
``searchsorted``.  Ties between a normal and a defective pixel count one half, exactly like
``sklearn.metrics.roc_auc_score``.  Peak extra memory is about one copy of ``maps`` plus an
``int32`` label volume; ~600 maps of 256x256 take a few seconds on 2 CPU cores.

AUPRO follows the MVTec AD definition (Bergmann et al., IJCV 2021, and the official
``pro_curve_util.compute_pro``): ground-truth regions are the connected components of each
mask with **8-connectivity** (``scipy.ndimage.label`` with a 3x3 all-ones structure, which
is what the official MVTec evaluation code and anomalib's OpenCV path use; regions never
span two images).  For a threshold ``t``, PRO(t) is the mean over *all* regions (of all
images) of the fraction of the region's pixels with ``map >= t``, and FPR(t) is the
fraction of all normal pixels (of all images, including images whose mask is empty) with
``map >= t``.  The curve (starting at (0, 0)) is integrated with the trapezoidal rule over
FPR in ``[0, fpr_limit]``, linearly interpolating the end point, and divided by
``fpr_limit`` so that a perfect map scores 1.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "EvaluationResult",
    "aupro",
    "confusion_at",
    "evaluate",
    "f1_max",
    "image_auroc",
    "per_type_auroc",
    "pixel_auroc",
    "pr_points",
    "roc_points",
]

# 8-connectivity inside each image, no connectivity across the image axis.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True

_MIN_CHUNK = 1 << 20  # do not split smaller sorts across threads


# --------------------------------------------------------------------------- image level


def _image_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten ``labels`` [N] to int 0/1 and ``scores`` [N] to float64."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return (y != 0).astype(np.int64), s


def _has_both_classes(y: np.ndarray) -> bool:
    return bool(y.size) and 0 < int(y.sum()) < y.size


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC of ``scores`` [N] against ``labels`` [N] (1 = defective).

    Returns ``nan`` (no error, no warning) when only one class is present.
    """
    y, s = _image_inputs(labels, scores)
    if not _has_both_classes(y):
        return math.nan
    return float(roc_auc_score(y, s))


def auroc_difference(labels: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[float, float]:
    """AUROC(first) − AUROC(second) of two scores [N] of the same samples, and its standard error.

    DeLong, DeLong & Clarke-Pearson (Biometrics 1988): each score's AUROC is the mean of its placement values
    (per positive: the share of negatives below it, ties half; per negative: the share of positives above it),
    and the variance of the difference is that of the paired placement differences, over positives and negatives.
    Hand-written (scikit-learn and scipy have no paired AUROC test); O(positives × negatives), meant for the
    self-check's tens of images. Returns (nan, nan) when a class is missing.
    """
    y, a = _image_inputs(labels, first)
    _, b = _image_inputs(labels, second)
    if not _has_both_classes(y):
        return math.nan, math.nan

    def placements(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        above = (s[y == 1][:, None] > s[y == 0][None, :]) + 0.5 * (s[y == 1][:, None] == s[y == 0][None, :])
        return above.mean(1), above.mean(0)  # (positives,), (negatives,)

    (pos_a, neg_a), (pos_b, neg_b) = placements(a), placements(b)
    d_pos, d_neg = pos_a - pos_b, neg_a - neg_b
    variance = (d_pos.var(ddof=1) if d_pos.size > 1 else 0.0) / d_pos.size
    variance += (d_neg.var(ddof=1) if d_neg.size > 1 else 0.0) / d_neg.size
    return float(d_pos.mean()), math.sqrt(variance)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it.

    ``labels`` [N], ``scores`` [N]; NG means ``score >= threshold``.  Built on
    ``sklearn.metrics.precision_recall_curve``; ties in F1 keep the highest threshold.
    Returns ``(nan, nan)`` when there is no defective image.
    """
    y, s = _image_inputs(labels, scores)
    if not y.any():
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    # thresholds are increasing: take the last maximum, i.e. the strictest threshold
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(thresholds[best])


def _finite_thresholds(thresholds: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Replace sklearn's ``+inf`` sentinel by the next float above the top score."""
    t = np.asarray(thresholds, dtype=np.float64).copy()
    if t.size and not np.isfinite(t[0]):
        t[0] = np.nextafter(float(np.max(scores)), np.inf)
    return t


def roc_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """ROC curve for plotting: ``{"fpr", "tpr", "thresholds"}``, equal-length lists.

    ``labels`` [N], ``scores`` [N].  The first threshold (sklearn's ``+inf``: nothing is
    flagged) is replaced by the next float above the highest score so the lists are
    JSON-safe.  Empty lists when only one class is present.
    """
    y, s = _image_inputs(labels, scores)
    if not _has_both_classes(y):
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thresholds = roc_curve(y, s)
    return {
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "thresholds": _finite_thresholds(thresholds, s).tolist(),
    }


def pr_points(labels: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """Precision-recall curve for plotting: ``{"precision", "recall", "thresholds"}``.

    ``labels`` [N], ``scores`` [N].  As in sklearn, ``precision`` and ``recall`` have one
    more element than ``thresholds`` (the final point recall = 0, precision = 1).
    Empty lists when there is no defective image.
    """
    y, s = _image_inputs(labels, scores)
    if not y.any():
        return {"precision": [], "recall": [], "thresholds": []}
    precision, recall, thresholds = precision_recall_curve(y, s)
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "thresholds": thresholds.astype(np.float64).tolist(),
    }


def confusion_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """Confusion counts ``{"tp", "fp", "tn", "fn"}`` with NG = ``score >= threshold``.

    ``labels`` [N] (1 = defective), ``scores`` [N].
    """
    y, s = _image_inputs(labels, scores)
    pred = s >= threshold
    truth = y.astype(bool)
    return {
        "tp": int(np.count_nonzero(pred & truth)),
        "fp": int(np.count_nonzero(pred & ~truth)),
        "tn": int(np.count_nonzero(~pred & ~truth)),
        "fn": int(np.count_nonzero(~pred & truth)),
    }


def per_type_auroc(defect_types: Sequence[str], labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC of (all good images) vs (images of one defect type), for each defect type.

    ``defect_types`` [N] names each image's type; only images with ``label == 1`` define
    the defect types (the type names of good images are ignored).  Keys are sorted; a value
    is ``nan`` when there is no good image.
    """
    y, s = _image_inputs(labels, scores)
    types = np.asarray(list(defect_types), dtype=object)
    if types.shape != y.shape:
        raise ValueError(f"defect_types has {types.size} entries, labels has {y.size}")
    good = y == 0
    out: dict[str, float] = {}
    for name in sorted({str(t) for t in types[~good]}):
        sel = good | ((types == name) & ~good)
        out[name] = image_auroc(y[sel], s[sel])
    return out


# --------------------------------------------------------------------------- pixel level


def _pixel_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``masks`` as bool [N, H, W] and ``maps`` as a numeric array of the same shape."""
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and maps {a.shape} differ in shape")
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise ValueError(f"expected [N, H, W] arrays, got shape {m.shape}")
    if m.dtype != bool:
        m = m != 0
    if a.dtype.kind not in "iuf":
        a = a.astype(np.float64)
    return m, a


class _PixelRanker:
    """All pixel values sorted once; ranks defective pixels against normal ones.

    ``pos`` [P] (ascending) holds the defective pixels' scores, ``chunks`` every pixel's
    score in a few independently sorted pieces, ``n_neg`` the number of normal pixels.
    Counts of normal pixels below/at a value are obtained as (count over all pixels) - (count over defective pixels).
    """

    def __init__(self, masks: np.ndarray, maps: np.ndarray) -> None:
        flat_idx = np.flatnonzero(masks)
        self.pos_index = flat_idx  # flat indices of defective pixels (unsorted order)
        pos = maps.reshape(-1)[flat_idx]
        self.order = np.argsort(pos, kind="stable")
        self.pos = pos[self.order]  # [P] ascending
        self.n_pos = int(pos.size)
        self.n_neg = int(maps.size) - self.n_pos
        self.chunks = _sorted_chunks(maps.reshape(-1))
        if any(c.size and np.isnan(c[-1]) for c in self.chunks):  # NaN sorts last
            raise ValueError("maps contain NaN")
        self._pos_lt = np.searchsorted(self.pos, self.pos, side="left")
        self._pos_le = np.searchsorted(self.pos, self.pos, side="right")
        all_lt = self._count_all(self.pos, "left")
        all_le = self._count_all(self.pos, "right")
        # per defective pixel: normal pixels strictly below / equal to its score
        self.neg_lt = all_lt - self._pos_lt
        self.neg_eq = (all_le - all_lt) - (self._pos_le - self._pos_lt)

    def _count_all(self, x: np.ndarray | np.generic, side: str) -> np.ndarray:
        """Number of pixels (normal or not) below ``x`` ("left") or at/below it ("right")."""
        keys = np.asarray(x, dtype=self.pos.dtype)  # same dtype: no cast of the chunks
        total = np.zeros(keys.shape, dtype=np.int64)
        for chunk in self.chunks:
            total += np.searchsorted(chunk, keys, side=side)
        return total

    def neg_ge(self, t: np.ndarray | np.generic) -> np.ndarray:
        """Number of normal pixels with value ``>= t`` (t scalar or array)."""
        keys = np.asarray(t, dtype=self.pos.dtype)
        all_ge = self.n_pos + self.n_neg - self._count_all(keys, "left")
        return all_ge - (self.n_pos - np.searchsorted(self.pos, keys, side="left"))

    def neg_gt(self, t: np.ndarray | np.generic) -> np.ndarray:
        """Number of normal pixels with value ``> t`` (t scalar or array)."""
        keys = np.asarray(t, dtype=self.pos.dtype)
        all_gt = self.n_pos + self.n_neg - self._count_all(keys, "right")
        return all_gt - (self.n_pos - np.searchsorted(self.pos, keys, side="right"))

    def kth_largest_negative(self, m: int) -> np.generic:
        """Value of the ``m``-th largest normal pixel (1 <= m <= n_neg), in the maps' dtype."""
        best: np.generic | None = None
        for chunk in self.chunks:
            # largest chunk element v with neg_ge(v) >= m (predicate true on a prefix)
            if chunk.size == 0 or self.neg_ge(chunk[0]) < m:
                continue
            lo, hi = 1, chunk.size  # invariant: true at lo - 1, false at hi (if < size)
            while lo < hi:
                mid = (lo + hi) // 2
                if self.neg_ge(chunk[mid]) >= m:
                    lo = mid + 1
                else:
                    hi = mid
            if best is None or chunk[lo - 1] > best:
                best = chunk[lo - 1]
        assert best is not None, "m must be in [1, n_neg]"
        return best

    def curve_area(self, weights: np.ndarray, limit: float) -> float:
        """Exact normalised area under (FPR, weighted TPR) up to FPR = ``limit``.

        ``weights`` [P] are aligned with ``self.pos`` and sum to 1; the curve point at
        threshold ``t`` is (fraction of normal pixels >= t, sum of weights of defective
        pixels >= t), starting at (0, 0), integrated with the trapezoidal rule.
        """
        n_neg = self.n_neg
        m = min(max(math.ceil(limit * n_neg - 1e-9), 1), n_neg)
        v = self.kth_largest_negative(m)
        a_cnt = int(self.neg_gt(v))  # normal pixels > v
        b_cnt = int(self.neg_ge(v))  # normal pixels >= v
        above = self.pos > v
        # full trapezoids: each normal pixel above v (descending) adds a segment of width
        # 1/n_neg whose height is the mean of W(> s) and W(>= s); summed per defective pixel
        ranks = (self.neg_lt[above] - (n_neg - a_cnt)) + 0.5 * self.neg_eq[above]
        full = float(np.dot(weights[above], ranks)) / n_neg
        # partial trapezoid across the tie group of v, cut at FPR = limit
        p0 = float(weights[above].sum())
        p1 = float(weights[self.pos >= v].sum())
        a, b = a_cnt / n_neg, b_cnt / n_neg
        y_end = p0 + (p1 - p0) * (limit - a) / (b - a)
        partial = (limit - a) * (p0 + y_end) / 2.0
        return (full + partial) / limit

    def binned_curve_area(self, weights: np.ndarray, limit: float, num: int) -> float:
        """Like :meth:`curve_area` but evaluated at ``num`` evenly spaced thresholds."""
        lo = min(float(c[0]) for c in self.chunks if c.size)
        hi = max(float(c[-1]) for c in self.chunks if c.size)
        # descending -> FPR ascending; in the maps' dtype so both counts agree
        thresholds = np.linspace(hi, lo, num).astype(self.pos.dtype)
        fpr = self.neg_ge(thresholds) / self.n_neg
        suffix = np.concatenate([np.cumsum(weights[::-1])[::-1], [0.0]])
        tpr = suffix[np.searchsorted(self.pos, thresholds, side="left")]
        x = np.concatenate([[0.0], fpr, [1.0]])
        y = np.concatenate([[0.0], np.minimum(tpr, 1.0), [1.0]])
        return _trapezoid_to(x, y, limit) / limit


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y`` [K] vs non-decreasing ``x`` [K] on ``[x[0], x_max]``."""
    keep = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.sum(np.diff(x[:keep]) * (y[1:keep] + y[: keep - 1]) / 2.0))
    if keep < x.size and x[keep - 1] < x_max:
        x0, x1, y0, y1 = x[keep - 1], x[keep], y[keep - 1], y[keep]
        y_end = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += (x_max - x0) * (y0 + y_end) / 2.0
    return area


def _sorted_chunks(values: np.ndarray) -> list[np.ndarray]:
    """Copy ``values`` [M] and sort it in up to ``cpu_count`` chunks on threads."""
    data = np.array(values, copy=True).reshape(-1)
    try:
        workers = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        workers = os.cpu_count() or 1
    n_chunks = max(1, min(workers, data.size // _MIN_CHUNK))
    chunks = np.array_split(data, n_chunks)
    if n_chunks == 1:
        data.sort()
    else:
        with ThreadPoolExecutor(n_chunks) as pool:  # numpy releases the GIL while sorting
            list(pool.map(np.ndarray.sort, chunks))
    return chunks


def _region_weights(
    masks: np.ndarray, ranker: _PixelRanker, regions: tuple[np.ndarray, int] | None = None
) -> np.ndarray | None:
    """PRO weight 1 / (n_regions * region_size) per defective pixel, aligned with ranker.pos.

    ``regions``: precomputed (labels, n_regions) in the ranker's layout (used when ignored pixels were dropped).
    """
    labels, n_regions = regions if regions is not None else ndimage.label(masks, structure=_REGION_STRUCTURE)
    if n_regions == 0:
        return None
    region = labels.reshape(-1)[ranker.pos_index][ranker.order]
    del labels
    sizes = np.bincount(region, minlength=n_regions + 1)
    return 1.0 / (n_regions * sizes[region].astype(np.float64))


def _pixel_auroc(ranker: _PixelRanker) -> float:
    if ranker.n_pos == 0 or ranker.n_neg == 0:
        return math.nan
    pairs = 2 * int(ranker.neg_lt.sum()) + int(ranker.neg_eq.sum())
    return pairs / (2.0 * ranker.n_pos * ranker.n_neg)


def _aupro(
    masks: np.ndarray,
    ranker: _PixelRanker,
    fpr_limit: float,
    num_thresholds: int | None,
    regions: tuple[np.ndarray, int] | None = None,
) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None and num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
    if ranker.n_pos == 0 or ranker.n_neg == 0:
        return math.nan
    weights = _region_weights(masks, ranker, regions)
    if weights is None:
        return math.nan
    if num_thresholds is None:
        return ranker.curve_area(weights, fpr_limit)
    return ranker.binned_curve_area(weights, fpr_limit, num_thresholds)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Exact pixel-level AUROC over all pixels of ``masks`` [N, H, W] vs ``maps`` [N, H, W].

    Equal to ``roc_auc_score(masks.ravel(), maps.ravel())`` (ties count one half) without
    sklearn's float64 copies.  ``nan`` if there is no defective or no normal pixel.
    """
    m, a = _pixel_inputs(masks, maps)
    return _pixel_auroc(_PixelRanker(m, a))


def aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    ``masks`` [N, H, W] bool, ``maps`` [N, H, W] float.  Regions are 8-connected components
    of each mask; see the module docstring for the exact definition.
    ``num_thresholds=None`` (default) evaluates the curve at every distinct map value
    (exact, like the official MVTec code); an integer instead samples that many thresholds
    evenly spaced between the smallest and largest map value (an approximation).
    Returns ``nan`` if there is no defect region or no normal pixel.
    """
    m, a = _pixel_inputs(masks, maps)
    return _aupro(m, _PixelRanker(m, a), fpr_limit, num_thresholds)


# --------------------------------------------------------------------------- summary


@dataclass
class EvaluationResult:
    """All metrics of one evaluation run (``nan`` where undefined, e.g. no masks)."""

    image_auroc: float
    pixel_auroc: float
    aupro: float
    f1_max: float
    f1_threshold: float
    per_type_image_auroc: dict[str, float] = field(default_factory=dict)
    n_good: int = 0
    n_defective: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-safe dict; ``nan`` values become ``None``."""

        def clean(value: object) -> object:
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, float) and math.isnan(value):
                return None
            return value

        return {k: clean(v) for k, v in asdict(self).items()}


def evaluate(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    defect_types: Sequence[str] | None = None,
    fpr_limit: float = 0.3,
    ignore: np.ndarray | None = None,
) -> EvaluationResult:
    """Compute every metric at once.

    ``labels`` [N], ``scores`` [N]; optional ``masks``/``maps`` [N, H, W] for the pixel
    metrics (``nan`` when omitted) and ``defect_types`` [N] for the per-type AUROC
    (empty dict when omitted).  The pixel values are sorted only once for both pixel
    metrics.  ``ignore`` [H, W] bool: pixels left out of both pixel metrics (a model's ignore regions);
    defect regions are clipped to the pixels that count.
    """
    start = time.perf_counter()
    y, s = _image_inputs(labels, scores)
    best_f1, best_threshold = f1_max(y, s)
    pix_auroc = pro = math.nan
    if masks is not None and maps is not None:
        m, a = _pixel_inputs(masks, maps)
        regions = None
        if ignore is not None and np.any(ignore):
            keep = ~np.asarray(ignore, dtype=bool)
            m = m & keep
            labels_2d, n_regions = ndimage.label(m, structure=_REGION_STRUCTURE)
            regions = (labels_2d[:, keep][..., None], n_regions)
            m, a = m[:, keep][..., None], a[:, keep][..., None]  # [N, K, 1]: only the pixels that count
        ranker = _PixelRanker(m, a)
        pix_auroc = _pixel_auroc(ranker)
        pro = _aupro(m, ranker, fpr_limit, None, regions)
        del ranker
    return EvaluationResult(
        image_auroc=image_auroc(y, s),
        pixel_auroc=pix_auroc,
        aupro=pro,
        f1_max=best_f1,
        f1_threshold=best_threshold,
        per_type_image_auroc=per_type_auroc(defect_types, y, s) if defect_types is not None else {},
        n_good=int(np.count_nonzero(y == 0)),
        n_defective=int(np.count_nonzero(y == 1)),
        seconds=time.perf_counter() - start,
    )
