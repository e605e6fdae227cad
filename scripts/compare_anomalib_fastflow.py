"""Fit time and test latency: bench's FastFlow against anomalib 2.7's Fastflow (a benchmark, not a test).

Both sides train the same configuration (ResNet18, random init, conv3x3-only, 256 input,
Adam 1e-3 / 1e-5) on the first N training images of one MVTec-layout category:
- bench: feature extraction once (ImageSet -> FeatureExtractor -> CachedFeatures), then
  FastFlow.fit on the cached features;
- anomalib: ``Engine.fit`` as it runs by default (validation on the test split every epoch),
  and again with the per-epoch validation switched off (``limit_val_batches=0``,
  ``num_sanity_val_steps=0``; Fastflow adds no early stopping by itself). It runs in a
  separate interpreter (``--anomalib-python``), since anomalib is no dependency of bench.
Latency is per image at batch 1, end to end (image tensor -> backbone -> map), after warm-up.

    python scripts/compare_anomalib_fastflow.py --data-root /data/mvtec_ad \\
        --category bottle --anomalib-python ANOMALIB_PYTHON
On a host with noise, ``--pairs 3`` runs three pairs (bench, then anomalib with validation
off; the next pair the other way round) and prints each pair's fit and latency ratios and
their medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
from comparison_data import build_bench_side, run_anomalib_script, subset_folder, sync

from bench.datasets.pipeline import ImageSet
from bench.features import CachedFeatures
from bench.methods.fastflow import FastFlow
from bench.registry import DATASETS
from bench.runner.heap import retain_freed_memory

ANOMALIB_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Fastflow

    cfg = json.loads(sys.argv[1])
    torch.manual_seed(cfg["seed"])
    size = (cfg["input_size"], cfg["input_size"])
    datamodule = MVTecAD(
        root=cfg["root"],
        category=cfg["category"],
        train_batch_size=cfg["batch_size"],
        eval_batch_size=32,
        num_workers=cfg["workers"],
    )
    start = time.perf_counter()
    model = Fastflow(
        backbone=cfg["backbone"],
        pre_trained=False,
        conv3x3_only=True,
        pre_processor=Fastflow.configure_pre_processor(image_size=size),
    )
    build = time.perf_counter() - start
    extra = {"limit_val_batches": 0, "num_sanity_val_steps": 0} if cfg["no_validation"] else {}
    engine = Engine(
        max_epochs=cfg["epochs"],
        accelerator=cfg["accelerator"],
        devices=1,
        default_root_dir=cfg["workdir"],
        **extra,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    fit = time.perf_counter() - start
    net = model.model.to(cfg["device"]).eval()
    image = torch.randn(1, 3, *size, device=cfg["device"])
    times = []
    with torch.no_grad():
        for i in range(cfg["warmup"] + cfg["repeats"]):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(image).anomaly_map
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"build": build, "fit": fit, "latency": times}))
    """
)


def latency(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Seconds per call, synchronised, after warm-up."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def run_bench(args: argparse.Namespace, root: Path, device: torch.device) -> dict:
    """bench's FastFlow: build, fit (extraction + training) and batch-1 latency."""
    dataset = DATASETS.get("mvtec")(root)
    train, test = dataset.train(args.category), dataset.test(args.category)
    settings = dataclasses.replace(
        FastFlow.default_settings(args.backbone, "original"),
        input_size=args.input_size,
        conv3x3_only=True,
        epochs=args.epochs,
        batch_size=args.batch_size,
    )
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    pre, extractor, method = build_bench_side(
        FastFlow, args.backbone, "original", settings, device, args.seed, False
    )
    sync(device)
    build = time.perf_counter() - start
    start = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        ImageSet(train, pre), batch_size=args.batch_size, num_workers=args.workers
    )
    features = CachedFeatures.extract(extractor, loader, device)
    extracted = time.perf_counter() - start
    method.fit(features)
    sync(device)
    fit = time.perf_counter() - start
    image = ImageSet(test[:1], pre)[0].unsqueeze(0).to(device)
    with torch.no_grad():
        times = latency(
            lambda: method.predict_batch(extractor(image)), device, args.warmup, args.repeats
        )
    return {"build": build, "fit": fit, "extract": extracted, "latency": times}


