"""Metrics against sklearn, a slow all-threshold AUPRO reference, and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from bench import metrics
from bench.datasets.pipeline import GroundTruth
from bench.metrics import (
    METRIC_LABELS,
    aupro,
    bootstrap_ci,
    evaluate,
    image_auroc,
    pixel_auroc,
)

# --------------------------------------------------------------------------- reference


def reference_aupro(masks, maps, limit=0.3):
    """Obviously-correct AUPRO: one explicit (FPR, PRO) point per distinct score threshold.

    At threshold t a pixel is predicted anomalous when its score >= t, so a run of tied
    scores yields a single point (ties collapsed). Trapezoid from (0, 0) through (1, 1),
    with PRO linearly interpolated where the curve crosses the limit; divided by the limit.
    """
    flat_scores, ok, region_of = [], [], []  # every pixel of every image, flattened
    n_regions = 0
    for m, s in zip(masks, maps, strict=True):
        labels, n = ndimage.label(np.asarray(m), structure=np.ones((3, 3)))
        flat_scores.append(np.asarray(s, dtype=np.float64).ravel())
        ok.append(labels.ravel() == 0)
        region_of.append(np.where(labels.ravel() > 0, labels.ravel() - 1 + n_regions, -1))
        n_regions += n
    flat_scores, ok, region_of = map(np.concatenate, (flat_scores, ok, region_of))
    if n_regions == 0 or not ok.any():
        return None
    in_region = region_of[:, None] == np.arange(n_regions)[None, :]  # (pixels, K) one-hot
    thresholds = np.unique(flat_scores)[::-1]  # every distinct score, descending
    predicted = flat_scores[None, :] >= thresholds[:, None]  # (T, pixels): score >= t
    fpr = (predicted & ok).sum(axis=1) / ok.sum()
    overlap = (predicted.astype(float) @ in_region) / in_region.sum(axis=0)  # (T, K)
    pro = np.minimum(overlap.mean(axis=1), 1.0)
    points = [(0.0, 0.0), *zip(fpr.tolist(), pro.tolist(), strict=True)]
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
            continue
        if x0 < limit:
            y = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y) / 2
        break
    return area / limit


def random_case(rng, n_images, shape, n_levels=None, p_blob=0.7):
    """Masks with a few random blobs per anomalous image, maps correlated with the masks."""
    masks, maps = [], []
    for _ in range(n_images):
        h, w = shape if shape is not None else rng.integers(4, 11, size=2)
        m = np.zeros((h, w), dtype=np.uint8)
        if rng.random() < p_blob:
            for _ in range(rng.integers(1, 4)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                m[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = 1
        s = rng.standard_normal((h, w)) + 1.5 * m
        if n_levels is not None:  # heavy ties
            s = np.round(s * n_levels / 4)
        masks.append(m)
        maps.append(s.astype(np.float32))
    return masks, maps


# --------------------------------------------------------------------------- AUROC


def test_image_auroc_hand_computed_ties():
    # Positives 0.5 and 0.9 against negatives 0.1 and 0.5: 0.5>0.1 (1), 0.5==0.5 (1/2),
    # 0.9 beats both (2) -> 3.5 of 4 pairs.
    assert image_auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)


@pytest.mark.parametrize("kind", ["float", "int", "constant", "float64", "signed_zero"])
def test_image_auroc_matches_sklearn(kind):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = {
        "float": rng.standard_normal(300).astype(np.float32) + labels,
        "int": rng.integers(0, 4, 300) + labels,
        "constant": np.full(300, 2.5, dtype=np.float32),
        "float64": rng.standard_normal(300) * 1e-3 - 5 + labels * 1e-3,
        "signed_zero": np.where(rng.random(300) < 0.5, -0.0, 0.0)
        + labels * (rng.random(300) < 0.3),
    }[kind]
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_one_class_is_none():
    assert image_auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert image_auroc(np.zeros(4), np.arange(4.0)) is None


@pytest.mark.parametrize("kind", ["float", "int", "constant", "negative"])
def test_pixel_auroc_matches_sklearn(kind):
    rng = np.random.default_rng(2)
    masks = (rng.random((12, 16, 16)) < 0.1).astype(np.uint8)
    if kind == "float":
        maps = rng.standard_normal(masks.shape).astype(np.float32) + masks
    elif kind == "int":
        maps = (rng.integers(0, 3, masks.shape) + masks).astype(np.float32)
    elif kind == "constant":
        maps = np.ones(masks.shape, dtype=np.float32)
    else:
        maps = -np.abs(rng.standard_normal(masks.shape)) * (1 - 0.5 * masks) - 3
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # a list of per-image arrays of different sizes gives the same flattened statistic
    ragged_masks = [masks[0], masks[1, :8], masks[2:].reshape(-1, 32)]
    ragged_maps = [maps[0], maps[1, :8], maps[2:].reshape(-1, 32)]
    flat_m = np.concatenate([m.ravel() for m in ragged_masks])
    flat_s = np.concatenate([s.ravel() for s in ragged_maps])
    assert pixel_auroc(ragged_masks, ragged_maps) == pytest.approx(
        roc_auc_score(flat_m, flat_s), abs=1e-12
    )


def test_pixel_auroc_streams_blocks(monkeypatch):
    monkeypatch.setattr(metrics, "_BLOCK_PIXELS", 100)  # several images per block, odd split
    rng = np.random.default_rng(3)
    masks = (rng.random((7, 6, 6)) < 0.2).astype(np.uint8)
    maps = rng.integers(0, 5, masks.shape).astype(np.float32) + masks
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_pixel_auroc_one_class_and_nan():
    assert pixel_auroc(np.zeros((2, 4, 4), np.uint8), np.ones((2, 4, 4))) is None
    maps = np.ones((1, 2, 2), dtype=np.float32)
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.eye(2, dtype=np.uint8)[None], maps)


# --------------------------------------------------------------------------- AUPRO


def test_aupro_hand_tie_and_interpolation():
    # One 1x6 image: region R = the first two pixels (K = 1, |R| = 2), n_ok = 4.
    # Scores: R = {0.8, 0.6}, ok = {0.9, 0.6, 0.3, 0.2}. Descending, ties collapsed:
    #   0.9 (ok)           -> (FPR, PRO) = (0.25, 0.0)
    #   0.8 (R)            -> (0.25, 0.5)
    #   0.6 (ok and R tie) -> (0.50, 1.0)   one point for the tie
    #   0.3, 0.2 (ok)      -> (0.75, 1.0), (1.0, 1.0)
    # limit 0.3 falls inside (0.25, 0.5)-(0.5, 1.0): PRO(0.3) = 0.5 + 0.5 * 0.05 / 0.25 = 0.6,
    # area = 0.05 * (0.5 + 0.6) / 2 = 0.0275 -> AUPRO = 0.0275 / 0.3 = 0.0916666...
    # (not collapsing the tie would give 0.0833 or 0.1667 depending on the order).
    mask = np.array([[1, 1, 0, 0, 0, 0]], dtype=np.uint8)
    score = np.array([[0.8, 0.6, 0.9, 0.6, 0.3, 0.2]], dtype=np.float32)
    assert aupro(mask[None], score[None]) == pytest.approx(0.0275 / 0.3, abs=1e-12)
    # limit 0.5 lands on a point: area = 0.25 * (0.5 + 1.0) / 2 = 0.1875 -> 0.375
    assert aupro([mask], [score], fpr_limit=0.5) == pytest.approx(0.375, abs=1e-12)
    # limit 1: 0.1875 + 0.25 + 0.25 = 0.6875
    assert aupro([mask], [score], fpr_limit=1.0) == pytest.approx(0.6875, abs=1e-12)


def test_aupro_hand_regions_connectivity_and_good_image():
    # Image A (3x4): pixels (0,0) and (1,1) touch only diagonally -> ONE region R1, |R1| = 2;
    # pixel (0,3) is a separate region R2, |R2| = 1. K = 2, so an R1 pixel weighs
    # 1/(2*2) = 0.25 and the R2 pixel 1/(1*2) = 0.5 (each region weighs 1/2 in total).
    # Image B (1x1) is a good image: its single pixel is an ok pixel. n_ok = 9 + 1 = 10.
    # Scores: R1 = {0.9, 0.2}, R2 = 0.5, B = 0.7, the 9 ok pixels of A = 0.1. Descending:
    #   0.9 (R1) -> (0.0, 0.25);  0.7 (B) -> (0.1, 0.25);  0.5 (R2) -> (0.1, 0.75)
    #   0.2 (R1) -> (0.1, 1.0);   0.1 (9 ok, tied) -> (1.0, 1.0)
    # area to 0.3 = 0.1 * 0.25 + 0.2 * 1.0 = 0.225 -> AUPRO = 0.75.
    # (4-connectivity, three regions of 1/3 each, would give (0.1/3 + 0.2) / 0.3 = 0.7778.)
    mask_a = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    score_a = np.full((3, 4), 0.1, dtype=np.float32)
    score_a[0, 0], score_a[1, 1], score_a[0, 3] = 0.9, 0.2, 0.5
    mask_b = np.zeros((1, 1), dtype=np.uint8)
    score_b = np.array([[0.7]], dtype=np.float32)
    value = aupro([mask_a, mask_b], [score_a, score_b])
    assert value == pytest.approx(0.75, abs=1e-12)
    assert reference_aupro([mask_a, mask_b], [score_a, score_b]) == pytest.approx(0.75)


def test_aupro_hand_equal_region_weights():
    # Two images of 1x4. Image 1: region of 3 pixels (scores 0.9, 0.9, 0.9) + ok 0.1.
    # Image 2: region of 1 pixel (score 0.1) + ok pixels 0.5, 0.1, 0.1. K = 2, n_ok = 4.
    #   0.9 (big region whole) -> (0.0, 0.5);  0.5 (ok) -> (0.25, 0.5)
    #   0.1 (3 ok + small region tie) -> (1.0, 1.0)
    # limit 0.3: 0.25 * 0.5 = 0.125; segment (0.25, 0.5)-(1.0, 1.0) at 0.3:
    # PRO = 0.5 + 0.5 * 0.05 / 0.75 = 0.53333; + 0.05 * (0.5 + 0.53333) / 2 = 0.0258333
    # area = 0.1508333 -> AUPRO = 0.5027777...  (pixel weighting would give 0.75 at 0.9)
    masks = [np.array([[1, 1, 1, 0]], np.uint8), np.array([[1, 0, 0, 0]], np.uint8)]
    maps = [np.array([[0.9, 0.9, 0.9, 0.1]]), np.array([[0.1, 0.5, 0.1, 0.1]])]
    expected = (0.125 + 0.05 * (0.5 + 0.5 + 0.5 * 0.05 / 0.75) / 2) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.50277777, abs=1e-7)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_levels", [None, 3])
def test_aupro_matches_reference_random(seed, n_levels):
    rng = np.random.default_rng(seed)
    masks, maps = random_case(rng, 6, (8, 8), n_levels)
    for limit in (0.3, 0.05, 1.0):
        expected = reference_aupro(masks, maps, limit)
        assert aupro(np.stack(masks), np.stack(maps), limit) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_ragged_sizes_match_reference(seed):
    rng = np.random.default_rng(100 + seed)
    masks, maps = random_case(rng, 5, None, n_levels=4 if seed % 2 else None)
    assert len({m.shape for m in masks}) > 1
    assert aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-10)


def test_aupro_streaming_and_coarse_buckets_stay_exact(monkeypatch):
    rng = np.random.default_rng(7)
    masks, maps = random_case(rng, 9, (6, 7), n_levels=None)
    expected = reference_aupro(masks, maps)
    monkeypatch.setattr(metrics, "_BLOCK_PIXELS", 100)  # blocks of 2 images: labels per block
    monkeypatch.setattr(metrics, "_BUCKET_BITS", 3)  # huge histogram buckets
    assert aupro(np.stack(masks), np.stack(maps)) == pytest.approx(expected, abs=1e-10)
    # float64 maps and torch tensors take the same path
    assert aupro(torch.from_numpy(np.stack(masks)), np.stack(maps).astype(np.float64)) == (
        pytest.approx(expected, abs=1e-10)
    )


def test_aupro_constant_maps_and_none_cases():
    masks, maps = random_case(np.random.default_rng(8), 4, (5, 5), p_blob=1.0)
    constant = [np.zeros_like(s) for s in maps]
    # one point (1, 1): the line from (0, 0) to (1, 1) -> area 0.3^2 / 2, divided by 0.3
    assert aupro(masks, constant) == pytest.approx(0.15, abs=1e-12)
    assert aupro(masks, constant) == pytest.approx(reference_aupro(masks, constant))
    no_regions = [np.zeros_like(m) for m in masks]
    assert aupro(no_regions, maps) is None
    assert aupro([np.ones((2, 2), np.uint8)], [np.ones((2, 2))]) is None  # no ok pixel
    with pytest.raises(ValueError):
        aupro(masks, maps, fpr_limit=0.0)


# --------------------------------------------------------------------------- evaluate


def _upsample(score, size):
    t = torch.from_numpy(score)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def test_evaluate_native_and_model_resolution():
    rng = np.random.default_rng(9)
    n = 6
    sizes = [(16, 16), (12, 20), (16, 16), (9, 9), (16, 16), (20, 12)]
    native = []
    for h, w in sizes:
        m = np.zeros((h, w), dtype=np.uint8)
        if rng.random() < 0.7:
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            m[y : y + 4, x : x + 3] = 1
        native.append(m)
    model = np.stack(
        [
            np.asarray(F.interpolate(torch.from_numpy(m)[None, None].float(), size=(8, 8)))[0, 0]
            for m in native
        ]
    ).astype(np.uint8)
    labels = np.array([int(m.any()) for m in native])
    maps = (rng.standard_normal((n, 8, 8)) + 2 * model).astype(np.float32)
    scores = maps.reshape(n, -1).max(axis=1)
    gt = GroundTruth(labels, model, native)

    out = evaluate(gt, scores, maps)
    assert set(out) == set(METRIC_LABELS)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(model.ravel(), maps.ravel()))
    assert out["aupro_model_res"] == pytest.approx(reference_aupro(list(model), list(maps)))
    upsampled = [_upsample(s, m.shape) for s, m in zip(maps, native, strict=True)]
    assert upsampled[1].shape == (12, 20)
    assert out["aupro"] == pytest.approx(reference_aupro(native, upsampled), abs=1e-10)
    assert out["aupro"] != pytest.approx(out["aupro_model_res"], abs=1e-6)


def test_evaluate_without_masks_has_no_pixel_metrics():
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.5, 0.8])  # 3 of 4 pairs ordered
    out = evaluate(GroundTruth(labels, None, None), scores, None)
    assert out["image_auroc"] == pytest.approx(0.75)
    assert out["pixel_auroc"] is None and out["aupro"] is None and out["aupro_model_res"] is None


def test_metric_labels_cover_every_key():
    assert list(METRIC_LABELS) == ["image_auroc", "pixel_auroc", "aupro", "aupro_model_res"]


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_deterministic_and_contains_estimate():
    rng = np.random.default_rng(10)
    labels = np.r_[np.zeros(60, int), np.ones(40, int)]
    scores = rng.standard_normal(100) + labels
    ci = bootstrap_ci(labels, scores, n_boot=300, seed=3)
    assert ci == bootstrap_ci(labels, scores, n_boot=300, seed=3)
    assert ci != bootstrap_ci(labels, scores, n_boot=300, seed=4)
    low, high = ci
    assert 0.0 <= low < image_auroc(labels, scores) < high <= 1.0
    assert bootstrap_ci(np.ones(5), np.arange(5.0)) is None
