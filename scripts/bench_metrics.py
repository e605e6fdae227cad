"""Time the pixel metrics on a synthetic MVTec-sized test set, and check AUPRO's exactness.

    OMP_NUM_THREADS=2 python scripts/bench_metrics.py [--n 1700] [--size 256]

Each metric runs in its own fresh process (this script re-run with ``--worker``), so the peak
RSS it reports (resource.getrusage) belongs to that metric alone: the figure printed is the
process's peak, and "metric" is that peak minus the RSS once the data set was built.

The exactness check compares ``bench.metrics.aupro`` with a straightforward full-sort version
written the way the official MVTec AD script computes it (argsort every pixel, cumulative sums,
last point of each tie run, clip, (0, 0) and (1, 1), trapezoid with interpolation at the
limit), and ``pixel_auroc`` with sklearn, on a smaller instance.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from bisect import bisect

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from bench.metrics import aupro, pixel_auroc


def synthetic_set(
    n: int, size: int, seed: int = 0, anomalous: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size) uint8 masks and float32 maps: smooth background, several blobs per
    anomalous image, a few percent anomalous pixels overall (MVTec AD has ~3%)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    maps = np.empty((n, size, size), dtype=np.float32)
    yy, xx = np.ogrid[:size, :size]
    for i in range(n):
        if rng.random() >= anomalous:
            continue
        for _ in range(rng.integers(1, 6)):
            cy, cx = rng.integers(0, size, 2)
            ry, rx = rng.uniform(0.02, 0.11, 2) * size
            masks[i] |= (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0).astype(np.uint8)
    chunk = 100
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        low = torch.from_numpy(rng.standard_normal((stop - start, 1, 16, 16)).astype(np.float32))
        smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        block = smooth[:, 0].numpy() * 0.5
        block += rng.standard_normal(block.shape, dtype=np.float32) * 0.3
        strength = rng.uniform(0.3, 2.0, (stop - start, 1, 1)).astype(np.float32)
        block += masks[start:stop] * strength
        maps[start:stop] = block
    return masks, maps


def aupro_full_sort(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """The straightforward official computation: argsort every pixel of the category."""
    structure = np.ones((3, 3), dtype=int)
    weights = np.zeros(masks.shape, dtype=np.float64)
    ok = masks == 0
    n_regions = 0
    region_weights = []
    for i in range(len(masks)):
        labels, n = ndimage.label(masks[i], structure=structure)
        region_weights.append((i, labels, n))
        n_regions += n
    for i, labels, n in region_weights:
        if n:
            sizes = np.bincount(labels.ravel())
            per_pixel = np.zeros(n + 1)
            per_pixel[1:] = 1.0 / (sizes[1:] * n_regions)
            weights[i] = per_pixel[labels]
    flat = maps.ravel().astype(np.float64)
    order = np.argsort(flat, kind="mergesort")[::-1]
    flat = flat[order]
    fprs = np.cumsum(ok.ravel()[order] / ok.sum())
    pros = np.cumsum(weights.ravel()[order])
    keep = np.append(np.diff(flat) != 0, True)
    fprs = np.concatenate([[0.0], np.clip(fprs[keep], None, 1.0), [1.0]])
    pros = np.concatenate([[0.0], np.clip(pros[keep], None, 1.0), [1.0]])
    correction = 0.0
    if limit not in fprs:
        ins = bisect(fprs, limit)
        x0, x1, y0, y1 = fprs[ins - 1], fprs[ins], pros[ins - 1], pros[ins]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        correction = 0.5 * (y0 + y_limit) * (limit - x0)
    inside = fprs <= limit
    x, y = fprs[inside], pros[inside]
    return float((0.5 * np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) + correction) / limit)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(metric: str, n: int, size: int) -> None:
    masks, maps = synthetic_set(n, size)
    base = _rss_mib()
    fn = {"pixel_auroc": pixel_auroc, "aupro": aupro}[metric]
    t0 = time.perf_counter()
    value = fn(masks, maps)
    seconds = time.perf_counter() - t0
    out = {
        "metric": metric,
        "value": value,
        "seconds": seconds,
        "rss_data_mib": base,
        "rss_peak_mib": _rss_mib(),
        "anomalous_pixels": float(masks.mean()),
        "anomalous_images": float(masks.any(axis=(1, 2)).mean()),
    }
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1700)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--check-n", type=int, default=120, help="images in the exactness check")
    parser.add_argument("--worker", choices=["pixel_auroc", "aupro"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.size)
        return

    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    total = 0.0
    for metric in ("pixel_auroc", "aupro"):
        cmd = [sys.executable, __file__, "--worker", metric, "--n", str(args.n)]
        cmd += ["--size", str(args.size)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
        total += result["seconds"]
        print(
            f"{metric:12s} {args.n}x{args.size}x{args.size}: {result['seconds']:6.2f} s, "
            f"value {result['value']:.6f}, peak RSS {result['rss_peak_mib']:.0f} MiB "
            f"(data set built: {result['rss_data_mib']:.0f} MiB, metric "
            f"+{result['rss_peak_mib'] - result['rss_data_mib']:.0f} MiB); anomalous pixels "
            f"{100 * result['anomalous_pixels']:.2f}%, images "
            f"{100 * result['anomalous_images']:.0f}%"
        )
    print(f"total metric time: {total:.2f} s")

    masks, maps = synthetic_set(args.check_n, args.size, seed=1)
    from sklearn.metrics import roc_auc_score

    t0 = time.perf_counter()
    slow = aupro_full_sort(masks, maps)
    t_slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = aupro(masks, maps)
    t_fast = time.perf_counter() - t0
    print(
        f"exactness, {args.check_n} images: aupro fast {fast:.12f} ({t_fast:.2f} s) vs full sort "
        f"{slow:.12f} ({t_slow:.2f} s), |diff| {abs(fast - slow):.2e}"
    )
    for limit in (0.05, 1.0):
        diff = abs(aupro(masks, maps, limit) - aupro_full_sort(masks, maps, limit))
        print(f"  fpr_limit {limit}: |diff| {diff:.2e}")
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    print(f"  pixel_auroc {pixel_auroc(masks, maps):.12f} vs sklearn {ref:.12f}")
    # quantised maps: heavy ties
    coarse = np.round(maps * 4) / 4
    diff = abs(aupro(masks, coarse) - aupro_full_sort(masks, coarse))
    print(f"  quantised maps (ties): aupro |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
