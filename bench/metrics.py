"""Evaluation metrics: image AUROC, pixel AUROC and the official MVTec AD AUPRO.

Every metric is computed on the raw scores. ANOMALIB normalises and clamps scores to [0, 1]
before its evaluator runs (docs/methods.md); the clamp maps a whole tail of scores onto one
value, and the ties it creates change both AUROC and AUPRO. So nothing here rescales, clips or
rounds a score, and callers must not either.

All metrics are exact, with no threshold binning:

* AUROC is the Mann-Whitney statistic with ties counted one half, which is exactly the
  trapezoid area under the ROC curve that ``sklearn.metrics.roc_auc_score`` computes.
* AUPRO is the all-threshold MVTec AD algorithm (docs/methods.md): 8-connected regions, ties
  collapsed, trapezoid integration up to the FPR limit with linear interpolation at the limit,
  divided by the limit.

Speed and memory: a category holds ~10^8 pixels (and more at native resolution), far too many
for sklearn. Scores are turned into integer keys that sort exactly like the floats (so ties stay
ties) and sorted with numpy's vectorised integer sort. AUPRO only ever sorts the ok pixels above
the FPR limit, found with a histogram pass, and streams the images block by block, so it also
works on a lazy sequence of maps (``evaluate`` upsamples each map to native size on demand).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from bench.datasets.base import GroundTruth

METRIC_LABELS: dict[str, str] = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO (native res, FPR<=0.3)",
    "aupro_model_res": "AUPRO (model res)",
}
"""Metric keys, as ``evaluate`` returns them, and the column title each is printed under."""

DEFAULT_FPR_LIMIT = 0.3

_BLOCK_PIXELS = 1 << 22  # pixels per block when streaming a (N, H, W) stack
_BUCKET_BITS = 18  # histogram of the keys' top bits, to find the AUPRO score threshold

# 8-connectivity inside each image of an (n, H, W) block and no connection between images, so
# one scipy call labels a whole block with labels that are unique across it.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True

ImageStack = np.ndarray | Sequence[Any]
"""(N, H, W) array, or a sequence of N (H_i, W_i) arrays of possibly different sizes."""


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
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


def _auc_from_keys(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC = P(pos > neg) + P(pos == neg) / 2; sorts its arguments in place."""
    pos.sort()
    neg.sort()
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_equal = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((int(below) + int(below_or_equal)) / (2.0 * pos.size * neg.size))


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
    masks = _to_numpy(masks) if isinstance(masks, torch.Tensor) else masks
    maps = _to_numpy(maps) if isinstance(maps, torch.Tensor) else maps
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = masks[None]
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        maps = maps[None]
    return masks, maps


# --------------------------------------------------------------------------- AUROC


def image_auroc(labels: Any, scores: Any) -> float | None:
    """Image-level ROC AUC, exact with ties; None when only one class is present (undefined)."""
    labels = _to_numpy(labels).ravel()
    keys = _ordered_keys(_to_numpy(scores).ravel())
    if labels.shape != keys.shape:
        raise ValueError(f"{labels.size} labels but {keys.size} scores")
    positive = labels != 0
    if positive.all() or not positive.any():
        return None
    return _auc_from_keys(keys[positive], keys[~positive])


def pixel_auroc(masks: ImageStack, maps: ImageStack) -> float | None:
    """ROC AUC over all pixels of all images, exact with ties (what sklearn would return).

    Sorting ~10^8 integer keys takes seconds where sklearn would take minutes and gigabytes.
    Returns None when the pixels hold only one class.
    """
    masks, maps = _prepare(masks, maps)
    key_dtype = _stack_key_dtype(maps)
    if key_dtype is None:
        return None
    n_total = 0
    for mask, _ in _blocks(masks, maps):
        n_total += mask.size
    # Keys of all pixels in one array (no gather of the ~97% normal pixels), and of the
    # positives apart; #negatives below s = #pixels below s - #positives below s.
    every = np.empty(n_total, dtype=key_dtype)
    positives: list[np.ndarray] = []
    filled = 0
    for mask, score in _blocks(masks, maps):
        keys = _ordered_keys(score).ravel()
        _check_key_dtype(keys, key_dtype)
        every[filled : filled + keys.size] = keys
        filled += keys.size
        positives.append(keys[np.flatnonzero(mask != 0)])  # bool: numpy's fast path
    pos = np.concatenate(positives)
    del positives
    n_pos = pos.size
    n_neg = n_total - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    every.sort()
    pos.sort()
    below = int(np.searchsorted(every, pos, side="left").sum(dtype=np.int64))
    below_or_equal = int(np.searchsorted(every, pos, side="right").sum(dtype=np.int64))
    below -= int(np.searchsorted(pos, pos, side="left").sum(dtype=np.int64))
    below_or_equal -= int(np.searchsorted(pos, pos, side="right").sum(dtype=np.int64))
    return float((below + below_or_equal) / (2.0 * n_pos * n_neg))


