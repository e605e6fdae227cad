"""Fit time, test time and AUROC: bench's CFLOW-AD against anomalib 2.7's Cflow (a benchmark, not a test).

Both sides train the anomalib reference configuration (fiber batch 64, lr 1e-4, hard
permutation, per-batch normalisation, random-init backbone) on the first N training images
of one MVTec-layout category, for the same number of epochs:
- bench: features extracted once (ImageSet -> FeatureExtractor -> CachedFeatures), then
  CFlow.fit; testing is test-feature extraction plus CFlow.predict (batches of 32);
- anomalib: ``Engine.fit`` with its per-epoch validation switched off (``limit_val_batches=0``;
  ``--anomalib-validation`` keeps anomalib's default, validation on the test split every
  epoch) and ``Engine.test`` with the visualiser off unless ``--anomalib-visualizer``, in a
  separate interpreter (``--anomalib-python``), since anomalib is no dependency of bench.
Test time is wall time per test image including image loading; AUROCs are sklearn's on the
raw scores and maps (bench) and anomalib's own test metrics (anomalib). Per-batch
normalisation makes both depend on how the test set is batched, so small AUROC gaps are
expected even with identical models.

    python scripts/compare_anomalib_cflow.py --data-root /data/mvtec_ad \\
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
from bench.methods.cflow import CFlow
from bench.registry import DATASETS
from bench.runner.heap import retain_freed_memory

REFERENCE = "anomalib"

ANOMALIB_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Cflow

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
    evaluator = True
    if cfg["raw_scores"]:  # no post-processor: predicted labels, and so F1, do not exist
        from anomalib.metrics import AUROC, Evaluator

        evaluator = Evaluator(
            val_metrics=[],
            test_metrics=[
                AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
                AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            ],
        )
    start = time.perf_counter()
    model = Cflow(
        backbone=cfg["backbone"],
        pre_trained=False,
        pre_processor=Cflow.configure_pre_processor(image_size=size),
        post_processor=not cfg["raw_scores"],
        evaluator=evaluator,
        visualizer=cfg["visualizer"],
    )
    build = time.perf_counter() - start
    if cfg["init_path"]:
        torch.save(model.model.state_dict(), cfg["init_path"])
    extra = {} if cfg["validation"] else {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    engine = Engine(
        max_epochs=cfg["epochs"],
        accelerator=cfg["accelerator"],
        devices=1,
        default_root_dir=cfg["workdir"],
        enable_progress_bar=False,
        **extra,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    fit = time.perf_counter() - start
    start = time.perf_counter()
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    test = time.perf_counter() - start
    images = len(datamodule.test_data)
    print("RESULT " + json.dumps({
        "build": build,
        "fit": fit,
        "test": test,
        "test_images": images,
        "image_auroc": float(metrics.get("image_AUROC", float("nan"))),
        "pixel_auroc": float(metrics.get("pixel_AUROC", float("nan"))),
    }))
    """
)


def run_bench(
    args: argparse.Namespace, root: Path, device: torch.device, init: Path | None
) -> dict:
    """bench's CFLOW-AD: build, fit (extraction + training), test (extraction + predict).

    With ``init`` (anomalib's initial state dict) the random backbone and decoders start
    from anomalib's values, so the AUROCs compare training, not two random draws.
    """
    dataset = DATASETS.get("mvtec")(root)
    train, test = dataset.train(args.category), dataset.test(args.category)
    settings = dataclasses.replace(
        CFlow.default_settings(args.backbone, REFERENCE),
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_chunk=args.eval_chunk,
    )
    start = time.perf_counter()
    pre, extractor, method = build_bench_side(
        CFlow, args.backbone, REFERENCE, settings, device, args.seed, not args.quiet
    )
    sync(device)
    build = time.perf_counter() - start
    if init is not None:
        state = torch.load(init, map_location=device, weights_only=True)
        prefix = "encoder.feature_extractor."
        encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        extractor.model.load_state_dict(encoder)
        method.load_state_dict({k: v for k, v in state.items() if k.startswith("decoders.")})
        del state

    def loader(samples: list) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            ImageSet(samples, pre), batch_size=32, num_workers=args.workers
        )

    start = time.perf_counter()
    features = CachedFeatures.extract(extractor, loader(train), device, progress=not args.quiet)
    extracted = time.perf_counter() - start
    method.fit(features)
    sync(device)
    fit = time.perf_counter() - start

    start = time.perf_counter()
    test_features = CachedFeatures.extract(extractor, loader(test), device, progress=not args.quiet)
    outputs = [(s.cpu(), m.cpu()) for s, m in method.predict(test_features, batch_size=32)]
    sync(device)
    tested = time.perf_counter() - start

    scores = torch.cat([s for s, _ in outputs]).double().numpy()
    maps = torch.cat([m for _, m in outputs]).double().numpy()
    truth = load_ground_truth(test, pre, dataset.has_masks)
    image_auroc = roc_auc_score(truth.labels, scores)
    pixel_auroc = float("nan")
    if truth.masks is not None and 0 < truth.masks.sum() < truth.masks.size:
        pixel_auroc = roc_auc_score(truth.masks.ravel(), maps.ravel())
    return {
        "build": build,
        "fit": fit,
        "extract_train": extracted,
        "test": tested,
        "test_images": len(test),
        "image_auroc": float(image_auroc),
        "pixel_auroc": float(pixel_auroc),
        "final_loss": method.history[-1] if method.history else float("nan"),
    }


