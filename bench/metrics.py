"""Evaluation metrics of one cell, the evidence to resample them, and bootstrap intervals.

Every metric is computed on the raw scores. Normalising and clamping scores to [0, 1] before
evaluation (ANOMALIB's post-processor does) maps a whole tail of scores onto one value, and the
ties it creates change AUROC, AP, F1 and AUPRO. So nothing here rescales, clips or rounds a
score, and callers must not either.

The metrics, each declared once in ``METRICS``, are exact, with no threshold binning:

* AUROC is the Mann-Whitney statistic with ties counted one half, which is exactly the
  trapezoid area under the ROC curve that ``sklearn.metrics.roc_auc_score`` computes.
* AP is the step-wise area under the precision-recall curve with one point per distinct score,
  what ``sklearn.metrics.average_precision_score`` computes.
* F1-max is the largest F1 over every distinct-score threshold (anomalous: score >= threshold),
  the maximum the field takes over the precision-recall curve.
* AUPRO is the official MVTec AD algorithm: 8-connected regions that weigh the same, every
  threshold with ties collapsed, trapezoid integration up to the FPR limit with linear
  interpolation at the limit, divided by the limit. ``aupro_cflow`` is CFLOW-AD's own routine,
  which differs (see ``aupro_cflow``).

Speed and memory: a category holds ~10^8 pixels (and more at native resolution), far too many
for sklearn. Scores are turned into integer keys that sort exactly like the floats (so ties stay
ties) and sorted with numpy's vectorised integer sort; pixel AUROC, AP and F1-max share one
sort. AUPRO only ever sorts the ok pixels above the FPR limit, found with a histogram pass, and
streams the images block by block, so it also works on a lazy sequence of maps (``evaluate``
upsamples each map to native size on demand).

Confidence intervals resample the test images, stratified by label. Re-sorting 10^8 pixels per
resample would be far too slow, so ``evaluate_with_evidence`` also returns an ``Evidence``: per
image, counts of its ok pixels and of each of its regions' pixels on one fine grid of score
quantiles. A resample is then a weighted sum of those counts (weights: how often each image is
drawn). Image metrics are resampled exactly from the image scores.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.errors import BenchError

if TYPE_CHECKING:  # reading stored evidence (bench report, compare) needs no torch
    from bench.datasets.pipeline import GroundTruth

DEFAULT_FPR_LIMIT = 0.3
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
EVIDENCE_FORMAT = "flowad-bench evidence 1"

_BLOCK_PIXELS = 1 << 22  # pixels per block when streaming a (N, H, W) stack
_BUCKET_BITS = 18  # histogram of the keys' top bits, to find the AUPRO score threshold
_FINE_BITS = 20  # the evidence grid is cut from 2**20 fine buckets spanning the maps' keys
_GRID_BINS = 2048  # bins of an evidence grid (about)
_CFLOW_STEPS = 1000  # thresholds of CFLOW-AD's AUPRO routine
_RESAMPLE_CHUNK = 100  # resamples computed together: bounds memory at chunk x grid bins

# 8-connectivity inside each image of an (n, H, W) block and no connection between images, so
# one scipy call labels a whole block with labels that are unique across it.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True
_STRUCTURE_2D = np.ones((3, 3), dtype=bool)

ImageStack = np.ndarray | Sequence[Any]
"""(N, H, W) array, or a sequence of N (H_i, W_i) arrays of possibly different sizes."""


# --------------------------------------------------------------------------- helpers


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_numpy(x: Any) -> np.ndarray:
    if _is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _key_dtype(dtype: np.dtype) -> np.dtype:
    if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
        return np.dtype(np.int64)
    if dtype in (np.float16, np.float32):
        return np.dtype(np.int32)
    return np.dtype(np.int64)


def _ordered_keys(values: np.ndarray) -> np.ndarray:
    """Integers that sort exactly like ``values``: equal scores get equal keys, so ties survive.

    A float's bits read as a sign-magnitude integer: key = +magnitude or -magnitude. -0.0 and
    +0.0 both become 0, so they tie as they do under float comparison. Returns a new array.
    """
    v = np.asarray(values)
    if v.dtype == np.bool_ or np.issubdtype(v.dtype, np.integer):
        return v.astype(np.int64)
    if v.dtype == np.float16:
        v = v.astype(np.float32)
    elif v.dtype not in (np.float32, np.float64):
        v = v.astype(np.float64)
    if v.size and np.isnan(np.min(v)):  # min propagates NaN: one pass, no temporary
        raise ValueError("scores contain NaN; a metric is undefined on NaN scores")
    int_type = np.int32 if v.dtype == np.float32 else np.int64
    bits = v.view(int_type)
    sign = bits >> (8 * v.dtype.itemsize - 1)  # 0 or -1
    keys = bits & int_type(np.iinfo(int_type).max)  # magnitude, a fresh array
    keys ^= sign
    keys -= sign  # two's-complement negation where the sign bit was set
    return keys


def _unsigned(keys: np.ndarray) -> np.ndarray:
    """Keys as unsigned integers of the same order (sign bit flipped)."""
    if keys.dtype == np.int32:
        return keys.view(np.uint32) ^ np.uint32(1 << 31)
    return keys.view(np.uint64) ^ np.uint64(1 << 63)


def _bucket(keys: np.ndarray) -> np.ndarray:
    """The top ``_BUCKET_BITS`` bits of each key, in [0, 2**_BUCKET_BITS): a monotone bin."""
    bits = 8 * keys.dtype.itemsize
    return (keys >> (bits - _BUCKET_BITS)) + keys.dtype.type(1 << (_BUCKET_BITS - 1))


def _bucket_floor(bucket: int, dtype: np.dtype) -> int:
    """The smallest key that falls in ``bucket`` (inverse of ``_bucket``)."""
    bits = 8 * dtype.itemsize
    return (bucket - (1 << (_BUCKET_BITS - 1))) << (bits - _BUCKET_BITS)


def _argsort_keys(keys: np.ndarray) -> np.ndarray:
    """argsort of integer keys; int32 keys go through numpy's fast (SIMD) uint64 sort."""
    if keys.dtype == np.int32 and keys.size < (1 << 32):
        packed = _unsigned(keys).astype(np.uint64) << np.uint64(32)
        packed |= np.arange(keys.size, dtype=np.uint64)
        packed.sort()
        return (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
    return np.argsort(keys, kind="stable")


def _blocks(masks: ImageStack, maps: ImageStack) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(mask, map) pairs as (n, H, W) blocks: consecutive images of a stack, or one image each."""
    if isinstance(masks, np.ndarray) and isinstance(maps, np.ndarray) and masks.ndim == 3:
        if masks.shape != maps.shape:
            raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
        n, h, w = masks.shape
        step = max(1, _BLOCK_PIXELS // max(1, h * w))
        for start in range(0, n, step):
            yield masks[start : start + step], maps[start : start + step]
        return
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} maps")
    for i in range(len(masks)):
        mask = _to_numpy(masks[i])
        score = _to_numpy(maps[i])
        if mask.ndim != 2 or mask.shape != score.shape:
            raise ValueError(
                f"image {i}: mask {mask.shape} and map {score.shape} must be equal 2-D shapes"
            )
        yield mask[None], score[None]


def _stack_key_dtype(maps: ImageStack) -> np.dtype | None:
    if len(maps) == 0:
        return None
    return _key_dtype(_to_numpy(maps[0]).dtype)


def _check_key_dtype(keys: np.ndarray, expected: np.dtype) -> None:
    if keys.dtype != expected:
        raise ValueError("all anomaly maps must share one dtype")


def _prepare(masks: ImageStack, maps: ImageStack) -> tuple[ImageStack, ImageStack]:
    masks = _to_numpy(masks) if _is_tensor(masks) else masks
    maps = _to_numpy(maps) if _is_tensor(maps) else maps
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = masks[None]
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        maps = maps[None]
    return masks, maps


# --------------------------------------------------------------------------- AUROC, AP, F1-max


@dataclass
class _Ranking:
    """Positives in groups of one score, and what a threshold at each group's score sees.

    A group is one positive image or pixel, or in a resample one score bin; then every array has
    a leading resample axis and holds weighted counts. At a threshold equal to a group's score
    (anomalous: score >= threshold) ``tp`` positives and ``predicted`` samples in all are called
    anomalous; ``neg_below`` and ``neg_tied`` count the negatives scoring below and equal.
    """

    count: Any  # positives in each group: 1 for single images and pixels
    neg_below: np.ndarray
    neg_tied: np.ndarray
    tp: np.ndarray
    predicted: np.ndarray
    n_pos: Any  # int, or one per resample
    n_neg: Any


def _auroc(r: _Ranking) -> Any:
    """P(pos > neg) + P(pos == neg) / 2; integer counts keep the numerator exact."""
    return np.sum(r.count * (2 * r.neg_below + r.neg_tied), axis=-1) / (2.0 * r.n_pos * r.n_neg)


def _average_precision(r: _Ranking) -> Any:
    """Sum over groups of the recall each adds times the precision at its threshold."""
    precision = np.divide(
        r.tp, r.predicted, out=np.zeros(np.shape(r.predicted)), where=r.predicted > 0
    )
    return np.sum(r.count * precision, axis=-1) / r.n_pos


def _f1_max(r: _Ranking) -> Any:
    """Largest F1 = 2 TP / (TP + FP + P) over thresholds at the positives' scores.

    Moving a threshold up to the next positive score only drops false positives, so the maximum
    over every distinct score is reached at a positive's score.
    """
    return np.max(2.0 * r.tp / (r.predicted + np.expand_dims(r.n_pos, -1)), axis=-1)


def _ranking(pos: np.ndarray, every: np.ndarray) -> _Ranking | None:
    """Exact ranking of the positive keys among all keys; sorts both arrays in place."""
    n_pos, n_all = pos.size, every.size
    if n_pos == 0 or n_pos == n_all:
        return None
    pos.sort()
    every.sort()
    # #all below minus #positives below = #negatives below; the same with <= for the ties.
    left_all = np.searchsorted(every, pos, side="left")
    left_pos = np.searchsorted(pos, pos, side="left")
    neg_tied = np.searchsorted(every, pos, side="right")
    neg_tied -= np.searchsorted(pos, pos, side="right")
    neg_below = left_all - left_pos
    neg_tied -= neg_below
    tp = np.subtract(n_pos, left_pos, out=left_pos)
    predicted = np.subtract(n_all, left_all, out=left_all)
    return _Ranking(1, neg_below, neg_tied, tp, predicted, n_pos, n_all - n_pos)


def _value(ranking: _Ranking | None, statistic: Callable[[_Ranking], Any]) -> float | None:
    return None if ranking is None else float(statistic(ranking))


def _image_ranking(labels: Any, scores: Any) -> _Ranking | None:
    labels = _to_numpy(labels).ravel()
    keys = _ordered_keys(_to_numpy(scores).ravel())
    if labels.shape != keys.shape:
        raise ValueError(f"{labels.size} labels but {keys.size} scores")
    return _ranking(keys[labels != 0], keys)


def _pixel_ranking(masks: ImageStack, maps: ImageStack) -> _Ranking | None:
    """Every pixel of every image ranked, from one sort of ~10^8 integer keys."""
    masks, maps = _prepare(masks, maps)
    key_dtype = _stack_key_dtype(maps)
    if key_dtype is None:
        return None
    n_total = 0
    for mask, _ in _blocks(masks, maps):
        n_total += mask.size
    # Keys of all pixels in one array (no gather of the ~97% normal pixels), and of the
    # positives apart; the ranking subtracts the positives' ranks to get the negatives'.
    every = np.empty(n_total, dtype=key_dtype)
    positives: list[np.ndarray] = []
    filled = 0
    for mask, score in _blocks(masks, maps):
        keys = _ordered_keys(score).ravel()
        _check_key_dtype(keys, key_dtype)
        every[filled : filled + keys.size] = keys
        filled += keys.size
        positives.append(keys[np.flatnonzero(mask != 0)])  # bool: numpy's fast path
    return _ranking(np.concatenate(positives), every)


def image_auroc(labels: Any, scores: Any) -> float | None:
    """Image-level ROC AUC, exact with ties; None when only one class is present (undefined)."""
    return _value(_image_ranking(labels, scores), _auroc)


def image_ap(labels: Any, scores: Any) -> float | None:
    """Image-level average precision (sklearn's); None when only one class is present."""
    return _value(_image_ranking(labels, scores), _average_precision)


def image_f1max(labels: Any, scores: Any) -> float | None:
    """Image-level F1 at its best threshold; None when only one class is present."""
    return _value(_image_ranking(labels, scores), _f1_max)


def pixel_auroc(masks: ImageStack, maps: ImageStack) -> float | None:
    """ROC AUC over all pixels of all images, exact with ties (what sklearn would return).

    Sorting ~10^8 integer keys takes seconds where sklearn would take minutes and gigabytes.
    Returns None when the pixels hold only one class.
    """
    return _value(_pixel_ranking(masks, maps), _auroc)


def pixel_ap(masks: ImageStack, maps: ImageStack) -> float | None:
    """Average precision over all pixels of all images, exact with ties (sklearn's)."""
    return _value(_pixel_ranking(masks, maps), _average_precision)


def pixel_f1max(masks: ImageStack, maps: ImageStack) -> float | None:
    """F1 over all pixels of all images at the best single threshold, exact with ties."""
    return _value(_pixel_ranking(masks, maps), _f1_max)


# --------------------------------------------------------------------------- AUPRO


_Regions = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""Pixels of the regions of one block: flat index in the block and region id per counted
pixel, then per region its size and its image in the block."""


def _regions(mask: np.ndarray) -> _Regions:
    """The 8-connected regions of an (n, H, W) block (anomalous images labelled together)."""
    pixels = mask[0].size
    anomalous = np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))
    if anomalous.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    from scipy import ndimage  # not needed to read stored evidence

    labels, n = ndimage.label(mask[anomalous], structure=_STRUCTURE_3D)
    where = np.flatnonzero(labels)
    ids = labels.ravel()[where] - 1
    where = anomalous[where // pixels] * pixels + where % pixels
    owner = np.zeros(n, dtype=np.int64)
    owner[ids] = where // pixels
    return where, ids, np.bincount(ids, minlength=n), owner


def _first_count_above(limit: float, n_ok: int) -> int:
    """Smallest m with m / n_ok > limit: the ok-pixel count of the first point past the limit."""
    m = int(np.floor(limit * n_ok)) + 1
    while m > 1 and (m - 1) / n_ok > limit:
        m -= 1
    while m <= n_ok and m / n_ok <= limit:
        m += 1
    return m


def aupro(
    masks: ImageStack, maps: ImageStack, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> float | None:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by the limit.

    The exact official MVTec AD algorithm, computed without sorting every pixel. Masks and maps
    are (N, H, W) arrays or sequences of per-image 2-D arrays (native resolution, sizes may
    differ); the maps may be a lazy sequence, read twice. Returns None when the masks hold no
    region or no ok pixel.

    Why it is exact: the FPR only moves at ok-pixel scores, so the trapezoid area is a sum over
    ok pixels p above the limit threshold v* of (PRO(>s_p) + PRO(>=s_p)) / 2 / n_ok, plus the
    interpolated part of the segment at v*. The first sum is rewritten per region pixel q as
    w_q * (#ok pixels in (v*, s_q) + #ok pixels equal to s_q / 2), which needs only the sorted
    ok scores above v* and a binary search per region pixel; ties are collapsed by construction.
    v* is the m-th largest ok score (m = first count with m / n_ok > limit), located with a
    histogram of the keys' top bits so only its bucket and above are ever copied.
    """
    return _aupro(masks, maps, fpr_limit)


def _aupro(
    masks: ImageStack, maps: ImageStack, fpr_limit: float, counter: _Counter | None = None
) -> float | None:
    """``aupro``; a ``counter`` also counts the pixels for the evidence as pass 1 reads them."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks, maps = _prepare(masks, maps)
    key_dtype = _stack_key_dtype(maps)
    if key_dtype is None:
        return None

    # Pass 1: regions (sizes, and the scores of their pixels) and a histogram of ok scores.
    n_ok = 0
    n_regions = 0
    hist = np.zeros(1 << _BUCKET_BITS, dtype=np.int64)
    region_keys: list[np.ndarray] = []
    region_ids: list[np.ndarray] = []
    region_sizes: list[np.ndarray] = []
    for mask, score in _blocks(masks, maps):
        keys = _ordered_keys(score)
        _check_key_dtype(keys, key_dtype)
        buckets = _bucket(keys)
        hist += np.bincount(buckets.ravel(), minlength=hist.size)
        n_ok += mask.size
        regions = _regions(mask)
        if counter is not None:  # official regions partition the mask: their pixels are its defects
            counter.add(mask, score, keys, regions, defect=regions[0])
        where, ids, sizes, _ = regions
        if sizes.size == 0:
            continue
        n_ok -= where.size
        hist -= np.bincount(buckets.ravel()[where], minlength=hist.size)
        region_keys.append(keys.ravel()[where])
        region_ids.append(ids + n_regions)
        region_sizes.append(sizes)
        n_regions += sizes.size
    if n_regions == 0 or n_ok == 0:
        return None

    # The threshold bucket: it holds v*, the m-th largest ok score.
    m = _first_count_above(fpr_limit, n_ok)
    from_top = np.cumsum(hist[::-1])
    if m > n_ok:  # the limit is 1: the whole curve counts
        first_bucket, n_kept = 0, n_ok
    else:
        i = int(np.searchsorted(from_top, m, side="left"))
        first_bucket, n_kept = hist.size - 1 - i, int(from_top[i])
    del hist, from_top

    # Pass 2: copy the ok scores of that bucket and above (every ok score >= v*), and sort them.
    top = np.empty(n_kept, dtype=key_dtype)
    filled = 0
    lowest = _bucket_floor(first_bucket, key_dtype)
    for mask, score in _blocks(masks, maps):
        keys = _ordered_keys(score)
        selected = keys >= lowest
        selected &= mask == 0
        keys = keys.ravel()[np.flatnonzero(selected)]  # faster than boolean indexing
        if filled + keys.size > n_kept:
            raise ValueError("anomaly maps changed between the two reads")
        top[filled : filled + keys.size] = keys
        filled += keys.size
    if filled != n_kept:
        raise ValueError("anomaly maps changed between the two reads")
    top.sort()

    all_region_keys = np.concatenate(region_keys)
    all_region_ids = np.concatenate(region_ids)
    # Each region weighs 1/K in PRO, each of its pixels 1/(|R_k| K).
    weight = 1.0 / (np.concatenate(region_sizes).astype(np.float64) * n_regions)
    del region_keys, region_ids, region_sizes

    if m > n_ok:
        threshold = None
        above = top
        n_gt = n_ok
        n_eq = 0
    else:
        threshold = top[top.size - m]
        right = int(np.searchsorted(top, threshold, side="right"))
        n_eq = right - int(np.searchsorted(top, threshold, side="left"))
        n_gt = top.size - right
        above = top[right:]  # ok scores strictly above v*
        keep = all_region_keys >= threshold  # region pixels below v* never count
        all_region_keys = all_region_keys[keep]
        all_region_ids = all_region_ids[keep]

    order = _argsort_keys(all_region_keys)  # sorted needles make the searches cache-friendly
    all_region_keys = all_region_keys[order]
    pixel_weight = weight[all_region_ids[order]]
    del order, all_region_ids
    below = np.searchsorted(above, all_region_keys, side="left")
    below_or_equal = np.searchsorted(above, all_region_keys, side="right")
    # np.sum, not np.dot: BLAS splits a dot product by thread count, so the last digits
    # would depend on the machine (a Ray worker and a laptop would disagree).
    area = float(np.sum(pixel_weight * ((below + below_or_equal) * 0.5))) / n_ok

    if threshold is not None:
        # Partial segment from the last point at or below the limit, (F0, P0), to the first
        # point past it, (F1, P1); PRO is interpolated linearly at the limit.
        f0 = n_gt / n_ok
        f1 = (n_gt + n_eq) / n_ok
        p1 = min(1.0, float(pixel_weight.sum()))
        p0 = min(1.0, float(pixel_weight[all_region_keys > threshold].sum()))
        dx = fpr_limit - f0
        if dx > 0.0:
            p_limit = p0 + (p1 - p0) * dx / (f1 - f0)
            area += 0.5 * dx * (p0 + p_limit)
    return area / fpr_limit


class _NativeMaps(Sequence):
    """Maps upsampled on demand to each native mask's size, one image at a time.

    Bilinear with align_corners=False, as every reference implementation resizes maps; done
    lazily because one MVTec category at native resolution is ~1.7e8 floats (0.7 GB).
    """

    def __init__(self, maps: np.ndarray, sizes: Sequence[tuple[int, int]]) -> None:
        if len(maps) != len(sizes):
            raise ValueError(f"{len(maps)} maps but {len(sizes)} native masks")
        self.maps = maps
        self.sizes = list(sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        score = np.asarray(self.maps[index])
        size = tuple(self.sizes[index])
        if score.shape == size:
            return score
        import torch
        import torch.nn.functional as F

        tensor = torch.from_numpy(np.ascontiguousarray(score, dtype=np.float32))[None, None]
        with torch.no_grad():
            out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
        return out[0, 0].numpy()


# --------------------------------------------------------------------------- CFLOW-AD's AUPRO


@dataclass(frozen=True)
class _CflowSteps:
    """CFLOW-AD's thresholds ``top - k * delta``, k < 1000, from the maps' max down by 1/1000
    of their range; a pixel is anomalous at a threshold its score is strictly above."""

    top: float
    delta: float

    @classmethod
    def of(cls, maps: np.ndarray) -> _CflowSteps | None:
        """None for constant maps: every FPR is then 0 and the routine divides 0 by 0."""
        top, bottom = np.float64(maps.max()), np.float64(maps.min())
        if np.isnan(top) or np.isnan(bottom):
            raise ValueError("scores contain NaN; a metric is undefined on NaN scores")
        if top == bottom:
            return None
        return cls(float(top), float((top - bottom) / _CFLOW_STEPS))

    def thresholds(self) -> np.ndarray:
        return self.top - np.arange(_CFLOW_STEPS) * self.delta

    def bins(self, score: np.ndarray) -> np.ndarray:
        """Per pixel, 1000 - k for the first step k whose threshold it exceeds (0: none).

        Bins ascend with the score, like every evidence grid. The step is estimated with one
        division, then moved until it matches the float64 comparisons the routine makes.
        """
        s = np.asarray(score, dtype=np.float64).ravel()
        thresholds = np.append(self.thresholds(), -np.inf)
        step = np.ceil((self.top - s) / self.delta)
        step = np.clip(step, 0, _CFLOW_STEPS, out=step).astype(np.intp)
        while True:
            later = ~(thresholds[step] < s)
            earlier = (step > 0) & (thresholds[step - 1] < s)
            if not (later.any() or earlier.any()):
                return _CFLOW_STEPS - step
            step += later
            step -= earlier


def _cflow_regions(mask: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
    """Each 8-connected region of one 2-D mask the way CFLOW-AD scores it: the flat indices of
    its hole-filled bounding-box image, and its area (its own pixels only)."""
    from scipy import ndimage  # not needed to read stored evidence

    labels, _ = ndimage.label(mask, structure=_STRUCTURE_2D)
    width = mask.shape[1]
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[box] == k
        rows, cols = np.nonzero(ndimage.binary_fill_holes(region, structure=_STRUCTURE_2D))
        yield (rows + box[0].start) * width + cols + box[1].start, int(region.sum())


def _cflow_histograms(masks: np.ndarray, maps: np.ndarray) -> _Histograms | None:
    steps = _CflowSteps.of(maps)
    if steps is None:
        return None
    counter = _Counter(lambda score, _: steps.bins(score), _CFLOW_STEPS + 1)
    for mask, score in _blocks(masks, maps):
        counter.add(mask, score, None, _filled_regions(mask))
    return counter.result()


def _cflow_area(h: _Histograms, weights: np.ndarray, fpr_limit: float) -> np.ndarray:
    """CFLOW-AD's area for each weight row: the steps' points with FPR <= the limit, their FPRs
    min-max rescaled to [0, 1], trapezoid rule; NaN where the routine divides 0 by 0."""
    fpr, pro = _pro_curve(h, weights)
    x, y = fpr[:, :0:-1], pro[:, :0:-1]  # step k's point is bin 1000 - k: bins 1000 down to 1
    kept = x <= fpr_limit  # a prefix: the FPR grows as the threshold falls
    n_kept = kept.sum(axis=1)
    low = x[:, 0]
    high = x[np.arange(len(x)), np.maximum(n_kept - 1, 0)]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = (x - low[:, None]) / (high - low)[:, None]
        strips = np.diff(scaled, axis=1) * (y[:, 1:] + y[:, :-1]) / 2.0
    area = np.sum(np.where(kept[:, 1:], strips, 0.0), axis=1)
    area[(n_kept < 2) | ~(high > low)] = np.nan
    return area


def aupro_cflow(
    masks: ImageStack, maps: ImageStack, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> float | None:
    """CFLOW-AD's own AUPRO routine (its ``--pro`` evaluation), from counts instead of 1000
    binary maps; (N, H, W) masks and maps at the model's resolution.

    How it differs from the official ``aupro``:

    * thresholds: 1000, ``max - k (max - min) / 1000`` for k = 0..999, and a pixel is anomalous
      when its score is strictly above; the official curve has a point at every distinct score.
    * regions: 8-connected, but a region's overlap is the anomalous pixels of its hole-filled
      bounding-box image divided by its area, so pixels in a hole (ok pixels, or another region)
      count in the numerator only and an overlap can exceed 1. PRO is the mean over all regions
      of all images, FPR the share of ok pixels called anomalous, as officially.
    * integration: only the steps with FPR <= the limit are kept (no point interpolated at the
      limit), their FPRs are min-max rescaled to [0, 1] and the trapezoid area taken: the area
      is divided by the largest FPR reached under the limit, not by the limit.
    * resolution: wherever it is called; ``evaluate`` uses the model's resolution, as the
      routine does.

    The region mean is summed in another order, so values agree with the routine to float
    rounding. Returns None where the routine's arithmetic is undefined (0 / 0): constant maps,
    no region, no ok pixel, fewer than two steps under the limit.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    masks = np.asarray(_to_numpy(masks))
    maps = np.asarray(_to_numpy(maps))
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    if masks.size == 0:
        return None
    h = _cflow_histograms(masks, maps)
    if h is None:
        return None
    area = float(_cflow_area(h, np.ones((1, len(h.ok))), fpr_limit)[0])
    return None if np.isnan(area) else area


# --------------------------------------------------------------------------- pixel evidence


def _from_top(counts: np.ndarray) -> np.ndarray:
    """Along the last axis: the sum of each bin and every bin above it."""
    return np.cumsum(counts[..., ::-1], axis=-1)[..., ::-1]


@dataclass
class _Histograms:
    """Per-image pixel counts on one grid of ascending score bins: a test set's pixel evidence.

    ``ok[i, g]`` counts image i's ok pixels in bin g and ``regions[k, g]`` region k's pixels in
    bin g; region k lies in image ``region_image[k]`` and its overlap is divided by
    ``region_size[k]``. Every threshold the resampled metrics use sits on a bin's lower edge.
    """

    ok: np.ndarray
    regions: np.ndarray
    region_image: np.ndarray
    region_size: np.ndarray

    @cached_property
    def ok_counts(self) -> np.ndarray:
        return self.ok.astype(np.float64)

    @cached_property
    def defect(self) -> np.ndarray:
        """Per image, its region pixels per bin (official regions partition the mask)."""
        out = np.zeros(self.ok.shape)
        np.add.at(out, self.region_image, self.regions)
        return out

    @cached_property
    def coverage(self) -> np.ndarray:
        """Per image, the sum over its regions of each region's share at or above each bin."""
        out = np.zeros(self.ok.shape)
        np.add.at(out, self.region_image, _from_top(self.regions) / self.region_size[:, None])
        return out

    @cached_property
    def region_count(self) -> np.ndarray:
        return np.bincount(self.region_image, minlength=len(self.ok)).astype(np.float64)


def _filled_regions(mask: np.ndarray) -> _Regions:
    """CFLOW-AD's regions of an (n, H, W) block: hole-filled bounding-box images, areas."""
    where, ids, sizes, owner = [], [], [], []
    for i, image_mask in enumerate(mask):
        if not image_mask.any():
            continue
        for pixels, area in _cflow_regions(image_mask):
            where.append(pixels + i * image_mask.size)
            ids.append(np.full(pixels.size, len(sizes)))
            sizes.append(area)
            owner.append(i)
    if not sizes:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    return (
        np.concatenate(where),
        np.concatenate(ids),
        np.array(sizes, dtype=np.int64),
        np.array(owner, dtype=np.int64),
    )


class _Counter:
    """Counts each image's ok pixels and each region's pixels per bin, block by block.

    ``bins_of(score, keys)`` gives the bin of every pixel of a block (``keys``: the scores'
    ordered keys when the caller has them). Region pixels are those of ``_Regions``; the ok
    pixels are the mask's zeros (``defect``: the mask's nonzero flat indices, when known).
    """

    def __init__(self, bins_of: Callable[[np.ndarray, np.ndarray | None], np.ndarray], n_bins: int):
        self.bins_of, self.n_bins = bins_of, n_bins
        self.ok: list[np.ndarray] = []
        self.regions: list[np.ndarray] = []
        self.region_image: list[np.ndarray] = []
        self.region_size: list[np.ndarray] = []
        self.images = 0

    def add(
        self,
        mask: np.ndarray,
        score: np.ndarray,
        keys: np.ndarray | None,
        regions: _Regions,
        defect: np.ndarray | None = None,
    ) -> None:
        n, pixels, n_bins = len(mask), mask[0].size, self.n_bins
        bins = self.bins_of(score, keys).reshape(n, pixels)
        index = bins if n == 1 else bins + (np.arange(n) * n_bins)[:, None]
        counts = np.bincount(index.ravel(), minlength=n * n_bins)
        if defect is None:
            defect = np.flatnonzero(mask)
        counts -= np.bincount(
            defect // pixels * n_bins + bins.ravel()[defect], minlength=n * n_bins
        )
        self.ok.append(counts.reshape(n, n_bins))
        where, ids, sizes, owner = regions
        index = np.multiply(ids, n_bins, dtype=np.int64)
        index += bins.ravel()[where]
        region_counts = np.bincount(index, minlength=sizes.size * n_bins)
        self.regions.append(region_counts.reshape(sizes.size, n_bins))
        self.region_image.append(owner + self.images)
        self.region_size.append(sizes)
        self.images += n

    def result(self) -> _Histograms:
        return _Histograms(
            ok=np.concatenate(self.ok).astype(np.int32),
            regions=np.concatenate(self.regions).astype(np.int32),
            region_image=np.concatenate(self.region_image),
            region_size=np.concatenate(self.region_size),
        )


@dataclass(frozen=True)
class _KeyGrid:
    """Score bins cut from 2**20 fine buckets spanning the maps' keys: ``lut[bucket]``.

    Fine buckets are the keys shifted right just enough for their range to fit: a bucket spans
    2.4e-4 of a score's magnitude at most for float32 maps (reached when the scores cross zero,
    the widest range of keys), much less for one-signed scores. Scores slightly out of the range
    (an upsampled map may overshoot its source by rounding) fall into the end bins.
    """

    dtype: np.dtype  # of the maps the grid was cut from: the same keys for every map binned
    shift: int
    base: int
    lut: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.lut[-1]) + 1

    def bins(self, score: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """Bin of every score; ``keys``, the scores' keys, are reused when of the grid's type."""
        if keys is None or keys.dtype != _key_dtype(self.dtype):
            keys = _ordered_keys(np.asarray(score, dtype=self.dtype))
        fine = np.right_shift(keys, self.shift)
        fine -= self.base
        return np.take(self.lut, fine, mode="clip")


def _key_grid(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> _KeyGrid:
    """The evidence grid of a cell, from one pass over its model-resolution maps.

    Every occupied fine bucket is a bin when there are few (then resampled values are exact);
    otherwise a quarter of the cuts follow the ok pixels over their whole range (the ROC), half
    follow the ok pixels of the top 2 x fpr_limit (the stretch of the PRO curve AUPRO integrates,
    with room for a resample's limit to move) and a quarter the defect pixels (precision).
    """
    ends = _ordered_keys(np.array([maps.min(), maps.max()], dtype=maps.dtype))
    low, high = int(ends[0]), int(ends[1])
    shift = 0
    while (high >> shift) - (low >> shift) >= 1 << _FINE_BITS:
        shift += 1
    base = low >> shift
    size = (high >> shift) - base + 1
    every = np.zeros(size, dtype=np.int64)
    defect = np.zeros(size, dtype=np.int64)
    for mask, score in _blocks(masks, maps):
        fine = (_ordered_keys(score) >> shift).ravel() - base
        every += np.bincount(fine, minlength=size)
        defect += np.bincount(fine[np.flatnonzero(mask)], minlength=size)
    ok = every - defect
    cuts = np.flatnonzero(every)
    if cuts.size > _GRID_BINS:
        quarter = _GRID_BINS // 4
        ok_cum, defect_cum = np.cumsum(ok), np.cumsum(defect)
        top = min(1.0, 2.0 * fpr_limit)
        cuts = np.concatenate(
            [
                np.searchsorted(
                    ok_cum, np.linspace(0, ok_cum[-1], quarter, endpoint=False), "right"
                ),
                np.searchsorted(
                    ok_cum,
                    ok_cum[-1] * (1 - np.linspace(0, top, 2 * quarter, endpoint=False)),
                    "right",
                ),
                np.searchsorted(
                    defect_cum, np.linspace(0, defect_cum[-1], quarter, endpoint=False), "right"
                ),
            ]
        )
    edges = np.unique(np.concatenate([[0], np.minimum(cuts, size - 1)]))
    lut = np.searchsorted(edges, np.arange(size), side="right") - 1
    return _KeyGrid(maps.dtype, shift, base, lut.astype(np.int32))


# --------------------------------------------------------------------------- resampled metrics


def _ranking_of_counts(pos: np.ndarray, neg: np.ndarray) -> _Ranking:
    """Ranking from (B, G) weighted counts of positives and negatives per ascending bin."""
    neg_cum = np.cumsum(neg, axis=1)
    tp = _from_top(pos)
    return _Ranking(
        count=pos,
        neg_below=neg_cum - neg,
        neg_tied=neg,
        tp=tp,
        predicted=tp + _from_top(neg),
        n_pos=tp[:, 0],
        n_neg=neg_cum[:, -1],
    )


def _weighted_image_ranking(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> _Ranking:
    """Exact ranking of a resample of images: groups of tied scores, weighted counts."""
    keys = _ordered_keys(scores)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    positive = labels[order] != 0
    w = weights[:, order].astype(np.float64)
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    return _ranking_of_counts(pos, neg)


def _binned_ranking(h: _Histograms, weights: np.ndarray) -> _Ranking:
    # Integer counts in float64: every matrix product is exact, whatever BLAS sums first.
    w = weights.astype(np.float64)
    return _ranking_of_counts(w @ h.defect, w @ h.ok_counts)


def _pro_curve(h: _Histograms, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at a threshold on each bin's lower edge, (B, G) each."""
    w = weights.astype(np.float64)
    ok = _from_top(w @ h.ok_counts)
    # einsum without BLAS: fractions summed in a fixed order, the same last digit everywhere
    covered = np.einsum("bn,ng->bg", w, h.coverage)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ok / ok[:, :1], covered / (w @ h.region_count)[:, None]


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """Trapezoid area under each row's curve from x = 0 to ``limit`` (y interpolated linearly
    at the limit), divided by the limit; x must not decrease along a row."""
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    width = np.clip(np.minimum(x1, limit) - x0, 0.0, None)
    crossing = (x0 < limit) & (x1 > limit)
    with np.errstate(invalid="ignore", divide="ignore"):
        at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    y_end = np.where(crossing, at_limit, y1)
    return np.sum(width * (y0 + y_end), axis=1) / 2.0 / limit


def _binned_aupro(h: _Histograms, weights: np.ndarray, fpr_limit: float) -> np.ndarray:
    """The official AUPRO of each weight row, from (0, 0) through every bin edge from the top."""
    fpr, pro = _pro_curve(h, weights)
    origin = np.zeros((len(fpr), 1))
    x = np.concatenate([origin, fpr[:, ::-1]], axis=1)
    y = np.concatenate([origin, np.minimum(pro[:, ::-1], 1.0)], axis=1)
    return _area_to_limit(x, y, fpr_limit)


# --------------------------------------------------------------------------- one cell


class _Cell:
    """One cell's ground truth, image scores and maps; what several metrics share is computed
    once: the pixel sort, CFLOW-AD's counts, the lazily upsampled native maps. With
    ``evidence``, each AUPRO pass also counts its pixels on the cell's evidence grid."""

    def __init__(
        self, gt: GroundTruth, scores: Any, maps: Any, fpr_limit: float, evidence: bool
    ) -> None:
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.scores = _to_numpy(scores).ravel()
        if self.scores.size != len(gt.labels):
            raise ValueError(f"{self.scores.size} image scores for {len(gt.labels)} test images")
        self.labels = (np.asarray(gt.labels).ravel() != 0).astype(np.int8)
        self.fpr_limit = fpr_limit
        self.with_evidence = evidence
        self.masks: np.ndarray | None = None
        self.maps: np.ndarray | None = None
        self.native_masks: Sequence[np.ndarray] | None = None
        if gt.masks is not None and maps is not None:
            maps = _to_numpy(maps)
            if maps.shape != gt.masks.shape:
                raise ValueError(f"anomaly maps {maps.shape} but masks {gt.masks.shape}")
            if maps.size:
                self.masks, self.maps, self.native_masks = gt.masks, maps, gt.native_masks

    @cached_property
    def image_ranking(self) -> _Ranking | None:
        return _image_ranking(self.labels, self.scores)

    @cached_property
    def pixel_ranking(self) -> _Ranking | None:
        return None if self.masks is None else _pixel_ranking(self.masks, self.maps)

    @cached_property
    def grid(self) -> _KeyGrid | None:
        if not self.with_evidence or self.masks is None or self.maps is None:
            return None
        return _key_grid(self.masks, self.maps, self.fpr_limit)

    def _aupro(
        self, masks: ImageStack | None, maps: ImageStack | None
    ) -> tuple[float | None, _Histograms | None]:
        if masks is None or maps is None:
            return None, None
        counter = None if self.grid is None else _Counter(self.grid.bins, self.grid.n_bins)
        value = _aupro(masks, maps, self.fpr_limit, counter)
        return value, None if counter is None else counter.result()

    @cached_property
    def model_aupro(self) -> tuple[float | None, _Histograms | None]:
        return self._aupro(self.masks, self.maps)

    @cached_property
    def native_aupro(self) -> tuple[float | None, _Histograms | None]:
        if self.native_masks is None or self.maps is None:
            return None, None
        shapes = getattr(self.native_masks, "shapes", None)  # known without rebuilding a mask
        native = _NativeMaps(self.maps, shapes or [m.shape for m in self.native_masks])
        return self._aupro(self.native_masks, native)

    @cached_property
    def cflow(self) -> _Histograms | None:
        return None if self.masks is None else _cflow_histograms(self.masks, self.maps)

    def evidence(self, values: dict[str, float | None]) -> Evidence:
        return Evidence(
            self.labels,
            self.scores,
            self.fpr_limit,
            dict(values),
            self.model_aupro[1],
            self.native_aupro[1],
            self.cflow,
        )


def _cflow_aupro(cell: _Cell) -> float | None:
    if cell.cflow is None:
        return None
    area = float(_cflow_area(cell.cflow, np.ones((1, len(cell.labels))), cell.fpr_limit)[0])
    return None if np.isnan(area) else area


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Metric:
    """One metric column: its title, whether it needs masks (``level`` "pixel") or not
    ("image"), its value on a cell, and its values on resamples of the cell's test images
    (``resampled``: one per row of image weights)."""

    name: str
    label: str
    level: str
    value: Callable[[_Cell], float | None]
    resampled: Callable[[Evidence, np.ndarray], np.ndarray]


def _image_metric(name: str, label: str, statistic: Callable[[_Ranking], Any]) -> Metric:
    return Metric(
        name,
        label,
        "image",
        lambda cell: _value(cell.image_ranking, statistic),
        lambda ev, w: statistic(_weighted_image_ranking(ev.labels, ev.scores, w)),
    )


def _pixel_metric(name: str, label: str, statistic: Callable[[_Ranking], Any]) -> Metric:
    """Pixel rankings are at the model's resolution, on the nearest-resized masks (as ANOMALIB
    computes them); nothing at native resolution would change but the cost."""
    return Metric(
        name,
        label,
        "pixel",
        lambda cell: _value(cell.pixel_ranking, statistic),
        lambda ev, w: statistic(_binned_ranking(ev.model, w)),
    )


METRICS: tuple[Metric, ...] = (
    _image_metric("image_auroc", "image AUROC", _auroc),
    _pixel_metric("pixel_auroc", "pixel AUROC", _auroc),
    Metric(
        "aupro",
        "AUPRO (native res, FPR<=0.3)",
        "pixel",
        lambda cell: cell.native_aupro[0],
        lambda ev, w: _binned_aupro(ev.native, w, ev.fpr_limit),
    ),
    Metric(
        "aupro_model_res",
        "AUPRO (model res)",
        "pixel",
        lambda cell: cell.model_aupro[0],
        lambda ev, w: _binned_aupro(ev.model, w, ev.fpr_limit),
    ),
    _image_metric("image_ap", "image AP", _average_precision),
    _pixel_metric("pixel_ap", "pixel AP", _average_precision),
    _image_metric("image_f1max", "image F1-max", _f1_max),
    _pixel_metric("pixel_f1max", "pixel F1-max", _f1_max),
    Metric(
        "aupro_cflow",
        "AUPRO (CFLOW-AD's routine, model res)",
        "pixel",
        _cflow_aupro,
        lambda ev, w: _cflow_area(ev.cflow, w, ev.fpr_limit),
    ),
)
"""Every metric column, in table order; a new metric is one declaration here. ``aupro`` is the
official number (native resolution, each map upsampled bilinearly to its mask's size);
``aupro_model_res`` is the same algorithm at the model's resolution on nearest-resized masks,
as ANOMALIB reports it. Every AUPRO is taken at the cell's FPR limit (``evaluate``)."""

METRIC_LABELS: dict[str, str] = {m.name: m.label for m in METRICS}
"""Metric keys, as ``evaluate`` returns them, and the column title each is printed under."""

INTERVAL_COLUMNS: tuple[str, ...] = tuple(
    f"{m.name}{end}" for m in METRICS for end in ("_lo", "_hi")
)
"""Keys of ``confidence_intervals``: each metric's lower and upper bound."""

_METRIC = {m.name: m for m in METRICS}


def evaluate(
    gt: GroundTruth, scores: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> dict[str, float | None]:
    """Every metric of one cell on raw scores; pixel metrics are None (absent) without masks."""
    cell = _Cell(gt, scores, maps, fpr_limit, evidence=False)
    return {m.name: m.value(cell) for m in METRICS}


def evaluate_with_evidence(
    gt: GroundTruth, scores: Any, maps: Any, fpr_limit: float = DEFAULT_FPR_LIMIT
) -> tuple[dict[str, float | None], Evidence]:
    """``evaluate``'s values, and the evidence their confidence intervals are resampled from."""
    cell = _Cell(gt, scores, maps, fpr_limit, evidence=True)
    values = {m.name: m.value(cell) for m in METRICS}
    return values, cell.evidence(values)


# --------------------------------------------------------------------------- evidence


_PARTS = ("model", "native", "cflow")
_HISTOGRAM_FIELDS = ("ok", "regions", "region_image", "region_size")


@dataclass
class Evidence:
    """What resampling one cell's test images needs, small enough to keep beside its row.

    ``labels`` (0 normal, 1 anomalous) and ``scores`` per test image; ``values``, the exact
    metrics; ``model`` and ``native``, per-image counts of ok and region pixels on the cell's
    quantile grid at model and at native resolution; ``cflow``, the same on CFLOW-AD's 1000
    thresholds with its filled regions. A part is None where the cell has no such pixels.
    """

    labels: np.ndarray
    scores: np.ndarray
    fpr_limit: float
    values: dict[str, float | None]
    model: _Histograms | None = None
    native: _Histograms | None = None
    cflow: _Histograms | None = None

    def save(self, path: str | Path) -> None:
        """Write a compressed .npz (written aside, then renamed into place)."""
        path = Path(path)
        arrays = {
            "format": np.array(EVIDENCE_FORMAT),
            "labels": self.labels,
            "scores": self.scores,
            "fpr_limit": np.array(self.fpr_limit),
            "value_names": np.array(list(self.values), dtype=str),
            "value_numbers": np.array(
                [np.nan if v is None else v for v in self.values.values()], dtype=np.float64
            ),
        }
        for part in _PARTS:
            histograms = getattr(self, part)
            if histograms is not None:
                for field in _HISTOGRAM_FIELDS:
                    arrays[f"{part}_{field}"] = getattr(histograms, field)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Evidence:
        try:
            with np.load(path, allow_pickle=False) as data:
                if "format" not in data or str(data["format"]) != EVIDENCE_FORMAT:
                    raise BenchError(f"{path}: not a {EVIDENCE_FORMAT!r} file; recompute the cell")
                parts = {
                    part: _Histograms(*(data[f"{part}_{f}"] for f in _HISTOGRAM_FIELDS))
                    if f"{part}_ok" in data
                    else None
                    for part in _PARTS
                }
                names = data["value_names"].tolist()
                numbers = data["value_numbers"].tolist()
                return cls(
                    labels=data["labels"],
                    scores=data["scores"],
                    fpr_limit=float(data["fpr_limit"]),
                    values={
                        n: None if np.isnan(v) else v for n, v in zip(names, numbers, strict=True)
                    },
                    **parts,
                )
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise BenchError(
                f"{path}: unreadable evidence file ({exc}); recompute the cell"
            ) from exc


# --------------------------------------------------------------------------- bootstrap


def bootstrap_weights(
    labels: Any, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> np.ndarray:
    """How many times each test image is drawn in each resample: (n_resamples, n) counts.

    Stratified: the normal and the anomalous images are drawn apart, with replacement, each as
    many as there are, so every resample keeps both classes and the test set's balance. The
    draws depend only on the labels and the seed, so two methods evaluated on the same test
    images are resampled identically (paired).
    """
    positive = _to_numpy(labels).ravel() != 0
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_resamples, positive.size), dtype=np.int32)
    for stratum in (np.flatnonzero(~positive), np.flatnonzero(positive)):
        m = stratum.size
        if m == 0:
            continue
        draws = rng.integers(0, m, size=(n_resamples, m))
        draws += (np.arange(n_resamples) * m)[:, None]
        weights[:, stratum] = np.bincount(draws.ravel(), minlength=n_resamples * m).reshape(
            n_resamples, m
        )
    return weights


def resampled_values(evidence: Evidence, name: str, weights: np.ndarray) -> np.ndarray:
    """The metric ``name`` on each resample (a row of image weights); NaN where undefined.

    Pixel metrics are computed on the evidence's grid; its discretisation error, measured on
    the whole test set, is removed from every resample, so the resamples centre on the exact
    value (image metrics are exact and the correction is zero to rounding).
    """
    metric = _METRIC[name]
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.shape[1] != len(evidence.labels):
        raise ValueError(f"weights {weights.shape} for {len(evidence.labels)} test images")
    exact = evidence.values.get(name)
    if exact is None:
        return np.full(len(weights), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        whole = metric.resampled(evidence, np.ones((1, weights.shape[1])))[0]
        values = [
            metric.resampled(evidence, weights[start : start + _RESAMPLE_CHUNK])
            for start in range(0, len(weights), _RESAMPLE_CHUNK)
        ]
    return np.concatenate(values) + (exact - whole)


def percentile_interval(
    values: np.ndarray, level: float = DEFAULT_LEVEL
) -> tuple[float, float] | None:
    """Percentile interval of the finite values; None when there are none."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(low), float(high)


def confidence_intervals(
    evidence: Evidence,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, float | None]:
    """Stratified bootstrap percentile interval of every metric: ``INTERVAL_COLUMNS`` keys,
    None where the metric is absent."""
    weights = bootstrap_weights(evidence.labels, n_resamples, seed)
    out: dict[str, float | None] = {}
    for metric in METRICS:
        interval = percentile_interval(resampled_values(evidence, metric.name, weights), level)
        out[f"{metric.name}_lo"], out[f"{metric.name}_hi"] = interval or (None, None)
    return out
