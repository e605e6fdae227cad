"""Fit time, test time and AUROC: bench's U-Flow against anomalib 2.7's Uflow (a benchmark, not a test).

Both sides train the anomalib reference configuration (4 flow steps, clamp 2, lr 1e-3,
weight decay 1e-5, LinearLR per epoch, batch 32, random-init backbone with its trainable
LayerNorms) on the first N training images of one MVTec-layout category, for the same
number of epochs, at the same input size, starting from the same initial weights:
- bench: features extracted once (ImageSet -> FeatureExtractor -> CachedFeatures), then
  UFlow.fit; testing is test-feature extraction plus UFlow.predict (batches of 32);
- anomalib: ``Engine.fit`` with validation off (``limit_val_batches=0``) and
  ``Engine.test`` with the visualiser off, in a separate interpreter
  (``--anomalib-python``), since anomalib is no dependency of bench. Its Uflow always
  loads ImageNet weights for CNN backbones; the script makes timm build them randomly
  initialised instead (no download), and resizes with a pre-processor of the chosen size
  (Uflow's own is fixed at 448).
The two run alternately ``--repeats`` times; medians are reported, and the median of the
per-pair ratios, of wall time and of the process's CPU time (steadier on a shared host,
where a second thread mostly spin-waits: hence one thread by default). Test time is per
test image including image loading; AUROCs are sklearn's on the raw scores and maps
(bench) and anomalib's own test metrics.

    python scripts/compare_anomalib_uflow.py --data-root DATA \\
        --category bottle --anomalib-python ANOMALIB_PYTHON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import textwrap
import time
from pathlib import Path

import torch
from comparison_data import build_bench_side, run_anomalib_script, subset_folder, sync
from sklearn.metrics import roc_auc_score

from bench.datasets.pipeline import ImageSet, load_ground_truth
from bench.features import CachedFeatures
from bench.methods.uflow import UFlow, port_reference_state
from bench.registry import DATASETS
from bench.runner.heap import retain_freed_memory

REFERENCE = "anomalib"
BACKBONE_PREFIX = "feature_extractor.feature_extractor."

ANOMALIB_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import timm
    import torch
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(cfg["threads"])
    create_model = timm.create_model
    timm.create_model = lambda *a, **k: create_model(*a, **{**k, "pretrained": False})

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Uflow
    from anomalib.pre_processing import PreProcessor

    torch.manual_seed(cfg["seed"])
    size = (cfg["input_size"], cfg["input_size"])
    datamodule = MVTecAD(
        root=cfg["root"],
        category=cfg["category"],
        train_batch_size=cfg["batch_size"],
        eval_batch_size=32,
        num_workers=cfg["workers"],
    )
    transform = Compose([
        Resize(size, antialias=True),
        Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    model = Uflow(
        backbone=cfg["backbone"],
        pre_processor=PreProcessor(transform=transform),
        visualizer=False,
    )
    if cfg["init_path"]:
        torch.save(model.model.state_dict(), cfg["init_path"])
    engine = Engine(
        max_epochs=cfg["epochs"],
        accelerator=cfg["accelerator"],
        devices=1,
        default_root_dir=cfg["workdir"],
        enable_progress_bar=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
    )
    start, cpu = time.perf_counter(), time.process_time()
    engine.fit(model=model, datamodule=datamodule)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    fit, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    test, test_cpu = time.perf_counter() - start, time.process_time() - cpu
    print("RESULT " + json.dumps({
        "fit": fit,
        "fit_cpu": fit_cpu,
        "test": test,
        "test_cpu": test_cpu,
        "test_images": len(datamodule.test_data),
        "image_auroc": float(metrics.get("image_AUROC", float("nan"))),
        "pixel_auroc": float(metrics.get("pixel_AUROC", float("nan"))),
    }))
    """
)


