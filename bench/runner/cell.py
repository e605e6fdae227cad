"""A cell (one method x dataset x category x backbone x seed, every setting resolved) and
its whole life: data, features, fit, predict, metrics -> one result row.

``run_cell`` is a plain function of its cell and environment, so any executor (local, or
a Ray worker on another machine) can run it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import metrics
from bench.datasets.pipeline import ImageSet, Preprocess, load_ground_truth
from bench.errors import BenchError
from bench.extractor import FeatureExtractor
from bench.features import CachedFeatures, FeatureSource, StreamedFeatures
from bench.methods.base import Method, MethodContext
from bench.profiling import PeakMemory, ProfileSettings, cell_costs
from bench.registry import DATASETS, METHODS
from bench.runner import examples
from bench.runner.row import ResultRow


@dataclass(frozen=True)
class Cell:
    """One unit of work; everything that changes its result is in here."""

    method: str  # registered name, possibly a variant such as fastflow-3x3
    base: str  # the method it is built on
    dataset: str
    category: str
    backbone: str
    seed: int
    reference: str
    weights: str
    settings: dict[str, Any]
    eval_every: int = 0  # also evaluate every K epochs during training (0: only at the end)
    fpr_limit: float = metrics.DEFAULT_FPR_LIMIT  # where every AUPRO column stops
    bootstrap: int = metrics.DEFAULT_RESAMPLES  # resamples of each confidence interval; 0: none

    def _payload(self) -> dict[str, Any]:
        """Fields at their defaults are left out, so keys of cells from before a field
        existed stay what they always were."""
        payload = dataclasses.asdict(self)
        for name, default in _KEY_DEFAULTS.items():
            if payload[name] == default:
                del payload[name]
        return payload

    @property
    def key(self) -> str:
        payload = self._payload()
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def work_key(self) -> str:
        """Identity of the computation: cells that differ only in the variant's name (such
        as ``fastflow`` and ``fastflow-3x3`` where the reference is already 3x3-only) share it."""
        payload = {k: v for k, v in self._payload().items() if k != "method"}
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def label(self) -> str:
        return f"{self.method}/{self.backbone}/{self.category}/seed{self.seed}"


_KEY_DEFAULTS = {
    "eval_every": 0,
    "fpr_limit": metrics.DEFAULT_FPR_LIMIT,
    "bootstrap": metrics.DEFAULT_RESAMPLES,
}
EVIDENCE_KEY = "evidence"  # the row carries the cell's Evidence here until the driver saves it


@dataclass(frozen=True)
class Environment:
    """Where and how cells run (not part of a cell's identity)."""

    data_root: str | None
    device: str = "cpu"
    workers: int = 0
    progress: bool = True
    spill_dir: str | None = None
    profile: ProfileSettings | None = ProfileSettings()  # None: no FLOPs, latency, throughput


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise BenchError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return name


def default_workers() -> int:
    """Image-decoding worker processes: leave the cores to torch on small machines."""
    return min(4, (os.cpu_count() or 1) // 2)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_EXTRACTORS: dict[tuple, FeatureExtractor] = {}


def get_extractor(
    backbone: str,
    layers: list[str],
    weights: str,
    provenance: str,
    input_size: tuple[int, int],
    device: str,
    padding: str = "zeros",
) -> FeatureExtractor:
    """Built once per (backbone, layers, weights, input size, padding) per process, then
    reused: a zero-padded backbone's features never reach a cell that asked for reflection."""
    key = (backbone, tuple(layers), weights, provenance, input_size, device, padding)
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()  # one backbone in memory at a time
        extractor = FeatureExtractor(backbone, layers, weights, provenance, input_size, padding)
        _EXTRACTORS[key] = extractor.to(device)
    return _EXTRACTORS[key]


def _loader(
    dataset: ImageSet,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=workers,
        persistent_workers=False,
    )


def method_class(cell: Cell) -> type[Method]:
    return METHODS.get(cell.method)


def build_method(cell: Cell, env: Environment) -> tuple[Method, FeatureExtractor, Preprocess]:
    """The method and the shared extractor it reads from, for one cell."""
    cls = method_class(cell)
    settings = cls.Settings(**cell.settings)
    pre = cls.preprocess(cell.backbone, cell.reference, settings)
    extractor = get_extractor(
        cell.backbone,
        cls.needs(cell.backbone, settings),
        cell.weights,
        cls.weights_provenance(cell.backbone, cell.reference),
        pre.output_size,
        env.device,
        cls.encoder_padding(cell.backbone, settings),
    )
    context = MethodContext(
        backbone=cell.backbone,
        reference=cell.reference,
        channels=dict(extractor.channels),
        shapes=dict(extractor.shapes),
        output_size=pre.output_size,
        device=torch.device(env.device),
        seed=cell.seed,
        progress=env.progress,
    )
    return cls(settings, context), extractor, pre


def _train_source(
    method: Method, extractor: FeatureExtractor, images: ImageSet, cell: Cell, env: Environment
) -> FeatureSource:
    augment = type(method).train_augmentation(method.settings, cell.reference)
    device = torch.device(env.device)
    if augment is None:
        batch = getattr(method.settings, "batch_size", 32)
        return CachedFeatures.extract(
            extractor,
            _loader(images, batch, env.workers),
            device,
            spill_dir=Path(env.spill_dir) if env.spill_dir else None,
            desc=f"train features {cell.category}",
            progress=env.progress,
        )

    def make_loader(batch_size, shuffle, generator, drop_last):
        # Each pass augments from a seed drawn in this process, not from the workers'
        # random streams, so results do not depend on --workers.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        augmented = ImageSet(images.samples, images.pre, augment, seed)
        return _loader(augmented, batch_size, env.workers, shuffle, generator, drop_last)

    return StreamedFeatures(extractor, make_loader, len(images), device)


def predict_test_set(
    method: Method, test: FeatureSource, maps_shape: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (N,) and, where the dataset has masks, maps (N, H, W) of every test image."""
    n = len(test)
    scores = np.empty(n, dtype=np.float32)
    maps = np.empty((n, *maps_shape), dtype=np.float32) if maps_shape else None
    start = 0
    for batch_scores, batch_maps in method.predict(
        test, getattr(method.settings, "batch_size", 32)
    ):
        stop = start + batch_scores.shape[0]
        scores[start:stop] = batch_scores.float().cpu().numpy()
        if maps is not None:
            maps[start:stop] = batch_maps.float().cpu().numpy()
        start = stop
    if start != n:
        raise BenchError(f"{method.name} returned {start} predictions for {n} test images")
    return scores, maps


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """An evaluation during training must not move any random stream training draws from,
    so a cell gives the same final row with or without --eval-every."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _epochs_run(method: Method) -> int:
    """Epochs the fit actually ran (early stopping counts): the length of its loss history."""
    return len(getattr(method, "history", [])) or getattr(method.settings, "epochs", 0)


def run_cell(cell: Cell, env: Environment) -> dict[str, Any]:
    """Train and evaluate one cell; returns its result row."""
    seed_everything(cell.seed)
    peak = PeakMemory(torch.device(env.device))
    dataset = DATASETS.get(cell.dataset)(Path(env.data_root) if env.data_root else None)
    dataset.check_category(cell.category)
    train_samples = dataset.train(cell.category)
    test_samples = dataset.test(cell.category)
    method, extractor, pre = build_method(cell, env)
    train_images = ImageSet(train_samples, pre)
    test_images = ImageSet(test_samples, pre)
    gt = load_ground_truth(test_samples, pre, dataset.has_masks)

    sync = torch.cuda.synchronize if env.device.startswith("cuda") else (lambda: None)
    test = StreamedFeatures(
        extractor,
        lambda b, s, g, d: _loader(test_images, b, env.workers),
        len(test_images),
        torch.device(env.device),
    )
    maps_shape = pre.output_size if dataset.has_masks else None
    history: list[dict[str, Any]] = []
    evaluating = [0.0]  # seconds spent in evaluations during fit, not counted as fit time

    def evaluate_epoch(epoch: int) -> None:
        if epoch % cell.eval_every:
            return
        start = time.perf_counter()
        with preserved_random_state():
            scores, maps = predict_test_set(method, test, maps_shape)
        values = metrics.evaluate(gt, scores, maps, cell.fpr_limit)
        history.append({"epoch": epoch, **values})
        evaluating[0] += time.perf_counter() - start

    if cell.eval_every:
        method.context = dataclasses.replace(method.context, on_epoch=evaluate_epoch)
    t0 = time.perf_counter()
    train = _train_source(method, extractor, train_images, cell, env)
    sync()
    t1 = time.perf_counter()
    method.fit(train)
    sync()
    t2 = time.perf_counter()
    del train

    scores, maps = predict_test_set(method, test, maps_shape)
    sync()
    t3 = time.perf_counter()
    values, evidence = metrics.evaluate_with_evidence(gt, scores, maps, cell.fpr_limit)
    if cell.bootstrap:
        values.update(metrics.confidence_intervals(evidence, cell.bootstrap))
    t4 = time.perf_counter()
    n = len(test_images)
    if cell.eval_every and (not history or history[-1]["epoch"] != _epochs_run(method)):
        history.append({"epoch": _epochs_run(method), **values})
    costs = cell_costs(method, extractor, env.profile, peak, fit_seconds=t2 - t1 - evaluating[0])

    row = ResultRow(
        dataset=cell.dataset,
        category=cell.category,
        method=cell.method,
        base_method=cell.base,
        backbone=cell.backbone,
        seed=cell.seed,
        reference=cell.reference,
        weights=extractor.weights.describe(),
        weights_id=extractor.weights.ident,
        pretrained=extractor.weights.pretrained,
        input=pre.describe(),
        metrics=values,
        aupro_fpr_limit=cell.fpr_limit,
        n_train=len(train_samples),
        n_test=n,
        n_anomalous=int(gt.labels.sum()),
        trainable_params=method.trainable_parameters(),
        feature_seconds=t1 - t0,
        fit_seconds=t2 - t1 - evaluating[0],
        test_seconds=t3 - t2,
        metric_seconds=t4 - t3,
        **costs,
        device=env.device,
        threads=torch.get_num_threads(),
        settings=cell.settings,
        cell_key=cell.key,
        history=history or None,
        extra=method.extra_metrics(maps, gt.masks),
    ).to_dict()
    if maps is not None:
        row[examples.EXAMPLES_KEY] = examples.collect(test_samples, pre, gt.masks, maps)
    row[EVIDENCE_KEY] = evidence
    return row


def describe_failure(exc: BaseException, debug: bool) -> str:
    """One line for user errors; the traceback too for bugs or when debugging."""
    if isinstance(exc, BenchError) and not debug:
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    return text + "\n" + traceback.format_exc() if debug else text
