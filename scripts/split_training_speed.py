"""Fit time with CPU training batches split over two threads against unsplit (a benchmark).

One process, alternating the two each round (the split is read from ``FLOWAD_CPU_WORKERS``
at every step, so the same interpreter can run both): ``1`` (PyTorch's own threading
over the whole batch) and ``auto`` (two worker threads, each on half the batch and half
the torch threads). Each round builds the method afresh from the same seed and fits one
epoch on the same random resnet18-shaped features (256 px input: layers 1-3), with the
anomalib reference's settings, the given batch size and image count. Prints every time,
the medians and the median of the per-round ratios split/unsplit.

    python scripts/split_training_speed.py --rounds 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from bench.features import CachedFeatures
from bench.kernels import WORKERS_ENV
from bench.methods.base import MethodContext
from bench.methods.fastflow import FastFlow

METHODS = {"fastflow": FastFlow}
CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256}
SHAPES = {"layer1": (64, 64), "layer2": (32, 32), "layer3": (16, 16)}


def fit_seconds(method: str, features: CachedFeatures, batch_size: int) -> float:
    context = MethodContext(
        backbone="resnet18",
        reference="anomalib",
        channels=CHANNELS,
        shapes=SHAPES,
        output_size=(256, 256),
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )
    cls = METHODS[method]
    settings = dataclasses.replace(
        cls.default_settings("resnet18", "anomalib"),
        epochs=1,
        batch_size=batch_size,
        input_size=256,
    )
    model = cls(settings, context)
    start = time.perf_counter()
    model.fit(features)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="fastflow", help=", ".join(METHODS))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    features = CachedFeatures(
        {
            k: torch.randn(args.images, c, *SHAPES[k], generator=generator)
            for k, c in CHANNELS.items()
        },
        torch.device("cpu"),
    )
    print(f"{args.threads} torch threads, {args.images} images, batch {args.batch_size}")
    for method in args.methods.split(","):
        times: dict[str, list[float]] = {"1": [], "auto": []}
        for _ in range(args.rounds):
            for choice in times:
                os.environ[WORKERS_ENV] = choice
                times[choice].append(fit_seconds(method, features, args.batch_size))
        ratios = [a / b for a, b in zip(times["auto"], times["1"], strict=True)]
        print(
            f"{method}: unsplit {[round(t, 2) for t in times['1']]} s, "
            f"split {[round(t, 2) for t in times['auto']]} s; medians "
            f"{statistics.median(times['1']):.2f} / {statistics.median(times['auto']):.2f} s, "
            f"ratio {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
