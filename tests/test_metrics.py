"""Metrics against sklearn, slow references written from each algorithm's description, and
hand-computed cases; the evidence's resamples against metrics recomputed on resampled images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage, stats
from skimage.measure import label, regionprops
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from bench import metrics
from bench.datasets.pipeline import GroundTruth
from bench.errors import BenchError
from bench.metrics import (
    INTERVAL_COLUMNS,
    METRIC_LABELS,
    METRICS,
    Evidence,
    aupro,
    aupro_cflow,
    bootstrap_weights,
    confidence_intervals,
    evaluate,
    evaluate_with_evidence,
    image_ap,
    image_auroc,
    image_f1max,
    percentile_interval,
    pixel_ap,
    pixel_auroc,
    pixel_f1max,
    resampled_values,
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
    assert list(METRIC_LABELS) == [
        "image_auroc",
        "pixel_auroc",
        "aupro",
        "aupro_model_res",
        "image_ap",
        "pixel_ap",
        "image_f1max",
        "pixel_f1max",
        "aupro_cflow",
    ]
    assert INTERVAL_COLUMNS[:3] == ("image_auroc_lo", "image_auroc_hi", "pixel_auroc_lo")
    assert len(INTERVAL_COLUMNS) == 2 * len(METRICS)


def test_evaluate_new_metrics_and_fpr_limit():
    rng = np.random.default_rng(19)
    n = 8
    model = np.zeros((n, 8, 8), dtype=np.uint8)
    for i in range(1, n, 2):
        y, x = rng.integers(0, 5, 2)
        model[i, y : y + 3, x : x + 2] = 1
    native = [np.kron(m, np.ones((2, 2), dtype=np.uint8)) for m in model]
    labels = model.reshape(n, -1).max(axis=1)
    maps = (rng.standard_normal((n, 8, 8)) + 1.5 * model).astype(np.float32)
    scores = maps.reshape(n, -1).max(axis=1)
    out = evaluate(GroundTruth(labels, model, native), scores, maps)
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert out["image_f1max"] == pytest.approx(sklearn_f1max(labels, scores), abs=1e-12)
    flat_m, flat_s = model.ravel(), maps.ravel()
    assert out["pixel_ap"] == pytest.approx(average_precision_score(flat_m, flat_s), abs=1e-12)
    assert out["pixel_f1max"] == pytest.approx(sklearn_f1max(flat_m, flat_s), abs=1e-12)
    assert out["aupro_cflow"] == pytest.approx(reference_aupro_cflow(model, maps), abs=1e-12)
    strict = evaluate(GroundTruth(labels, model, native), scores, maps, fpr_limit=0.05)
    upsampled = [_upsample(s, m.shape) for s, m in zip(maps, native, strict=True)]
    assert strict["aupro"] == pytest.approx(reference_aupro(native, upsampled, 0.05), abs=1e-10)
    assert strict["aupro_model_res"] == pytest.approx(reference_aupro(model, maps, 0.05))
    assert strict["aupro_cflow"] == pytest.approx(reference_aupro_cflow(model, maps, 0.05))
    assert strict["pixel_auroc"] == out["pixel_auroc"]
    empty = evaluate(GroundTruth(labels, None, None), scores, None)
    assert all(empty[m.name] is None for m in METRICS if m.level == "pixel")
    assert all(empty[m.name] is not None for m in METRICS if m.level == "image")


# --------------------------------------------------------------------------- AP, F1-max


def sklearn_f1max(labels, scores):
    """The field's F1-max: the largest 2PR / (P + R) on sklearn's precision-recall curve."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return f1.max()


def test_image_ap_and_f1max_hand_computed_ties():
    # Positives 0.5 and 0.9 against negatives 0.1 and 0.5. Thresholds from the top:
    #   >= 0.9: TP 1 of 1 called (precision 1, recall 1/2)
    #   >= 0.5: TP 2 of 3 called (precision 2/3, recall 1)   one point for the tie
    #   >= 0.1: TP 2 of 4 called
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6; F1 = 2 TP / (TP + FP + 2) = 2/3, 4/5, 2/3 -> 0.8.
    labels, scores = [0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]
    assert image_ap(labels, scores) == pytest.approx(5 / 6, abs=1e-15)
    assert image_f1max(labels, scores) == pytest.approx(0.8, abs=1e-15)
    assert image_ap([1, 1], [0.2, 0.3]) is None and image_f1max([0, 0], [0.2, 0.3]) is None


