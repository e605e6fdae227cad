"""Time the metrics on synthetic MVTec-sized test sets, and check AUPRO's exactness.

    OMP_NUM_THREADS=2 python scripts/bench_metrics.py [--n 1700] [--size 256]
    OMP_NUM_THREADS=1 python scripts/bench_metrics.py --cell [--repeats 5] [--resamples 1000]

Default mode: each pixel metric runs in its own fresh process (this script re-run with
``--worker``), so the peak RSS it reports (resource.getrusage) belongs to that metric alone: the
figure printed is the process's peak, and "metric" is that peak minus the RSS once the data set
was built.

The exactness check compares ``bench.metrics.aupro`` with a straightforward full-sort version
written the way the official MVTec AD script computes it (argsort every pixel, cumulative sums,
last point of each tie run, clip, (0, 0) and (1, 1), trapezoid with interpolation at the
limit), and ``pixel_auroc`` with sklearn, on a smaller instance.

``--cell`` times one cell's metric phase on a category shaped like MVTec AD bottle (20 good and
63 defective test images, 900x900 masks, 256x256 maps), side by side in one process: "before"
computes the four columns the harness had before AP, F1-max and CFLOW-AD's AUPRO were added,
the way its ``evaluate`` did (image and pixel AUROC, AUPRO at model and at native resolution);
"evaluate" is every declared metric; "with evidence" adds the evidence the confidence intervals
are resampled from; "intervals" is ``confidence_intervals`` on that evidence. The runs
alternate within each repeat (the order rotates), and the ratios are taken per repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from bisect import bisect
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from bench import metrics
from bench.datasets.pipeline import GroundTruth
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


def bottle_like_cell(
    seed: int = 0, n_good: int = 20, n_bad: int = 63, native: int = 900, size: int = 256
) -> tuple[GroundTruth, np.ndarray, np.ndarray]:
    """Ground truth, image scores and float32 maps of a category shaped like MVTec AD bottle:
    defects of 1-3 blobs covering a few percent of a defective image, masks at 900x900 and
    nearest-resized to the 256x256 maps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:native, :native]
    native_masks = [np.zeros((native, native), dtype=np.uint8) for _ in range(n_good)]
    for _ in range(n_bad):
        mask = np.zeros((native, native), dtype=bool)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(100, native - 100, 2)
            ry, rx = rng.uniform(0.05, 0.16, 2) * native
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        native_masks.append(mask.astype(np.uint8))
    stack = torch.from_numpy(np.stack(native_masks)[:, None].astype(np.float32))
    model = F.interpolate(stack, size=(size, size), mode="nearest")[:, 0].numpy().astype(np.uint8)
    low = torch.from_numpy(rng.standard_normal((len(model), 1, 16, 16)).astype(np.float32))
    maps = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps = maps.numpy() * 0.5 + rng.standard_normal(model.shape, dtype=np.float32) * 0.3
    maps += model * rng.uniform(0.3, 2.0, (len(model), 1, 1)).astype(np.float32)
    labels = np.r_[np.zeros(n_good, np.int64), np.ones(n_bad, np.int64)]
    return GroundTruth(labels, model, native_masks), maps.reshape(len(maps), -1).max(axis=1), maps


def evaluate_before(gt: GroundTruth, scores: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """The four columns the harness had, computed the way its evaluate did."""
    native = metrics._NativeMaps(maps, [m.shape for m in gt.native_masks])
    return {
        "image_auroc": metrics.image_auroc(gt.labels, scores),
        "pixel_auroc": pixel_auroc(gt.masks, maps),
        "aupro_model_res": aupro(gt.masks, maps),
        "aupro": aupro(gt.native_masks, native),
    }


def time_cell(repeats: int, resamples: int) -> None:
    gt, scores, maps = bottle_like_cell()
    print(
        f"cell: {len(gt.labels)} test images ({int(gt.labels.sum())} defective), masks "
        f"{gt.native_masks[0].shape[0]}x{gt.native_masks[0].shape[1]}, maps {maps.shape[1]}x"
        f"{maps.shape[2]}; defective pixels {100 * gt.masks.mean():.2f}% at model resolution"
    )
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    before = evaluate_before(gt, scores, maps)
    values = metrics.evaluate(gt, scores, maps)
    same = all(values[k] == v for k, v in before.items())
    print(f"the four shared columns are bit-identical: {same}")
    evidence = metrics.evaluate_with_evidence(gt, scores, maps)[1]
    runs = {
        "before": lambda: evaluate_before(gt, scores, maps),
        "evaluate": lambda: metrics.evaluate(gt, scores, maps),
        "with evidence": lambda: metrics.evaluate_with_evidence(gt, scores, maps),
        "intervals": lambda: metrics.confidence_intervals(evidence, resamples),
    }
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - t0)
    base = np.array(seconds["before"])
    print(
        f"{'':15s} {'median s':>9s} {'min s':>7s} {'x before (median of per-repeat ratios)':>40s}"
    )
    for name in names:
        t = np.array(seconds[name])
        print(f"{name:15s} {np.median(t):9.2f} {t.min():7.2f} {np.median(t / base):40.2f}")
    phase = np.array(seconds["with evidence"]) + np.array(seconds["intervals"])
    print(
        f"{'evidence+CIs':15s} {np.median(phase):9.2f} {phase.min():7.2f} {np.median(phase / base):40.2f}"
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cell.npz"
        evidence.save(path)
        size = path.stat().st_size
    bins = {p: getattr(evidence, p).ok.shape[1] for p in ("model", "native", "cflow")}
    print(
        f"evidence file: {size / 1e6:.2f} MB ({resamples} resamples per interval; grid bins {bins})"
    )
    intervals = metrics.confidence_intervals(evidence, resamples)
    for name, value in values.items():
        low, high = intervals[f"{name}_lo"], intervals[f"{name}_hi"]
        print(f"  {name:16s} {value:.4f}  [{low:.4f}, {high:.4f}]")


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
    parser.add_argument("--cell", action="store_true", help="time one cell's metric phase")
    parser.add_argument("--repeats", type=int, default=5, help="--cell: alternating repeats")
    parser.add_argument("--resamples", type=int, default=1000, help="--cell: bootstrap resamples")
    parser.add_argument("--worker", choices=["pixel_auroc", "aupro"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        time_cell(args.repeats, args.resamples)
        return
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