def run_bench(args: argparse.Namespace, root: Path, device: torch.device, init: Path) -> dict:
    """bench's U-Flow from anomalib's initial weights: fit (extraction + training), test
    (extraction + predict)."""
    dataset = DATASETS.get("mvtec")(root)
    train, test = dataset.train(args.category), dataset.test(args.category)
    settings = dataclasses.replace(
        UFlow.default_settings(args.backbone, REFERENCE),
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        nfa="off",
    )
    pre, extractor, method = build_bench_side(
        UFlow, args.backbone, REFERENCE, settings, device, args.seed, not args.quiet
    )
    state = torch.load(init, map_location=device, weights_only=True)
    backbone = {
        k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)
    }
    extractor.model.load_state_dict(backbone)
    method.load_state_dict(port_reference_state(state))

    def loader(samples: list) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ImageSet(samples, pre), batch_size=32, num_workers=args.workers
        )

    start, cpu = time.perf_counter(), time.process_time()
    features = CachedFeatures.extract(extractor, loader(train), device, progress=not args.quiet)
    method.fit(features)
    sync(device)
    fit, fit_cpu = time.perf_counter() - start, time.process_time() - cpu

    start, cpu = time.perf_counter(), time.process_time()
    test_features = CachedFeatures.extract(extractor, loader(test), device, progress=False)
    outputs = [(s.cpu(), m.cpu()) for s, m in method.predict(test_features, batch_size=32)]
    sync(device)
    tested, test_cpu = time.perf_counter() - start, time.process_time() - cpu

    scores = torch.cat([s for s, _ in outputs]).double().numpy()
    maps = torch.cat([m for _, m in outputs]).double().numpy()
    truth = load_ground_truth(test, pre, dataset.has_masks)
    pixel_auroc = float("nan")
    if truth.masks is not None and 0 < truth.masks.sum() < truth.masks.size:
        pixel_auroc = roc_auc_score(truth.masks.ravel(), maps.ravel())
    return {
        "fit": fit,
        "fit_cpu": fit_cpu,
        "test": tested,
        "test_cpu": test_cpu,
        "test_images": len(test),
        "image_auroc": float(roc_auc_score(truth.labels, scores)),
        "pixel_auroc": float(pixel_auroc),
        "final_loss": method.history[-1] if method.history else float("nan"),
    }


def run_anomalib(args: argparse.Namespace, root: Path, device: torch.device, init: Path) -> dict:
    """anomalib's Engine.fit and Engine.test in its own interpreter; it first saves its
    freshly built model's state dict to ``init``."""
    cfg = {
        "root": str(root),
        "category": args.category,
        "backbone": args.backbone,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "workers": args.workers,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "init_path": str(init),
    }
    return run_anomalib_script(args.anomalib_python, ANOMALIB_SCRIPT, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="MVTec-layout folder")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="resnet18", help="resnet18 or wide_resnet50_2")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--train-images", type=int, default=32)
    parser.add_argument("--test-per-defect", type=int, default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on both sides (1 on a busy host)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--anomalib-python", required=True, help="python with anomalib 2.7")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as `bench run` does while cells run
    device = torch.device(args.device)
    root = subset_folder(args.data_root, args.category, args.train_images, args.test_per_defect)
    init = root / "init.pt"
    runs: list[tuple[dict, dict]] = []
    try:
        for _ in range(args.repeats):
            theirs = run_anomalib(args, root, device, init)
            ours = run_bench(args, root, device, init)
            runs.append((ours, theirs))
            print(json.dumps({"bench": ours, "anomalib": theirs}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def median(side: int, key: str) -> float:
        return statistics.median(run[side][key] for run in runs)

    n_test = runs[0][0]["test_images"]
    print(
        f"\n{args.backbone}, {args.input_size}px, {args.train_images} train images, "
        f"{n_test} test images, {args.epochs} epoch(s), {device}, "
        f"{args.threads} thread(s), medians of {len(runs)} alternating runs"
    )
    print(
        f"{'':10}{'fit s':>9}{'fit cpu s':>11}{'test s/img':>12}{'cpu s/img':>11}"
        f"{'image AUROC':>13}{'pixel AUROC':>13}"
    )
    for name, side in (("bench", 0), ("anomalib", 1)):
        print(
            f"{name:10}{median(side, 'fit'):>9.2f}{median(side, 'fit_cpu'):>11.2f}"
            f"{median(side, 'test') / n_test:>12.4f}{median(side, 'test_cpu') / n_test:>11.4f}"
            f"{median(side, 'image_auroc'):>13.4f}{median(side, 'pixel_auroc'):>13.4f}"
        )
    for key in ("fit", "fit_cpu", "test", "test_cpu"):
        ratios = [o[key] / t[key] for o, t in runs]
        print(
            f"{key} ratio bench/anomalib {statistics.median(ratios):.3f} "
            f"({min(ratios):.3f} to {max(ratios):.3f}); target <= 0.5"
        )


if __name__ == "__main__":
    main()
