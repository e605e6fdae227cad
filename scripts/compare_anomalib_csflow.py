"""Fit and test time: bench's CS-Flow against anomalib 2.7's Csflow (a benchmark, not a test).

Both sides train the anomalib reference configuration (input 256, batch 32, Adam betas
(0.5, 0.9), shared permutations, gradient clipping 1, EfficientNet-B5 with random
weights) on the first N training images of one MVTec-layout category, for the same
number of epochs, and then score the same test images:
- bench: train features extracted once (ImageSet -> FeatureExtractor -> CachedFeatures),
  then CsFlow.fit; testing is test-feature extraction plus CsFlow.predict;
- anomalib: ``Engine.fit`` with validation off and ``Engine.test`` with the visualiser off,
  in a separate interpreter (``--anomalib-python``), since anomalib is no dependency of
  bench. Its torchvision backbone is built without weights (nothing is downloaded). By
  default its fit ends by writing a checkpoint (weights and Adam state);
  ``--anomalib-barebones`` leaves that out (and its logging).
Each side runs in a fresh interpreter per round. The two run alternately, ``--rounds``
times each, on ``--threads`` threads (1 by default:
on a shared machine a second OpenMP thread mostly spin-waits), and the script prints the
median of each side's times and the ratios. Test time is wall time per test image,
image loading included. The backbones are random and differ (timm's TF port against
torchvision's), so the AUROCs printed only show that both ran.

    python scripts/compare_anomalib_csflow.py --data-root DATA \\
        --category bottle --anomalib-python ANOMALIB_PYTHON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from bench.datasets.pipeline import ImageSet, load_ground_truth
from bench.features import CachedFeatures
from bench.methods.csflow import CsFlow
from bench.registry import DATASETS
from bench.runner.heap import retain_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison_data import (  # noqa: E402
    RESULT,
    build_bench_side,
    run_anomalib_script,
    run_result_process,
    subset_folder,
)

REFERENCE = "anomalib"
BACKBONE = "tf_efficientnet_b5"

ANOMALIB_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import torchvision
    import anomalib.models.image.csflow.torch_model as torch_model
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Csflow

    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    # No ImageNet download: the same architecture with random weights.
    torch_model.efficientnet_b5 = lambda weights=None: torchvision.models.efficientnet_b5()
    torch.manual_seed(cfg["seed"])
    size = (cfg["input_size"], cfg["input_size"])
    datamodule = MVTecAD(
        root=cfg["root"],
        category=cfg["category"],
        train_batch_size=cfg["batch_size"],
        eval_batch_size=32,
        num_workers=0,
    )
    model = Csflow(
        cross_conv_hidden_channels=cfg["hidden_channels"],
        pre_processor=Csflow.configure_pre_processor(image_size=size),
        visualizer=False,
    )
    engine = Engine(
        max_epochs=cfg["epochs"],
        accelerator="cpu",
        devices=1,
        default_root_dir=cfg["workdir"],
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        barebones=cfg["barebones"],
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    test = time.perf_counter() - start
    print("RESULT " + json.dumps({
        "fit": fit,
        "test": test,
        "test_images": len(datamodule.test_data),
        "image_auroc": float(metrics.get("image_AUROC", float("nan"))),
    }))
    """
)


def run_bench(args: argparse.Namespace, root: Path) -> dict:
    """bench's CS-Flow: fit (extraction + training), test (extraction + predict)."""
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as `bench run` does while cells run
    dataset = DATASETS.get("mvtec")(root)
    train, test = dataset.train(args.category), dataset.test(args.category)
    settings = dataclasses.replace(
        CsFlow.default_settings(BACKBONE, REFERENCE),
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        hidden_channels=args.hidden_channels,
    )
    pre, extractor, method = build_bench_side(
        CsFlow, BACKBONE, REFERENCE, settings, torch.device("cpu"), args.seed, False
    )

    def loader(samples: list, batch: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(ImageSet(samples, pre), batch_size=batch)

    start = time.perf_counter()
    features = CachedFeatures.extract(
        extractor, loader(train, args.batch_size), torch.device("cpu"), progress=False
    )
    method.fit(features)
    fit = time.perf_counter() - start
    start = time.perf_counter()
    test_features = CachedFeatures.extract(
        extractor, loader(test, 32), torch.device("cpu"), progress=False
    )
    scores = [s for s, _ in method.predict(test_features, batch_size=32)]
    tested = time.perf_counter() - start
    truth = load_ground_truth(test, pre, dataset.has_masks)
    auroc = roc_auc_score(truth.labels, torch.cat(scores).double().numpy())
    return {"fit": fit, "test": tested, "test_images": len(test), "image_auroc": float(auroc)}


def run_bench_process(args: argparse.Namespace, root: Path) -> dict:
    """``run_bench`` in a fresh interpreter, as anomalib runs: both sides start from the
    same state, and neither holds the other's memory."""
    command = [sys.executable, __file__, "--bench-worker", str(root), *sys.argv[1:]]
    return run_result_process(command, {**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def run_anomalib(args: argparse.Namespace, root: Path) -> dict:
    cfg = {
        "root": str(root),
        "category": args.category,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "hidden_channels": args.hidden_channels,
        "seed": args.seed,
        "threads": args.threads,
        "barebones": args.anomalib_barebones,
    }
    env = {"OMP_NUM_THREADS": str(args.threads)}
    return run_anomalib_script(args.anomalib_python, ANOMALIB_SCRIPT, cfg, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="MVTec-layout folder")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--hidden-channels", type=int, default=1024)
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument("--test-per-defect", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anomalib-python", required=True, help="python with anomalib 2.7")
    parser.add_argument(
        "--anomalib-barebones",
        action="store_true",
        help="Lightning's barebones mode: no checkpoint written at the end of fit, no logging "
        "(anomalib then reports no AUROC)",
    )
    parser.add_argument("--bench-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bench_worker:
        print(RESULT + json.dumps(run_bench(args, args.bench_worker)))
        return

    root = subset_folder(args.data_root, args.category, args.train_images, args.test_per_defect)
    runs: dict[str, list[dict]] = {"bench": [], "anomalib": []}
    try:
        for index in range(args.rounds):
            # Alternate which side goes first, so a drift in machine load hits both.
            order = ("anomalib", "bench") if index % 2 == 0 else ("bench", "anomalib")
            for side in order:
                run = run_anomalib if side == "anomalib" else run_bench_process
                result = run(args, root)
                runs[side].append(result)
                print(f"round {index + 1} {side}: {json.dumps(result)}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def median(side: str, key: str) -> float:
        return statistics.median(
            r[key] / (r["test_images"] if key == "test" else 1) for r in runs[side]
        )

    images = runs["bench"][0]["test_images"]
    print(
        f"\nCS-Flow, {args.input_size}px, hidden {args.hidden_channels}, {args.train_images} "
        f"train images, {images} test images, {args.epochs} epoch(s), {args.threads} thread(s), "
        f"medians of {args.rounds} alternating rounds"
    )
    print(f"{'':10}{'fit s':>10}{'test s/img':>12}")
    for side in runs:
        print(f"{side:10}{median(side, 'fit'):>10.2f}{median(side, 'test'):>12.4f}")
    fit_ratio = median("bench", "fit") / median("anomalib", "fit")
    test_ratio = median("bench", "test") / median("anomalib", "test")
    print(f"\nratio bench/anomalib: fit {fit_ratio:.3f}, test {test_ratio:.3f} (target <= 0.5)")
    print(json.dumps({"runs": runs, "config": vars(args)}, default=str))


if __name__ == "__main__":
    main()