# --------------------------------------------------------------------------- AUPRO


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

    The exact official MVTec AD algorithm (docs/methods.md), computed without sorting every
    pixel. Masks and maps are (N, H, W) arrays or sequences of per-image 2-D arrays (native
    resolution, sizes may differ); the maps may be a lazy sequence, read twice. Returns None when
    the masks hold no region or no ok pixel.

    Why it is exact: the FPR only moves at ok-pixel scores, so the trapezoid area is a sum over
    ok pixels p above the limit threshold v* of (PRO(>s_p) + PRO(>=s_p)) / 2 / n_ok, plus the
    interpolated part of the segment at v*. The first sum is rewritten per region pixel q as
    w_q * (#ok pixels in (v*, s_q) + #ok pixels equal to s_q / 2), which needs only the sorted
    ok scores above v* and a binary search per region pixel; ties are collapsed by construction.
    v* is the m-th largest ok score (m = first count with m / n_ok > limit), located with a
    histogram of the keys' top bits so only its bucket and above are ever copied.
    """
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
        anomalous = mask.reshape(len(mask), -1).any(axis=1)
        if not anomalous.any():
            continue
        labels, n_labels = ndimage.label(mask[anomalous], structure=_STRUCTURE_3D)
        where = np.flatnonzero(labels != 0)  # region pixels, flat in the anomalous sub-block
        ids = labels.ravel()[where] - 1
        pixels = labels[0].size
        where = np.flatnonzero(anomalous)[where // pixels] * pixels + where % pixels
        n_ok -= where.size
        hist -= np.bincount(buckets.ravel()[where], minlength=hist.size)
        region_keys.append(keys.ravel()[where])
        region_ids.append(ids + n_regions)
        region_sizes.append(np.bincount(ids, minlength=n_labels))
        n_regions += n_labels
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
        tensor = torch.from_numpy(np.ascontiguousarray(score, dtype=np.float32))[None, None]
        with torch.no_grad():
            out = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
        return out[0, 0].numpy()


def evaluate(gt: GroundTruth, scores: Any, maps: Any) -> dict[str, float | None]:
    """All metrics of one cell on raw scores; pixel metrics are None (absent) without masks.

    ``pixel_auroc`` and ``aupro_model_res`` use the masks at model resolution (nearest-resized,
    as ANOMALIB does); ``aupro`` is the official number, at the ground truth's native
    resolution with each map upsampled bilinearly to its mask's size.
    """
    result: dict[str, float | None] = dict.fromkeys(METRIC_LABELS)
    scores = _to_numpy(scores).ravel()
    if scores.size != len(gt.labels):
        raise ValueError(f"{scores.size} image scores for {len(gt.labels)} test images")
    result["image_auroc"] = image_auroc(gt.labels, scores)
    if gt.masks is None or maps is None:
        return result
    maps = _to_numpy(maps)
    if maps.shape != gt.masks.shape:
        raise ValueError(f"anomaly maps {maps.shape} but masks {gt.masks.shape}")
    result["pixel_auroc"] = pixel_auroc(gt.masks, maps)
    result["aupro_model_res"] = aupro(gt.masks, maps)
    if gt.native_masks is not None:
        native = _NativeMaps(maps, [m.shape for m in gt.native_masks])
        result["aupro"] = aupro(gt.native_masks, native)
    return result


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    labels: Any, scores: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float] | None:
    """Percentile confidence interval of the image AUROC, deterministic given ``seed``.

    Stratified: each replicate resamples the normal and the anomalous images separately, with
    replacement, so every replicate keeps both classes and the class balance of the test set.
    Returns None when only one class is present.
    """
    labels = _to_numpy(labels).ravel()
    keys = _ordered_keys(_to_numpy(scores).ravel())
    if labels.shape != keys.shape:
        raise ValueError(f"{labels.size} labels but {keys.size} scores")
    positive = labels != 0
    pos, neg = keys[positive], keys[~positive]
    if pos.size == 0 or neg.size == 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        values[b] = _auc_from_keys(
            pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)]
        )
    low, high = np.percentile(values, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)