def run_anomalib(
    args: argparse.Namespace, root: Path, device: torch.device, init: Path | None
) -> dict:
    """anomalib's Engine.fit and Engine.test in its own interpreter; returns its figures.

    With ``init`` it first saves its freshly built model's state dict there.
    """
    cfg = {
        "root": str(root),
        "category": args.category,
        "backbone": args.backbone,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "workers": args.workers,
        "seed": args.seed,
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "visualizer": args.anomalib_visualizer,
        "validation": args.anomalib_validation,
        "raw_scores": args.anomalib_raw_scores,
        "init_path": str(init) if init else "",
    }
    return run_anomalib_script(args.anomalib_python, ANOMALIB_SCRIPT, cfg)


def compare_in_pairs(args: argparse.Namespace) -> None:
    """Fit and test-time ratios over alternating pairs, for a host with noise.

    Both sides start from the same initial weights (anomalib saves its fresh model's state;
    the seed makes it the same in every pair), unless ``--independent-init``.
    """
    device = torch.device(args.device)
    root = subset_folder(args.data_root, args.category, args.train_images, args.test_per_defect)
    init = None if args.independent_init else root / "init.pt"
    fits, tests = [], []
    try:
        for pair in range(args.pairs):
            # anomalib first in the first pair: it writes the initial weights bench starts from
            order = ("anomalib", "bench") if pair % 2 == 0 else ("bench", "anomalib")
            results = {}
            for side in order:
                if side == "bench":
                    results[side] = run_bench(args, root, device, init)
                else:
                    results[side] = run_anomalib(args, root, device, init)
            ours, theirs = results["bench"], results["anomalib"]
            fits.append(ours["fit"] / theirs["fit"])
            tests.append(ours["test"] / theirs["test"])
            print(
                f"pair {pair + 1}: fit {ours['fit']:.2f} vs {theirs['fit']:.2f} s "
                f"({fits[-1]:.2f}); test {ours['test']:.2f} vs {theirs['test']:.2f} s "
                f"({tests[-1]:.2f}); image AUROC {ours['image_auroc']:.4f} vs "
                f"{theirs['image_auroc']:.4f}",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    validation = "on" if args.anomalib_validation else "off"
    print(
        f"\nbench / anomalib (validation {validation}), {args.pairs} alternating pairs: fit "
        f"{statistics.median(fits):.2f} ({min(fits):.2f}-{max(fits):.2f}), test "
        f"{statistics.median(tests):.2f} ({min(tests):.2f}-{max(tests):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="MVTec-layout folder")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--backbone", default="wide_resnet50_2")
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--train-images", type=int, default=40)
    parser.add_argument("--test-per-defect", type=int, default=None, help="default: all")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--anomalib-python", help="python with anomalib 2.7; omit to skip it")
    parser.add_argument("--anomalib-visualizer", action="store_true")
    parser.add_argument(
        "--anomalib-validation",
        action="store_true",
        help="anomalib's default: validation on the test split after every epoch (off by "
        "default, the fair comparison: bench's fit does not validate)",
    )
    parser.add_argument(
        "--anomalib-raw-scores",
        action="store_true",
        help="anomalib without its post-processor: its metrics then read raw scores, as bench's "
        "do, instead of scores normalised and clamped to [0, 1] (which ties the clamped ones)",
    )
    parser.add_argument(
        "--independent-init",
        action="store_true",
        help="do not start bench from anomalib's initial (random) weights",
    )
    parser.add_argument(
        "--eval-chunk", type=int, default=4096, help="cflow.eval_chunk; 0 = fiber batch"
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="instead: this many pairs of bench and anomalib, alternating which runs first; "
        "prints each pair's ratios and their medians",
    )
    args = parser.parse_args()
    retain_freed_memory()  # as `bench run` does while cells run
    if args.pairs > 0:
        if not args.anomalib_python:
            parser.error("--pairs needs --anomalib-python")
        compare_in_pairs(args)
        return

    device = torch.device(args.device)
    root = subset_folder(args.data_root, args.category, args.train_images, args.test_per_defect)
    skip_anomalib = args.anomalib_python is None
    init = None if (skip_anomalib or args.independent_init) else root / "init.pt"
    try:
        theirs = None if skip_anomalib else run_anomalib(args, root, device, init)
        ours = run_bench(args, root, device, init)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"\n{args.backbone}, {args.input_size}px, {args.train_images} train images, "
        f"{ours['test_images']} test images, {args.epochs} epoch(s), {device}"
    )
    rows = [("bench", ours)] + ([("anomalib", theirs)] if theirs else [])
    print(f"{'':10}{'fit s':>10}{'test s/img':>12}{'image AUROC':>13}{'pixel AUROC':>13}")
    for name, r in rows:
        per_image = r["test"] / max(r["test_images"], 1)
        print(
            f"{name:10}{r['fit']:>10.2f}{per_image:>12.4f}"
            f"{r['image_auroc']:>13.4f}{r['pixel_auroc']:>13.4f}"
        )
    if theirs:
        fit_ratio = ours["fit"] / theirs["fit"]
        test_ratio = (ours["test"] / ours["test_images"]) / (theirs["test"] / theirs["test_images"])
        print(
            f"\nfit ratio bench/anomalib {fit_ratio:.3f} (target <= 0.5); "
            f"test ratio {test_ratio:.3f} (target <= 0.333); "
            f"AUROC gaps image {abs(ours['image_auroc'] - theirs['image_auroc']):.4f}, "
            f"pixel {abs(ours['pixel_auroc'] - theirs['pixel_auroc']):.4f} (target <= 0.02)"
        )
    print(json.dumps({"bench": ours, "anomalib": theirs, "config": vars(args)}, default=str))


if __name__ == "__main__":
    main()