@pytest.mark.parametrize("kind", ["float", "int", "constant", "signed_zero"])
def test_image_ap_and_f1max_match_sklearn(kind):
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 300)
    scores = {
        "float": rng.standard_normal(300).astype(np.float32) + labels,
        "int": rng.integers(0, 4, 300) + labels,
        "constant": np.full(300, 2.5, dtype=np.float32),
        "signed_zero": np.where(rng.random(300) < 0.5, -0.0, 0.0)
        + labels * (rng.random(300) < 0.3),
    }[kind]
    assert image_ap(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert image_f1max(labels, scores) == pytest.approx(sklearn_f1max(labels, scores), abs=1e-12)


@pytest.mark.parametrize("kind", ["float", "int", "constant", "negative"])
def test_pixel_ap_and_f1max_match_sklearn(kind, monkeypatch):
    monkeypatch.setattr(metrics, "_BLOCK_PIXELS", 300)  # blocks of two images
    rng = np.random.default_rng(12)
    masks = (rng.random((9, 12, 12)) < 0.1).astype(np.uint8)
    maps = {
        "float": rng.standard_normal(masks.shape).astype(np.float32) + masks,
        "int": (rng.integers(0, 3, masks.shape) + masks).astype(np.float32),
        "constant": np.ones(masks.shape, dtype=np.float32),
        "negative": -np.abs(rng.standard_normal(masks.shape)) * (1 - 0.5 * masks) - 3,
    }[kind]
    flat_m, flat_s = masks.ravel(), maps.ravel()
    expected_ap = average_precision_score(flat_m, flat_s)
    expected_f1 = sklearn_f1max(flat_m, flat_s)
    assert pixel_ap(masks, maps) == pytest.approx(expected_ap, abs=1e-12)
    assert pixel_f1max(masks, maps) == pytest.approx(expected_f1, abs=1e-12)
    ragged_masks = [masks[0], masks[1:].reshape(-1, 24)]
    ragged_maps = [maps[0], maps[1:].reshape(-1, 24)]
    assert pixel_ap(ragged_masks, ragged_maps) == pytest.approx(expected_ap, abs=1e-12)
    assert pixel_f1max(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(
        expected_f1, abs=1e-12
    )
    assert pixel_ap(np.zeros_like(masks), maps) is None


# --------------------------------------------------------------------------- CFLOW-AD's AUPRO


def reference_aupro_cflow(masks, maps, limit=0.3):
    """CFLOW-AD's routine as its description reads: 1000 thresholds from the max down, a pixel
    anomalous when strictly above; per region the predicted pixels of its filled bounding-box
    image over its area (skimage regionprops); keep FPR <= limit, min-max rescale, sklearn auc."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) != 0
    top, bottom = maps.max(), maps.min()
    delta = (top - bottom) / 1000
    regions = [
        (i, prop) for i, m in enumerate(masks) for prop in regionprops(label(m, connectivity=2))
    ]
    fprs, pros = [], []
    for step in range(1000):
        predicted = maps > top - step * delta
        overlaps = [
            np.logical_and(predicted[i][prop.slice], prop.image_filled).sum() / prop.area
            for i, prop in regions
        ]
        fprs.append(np.logical_and(~masks, predicted).sum() / (~masks).sum())
        pros.append(np.mean(overlaps))
    fprs, pros = np.array(fprs), np.array(pros)
    kept = fprs <= limit
    x = fprs[kept]
    return auc((x - x.min()) / (x.max() - x.min()), pros[kept])


def test_aupro_cflow_hand_steps_and_rescaling():
    # One 3x4 image, region R = the first three pixels of row 0 (area 3), 9 ok pixels.
    # max 1.0, min 0.0: thresholds 1 - k/1000; a score s is first above at step k > 1000 (1 - s).
    #   ok 1.0 -> k >= 1;  R 0.9005 -> k >= 100;  ok 0.8005 -> 200;  R 0.7005 -> 300;
    #   ok 0.6005 -> 400 (FPR 3/9 > 0.3: dropped);  R 0.5005 -> 500;  the other ok pixels later.
    # Kept points: k = 0 (0, 0); 1..99 (1/9, 0); 100..199 (1/9, 1/3); 200..299 (2/9, 1/3);
    # 300..399 (2/9, 2/3). FPRs rescaled by 2/9: x = 0, 1/2, 1. Trapezoids: (0 -> 1/2) at
    # PRO 0 gives 0, (1/2 -> 1) at PRO 1/3 gives 1/6; the jump to 2/3 at x = 1 adds nothing.
    # The official AUPRO interpolates to 0.3 and divides by it: (1/27 + (0.3 - 2/9) 2/3) / 0.3.
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[0, :3] = 1
    score = np.array(
        [
            [0.9005, 0.7005, 0.5005, 1.0],
            [0.8005, 0.6005, 0.4005, 0.2005],
            [0.1005, 0.0505, 0.0105, 0.0],
        ]
    )
    assert aupro_cflow(mask[None], score[None]) == pytest.approx(1 / 6, abs=1e-12)
    assert reference_aupro_cflow(mask[None], score[None]) == pytest.approx(1 / 6, abs=1e-12)
    official = (1 / 27 + (0.3 - 2 / 9) * 2 / 3) / 0.3
    assert aupro(mask[None], score[None]) == pytest.approx(official, abs=1e-12)


def test_aupro_cflow_hand_hole_counts_in_the_numerator():
    # A 5x5 image whose region is the ring around the centre: area 8, and its filled image
    # holds the centre too. The centre is an ok pixel scoring the max (1.0): from step 1 on it
    # is called anomalous (FPR 1/17) and counts in the ring's overlap, 1/8, before any ring
    # pixel does; the ring (0.5005) joins at step 500 (overlap 9/8 > 1). The border's 16 ok
    # pixels score the min and are never called. Every step is kept; FPRs rescale to 0, 1, ...
    # and the only strip of width is the first: (0 + 1/8) / 2 = 1/16 (0 if the hole did not
    # count). The official AUPRO: (0.3 - 1/17) / 0.3.
    mask = np.zeros((5, 5), dtype=np.uint8)
    mask[1:4, 1:4] = 1
    mask[2, 2] = 0
    score = np.where(mask == 1, 0.5005, 0.0)
    score[2, 2] = 1.0
    assert aupro_cflow([mask], [score]) == pytest.approx(1 / 16, abs=1e-12)
    assert reference_aupro_cflow([mask], [score]) == pytest.approx(1 / 16, abs=1e-12)
    assert aupro([mask], [score]) == pytest.approx((0.3 - 1 / 17) / 0.3, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_aupro_cflow_matches_reference_random(seed):
    rng = np.random.default_rng(40 + seed)
    masks, maps = random_case(rng, 5, (9, 9), n_levels=3 if seed % 2 else None)
    masks[0][2:7, 2:7] = 1  # a region with a hole: its filled image covers an ok pixel
    masks[0][4, 4] = 0
    for limit in (0.3, 0.05):
        expected = reference_aupro_cflow(masks, maps, limit)
        assert aupro_cflow(np.stack(masks), np.stack(maps), limit) == pytest.approx(
            expected, abs=1e-12
        )


def test_aupro_cflow_undefined_cases():
    masks, maps = random_case(np.random.default_rng(9), 3, (6, 6), p_blob=1.0)
    assert aupro_cflow(masks, [np.ones_like(s) for s in maps]) is None  # constant: 0 / 0
    assert aupro_cflow([np.zeros_like(m) for m in masks], maps) is None  # no region
    with pytest.raises(ValueError):
        aupro_cflow(masks, maps, fpr_limit=1.5)


# --------------------------------------------------------------------------- evidence, bootstrap


def _cell(rng, n=10, size=8, native_scale=1, levels=None):
    """A small cell: model masks with blobs in most images, native masks ``native_scale`` times
    larger (nearest), maps that carry the defects, and the per-image max as image score."""
    model = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        if i % 3:
            for _ in range(rng.integers(1, 3)):
                y, x = rng.integers(0, size - 2, 2)
                model[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = 1
    scale = np.ones((native_scale, native_scale), dtype=np.uint8)
    native = [np.kron(m, scale) for m in model]
    maps = rng.standard_normal(model.shape) + 1.5 * model
    if levels is not None:
        maps = np.round(maps * levels / 4)
        maps[:, 0, 0], maps[:, -1, -1] = -levels, 2 * levels  # every image holds the min and max
    maps = maps.astype(np.float32)
    labels = model.reshape(n, -1).max(axis=1)
    return GroundTruth(labels, model, native), maps.reshape(n, -1).max(axis=1), maps


def _resampled_exactly(gt, scores, maps, weights):
    """Every metric recomputed exactly on the resampled test set (images repeated)."""
    idx = np.repeat(np.arange(len(gt.labels)), weights)
    sub = GroundTruth(gt.labels[idx], gt.masks[idx], [gt.native_masks[i] for i in idx])
    return evaluate(sub, scores[idx], maps[idx])


def test_resamples_are_exact_when_the_grid_holds_every_score():
    # Quantised maps: every distinct score gets its own bin, so each resample's pixel metrics
    # equal the metrics recomputed on the repeated images. Every image holds the maps' min and
    # max, so CFLOW-AD's thresholds are the same on every resample.
    gt, scores, maps = _cell(np.random.default_rng(20), levels=4)
    values, evidence = evaluate_with_evidence(gt, scores, maps)
    weights = bootstrap_weights(gt.labels, 6, seed=2)
    resampled = {m.name: resampled_values(evidence, m.name, weights) for m in METRICS}
    for b, row in enumerate(weights):
        exact = _resampled_exactly(gt, scores, maps, row)
        for name, value in exact.items():
            assert resampled[name][b] == pytest.approx(value, abs=1e-9), name


def test_resamples_track_exact_values_on_continuous_maps():
    # Continuous maps at two resolutions: binning costs a little, and the correction centres
    # the resamples, so each stays within a small tolerance of the exact recomputation (a
    # wrong weighting or region bookkeeping is off by 1e-2 or more). CFLOW-AD's routine is
    # left out: a resample keeps the whole test set's thresholds, where a recomputation takes
    # the resample's own min and max.
    gt, scores, maps = _cell(np.random.default_rng(21), n=16, size=32, native_scale=2)
    values, evidence = evaluate_with_evidence(gt, scores, maps)
    weights = bootstrap_weights(gt.labels, 5, seed=3)
    resampled = {m.name: resampled_values(evidence, m.name, weights) for m in METRICS}
    for b, row in enumerate(weights):
        exact = _resampled_exactly(gt, scores, maps, row)
        for name in ("image_auroc", "image_ap", "image_f1max"):
            assert resampled[name][b] == pytest.approx(exact[name], abs=1e-12), name
        for name in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "aupro_model_res"):
            assert resampled[name][b] == pytest.approx(exact[name], abs=1e-3), name


def test_bootstrap_weights_stratified_and_seeded():
    labels = np.r_[np.zeros(7, int), np.ones(5, int)][np.random.default_rng(0).permutation(12)]
    weights = bootstrap_weights(labels, 50, seed=4)
    assert weights.shape == (50, 12)
    assert (weights[:, labels == 0].sum(axis=1) == 7).all()
    assert (weights[:, labels == 1].sum(axis=1) == 5).all()
    assert np.array_equal(weights, bootstrap_weights(labels, 50, seed=4))
    assert not np.array_equal(weights, bootstrap_weights(labels, 50, seed=5))
    assert weights[:, labels == 1].std() > 0  # images really are drawn


def test_image_auroc_interval_coverage():
    # Normal N(0, 1) against anomalous N(1, 1): the true AUROC is Phi(1 / sqrt 2) = 0.7602.
    # Over 400 test sets of 60 + 40 images about 95% of the intervals must hold it; the
    # binomial sd is 1.1%, so [0.90, 0.99] fails only when the intervals are wrong.
    truth = stats.norm.cdf(1 / np.sqrt(2))
    labels = np.r_[np.zeros(60, int), np.ones(40, int)]
    gt = GroundTruth(labels, None, None)
    rng = np.random.default_rng(2024)
    hits = 0
    for rep in range(400):
        scores = rng.standard_normal(100) + labels
        _, evidence = evaluate_with_evidence(gt, scores, None)
        weights = bootstrap_weights(labels, 200, seed=rep)
        low, high = percentile_interval(resampled_values(evidence, "image_auroc", weights))
        hits += low <= truth <= high
    assert 0.90 <= hits / 400 <= 0.99


def test_confidence_intervals_and_evidence_file(tmp_path):
    gt, scores, maps = _cell(np.random.default_rng(22), n=9, native_scale=2)
    values, evidence = evaluate_with_evidence(gt, scores, maps, fpr_limit=0.2)
    assert values == evaluate(gt, scores, maps, fpr_limit=0.2)
    intervals = confidence_intervals(evidence, n_resamples=100, seed=1)
    assert list(intervals) == list(INTERVAL_COLUMNS)
    for m in METRICS:
        low, high = intervals[f"{m.name}_lo"], intervals[f"{m.name}_hi"]
        assert low <= high <= (1.0 if m.name != "aupro_cflow" else 2.0), m.name
        if m.level == "pixel":  # many pixels, yet images are what is resampled: real spread
            assert high - low > 1e-3, m.name
    path = tmp_path / "cell.npz"
    evidence.save(path)
    loaded = Evidence.load(path)
    assert loaded.values == values and loaded.fpr_limit == 0.2
    assert confidence_intervals(loaded, n_resamples=100, seed=1) == intervals
    assert confidence_intervals(loaded, n_resamples=100, seed=2) != intervals

    no_masks = GroundTruth(gt.labels, None, None)
    _, image_only = evaluate_with_evidence(no_masks, scores, None)
    image_only.save(path)
    bounds = confidence_intervals(Evidence.load(path), n_resamples=50)
    assert bounds["pixel_ap_lo"] is None and bounds["aupro_hi"] is None
    assert bounds["image_auroc_lo"] is not None

    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    with pytest.raises(BenchError, match="bad.npz"):
        Evidence.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", labels=np.zeros(3))
    with pytest.raises(BenchError, match="other.npz"):
        Evidence.load(tmp_path / "other.npz")