def run_anomalib(args: argparse.Namespace, root: Path, device: torch.device, no_val: bool) -> dict:
    """anomalib's Engine.fit in its own interpreter; returns its timings."""
    cfg = {
        "root": str(root),
        "category": args.category,
        "backbone": args.backbone,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "workers": args.workers,
        "seed": args.seed,
        "no_validation": no_val,
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "device": str(device),
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    return run_anomalib_script(args.anomalib_python, ANOMALIB_SCRIPT, cfg)


def _row(name: str, result: dict, reference_fit: float | None) -> str:
    times = sorted(result["latency"])
    median = statistics.median(times) * 1e3
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))] * 1e3
    ratio = f"{result['fit'] / reference_fit:.2f}" if reference_fit else "1.00"
    return (
        f"| {name} | {result['build']:.2f} | {result['fit']:.2f} | {ratio} "
        f"| {median:.1f} | {p95:.1f} |"
    )


def _median_latency(result: dict) -> float:
    return statistics.median(result["latency"])


def compare_in_pairs(args: argparse.Namespace) -> None:
    """Fit and batch-1 latency ratios over alternating pairs, for a host with noise."""
    retain_freed_memory()
    device = torch.device(args.device)
    fits, latencies = [], []
    with tempfile.TemporaryDirectory(prefix="ff-compare-") as tmp:
        root = subset_folder(
            args.data_root, args.category, args.train_images, args.test_per_defect,
            Path(tmp) / "data",
        )  # fmt: skip
        for pair in range(args.pairs):
            order = ("bench", "anomalib") if pair % 2 == 0 else ("anomalib", "bench")
            results = {}
            for side in order:
                if side == "bench":
                    results[side] = run_bench(args, root, device)
                else:
                    results[side] = run_anomalib(args, root, device, True)
            ours, theirs = results["bench"], results["anomalib"]
            fits.append(ours["fit"] / theirs["fit"])
            latencies.append(_median_latency(ours) / _median_latency(theirs))
            print(
                f"pair {pair + 1}: fit {ours['fit']:.2f} vs {theirs['fit']:.2f} s "
                f"({fits[-1]:.2f}); latency {_median_latency(ours) * 1e3:.1f} vs "
                f"{_median_latency(theirs) * 1e3:.1f} ms ({latencies[-1]:.2f})",
                flush=True,
            )
    print(
        f"\nbench / anomalib (validation off), {args.pairs} alternating pairs: fit "
        f"{statistics.median(fits):.2f} ({min(fits):.2f}-{max(fits):.2f}), batch-1 latency "
        f"{statistics.median(latencies):.2f} ({min(latencies):.2f}-{max(latencies):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding categories")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--train-images", type=int, default=40)
    parser.add_argument("--test-per-defect", type=int, default=None, help="default: all")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--anomalib-python", help="python with anomalib 2.7; omit to skip it")
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="instead: this many pairs of bench and anomalib with validation off, alternating "
        "which runs first; prints each pair's ratios and their medians",
    )
    args = parser.parse_args()
    if args.pairs > 0:
        if not args.anomalib_python:
            parser.error("--pairs needs --anomalib-python")
        compare_in_pairs(args)
        return

    retain_freed_memory()  # as `bench run` does while cells run
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="ff-compare-") as tmp:
        root = subset_folder(
            args.data_root,
            args.category,
            args.train_images,
            args.test_per_defect,
            Path(tmp) / "data",
        )
        ours = run_bench(args, root, device)
        if args.anomalib_python:
            default = run_anomalib(args, root, device, False)
            no_val = run_anomalib(args, root, device, True)
    rows = [_row("bench FastFlow", ours, None)]
    if args.anomalib_python:
        rows.append(
            _row("anomalib Engine.fit (default: validation each epoch)", default, ours["fit"])
        )
        rows.append(_row("anomalib Engine.fit (validation off)", no_val, ours["fit"]))
    print(
        f"\n{args.backbone}, {args.input_size}px, conv3x3-only, {args.train_images} train images, "
        f"batch {args.batch_size}, {args.epochs} epochs, device {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"bench feature extraction: {ours['extract']:.2f} s of its fit time\n")
    print("| run | build (s) | fit (s) | fit / bench | latency median (ms) | latency p95 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
