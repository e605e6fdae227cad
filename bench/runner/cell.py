"""A cell (one method x dataset x category x backbone x seed, every setting resolved) and
its whole life: data, features, fit, predict, metrics -> one result row.

In the unified setting one fit serves every category of the run: the cell of the first
category trains on all of their training images together and returns one row per category.

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
from bench.datasets.base import Dataset, Sample
from bench.datasets.pipeline import ImageSet, Preprocess, load_ground_truth
from bench.errors import BenchError
from bench.extractor import WEIGHT_POLICIES, FeatureExtractor
from bench.features import CachedFeatures, FeatureSource, StreamedFeatures
from bench.methods.base import Method, MethodContext
from bench.profiling import PeakMemory, ProfileSettings, cell_costs
from bench.registry import DATASETS, METHODS
from bench.runner import examples
from bench.runner.heap import release_freed_memory
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
    setting: str = "separate"  # or "unified": one model trained on every category in trained_on
    trained_on: tuple[str, ...] = ()  # unified: the categories whose training images it fits

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
        as ``fastflow`` and ``fastflow-3x3`` where the reference is already 3x3-only) share it.
        Unified cells of one model share it across categories: one fit answers for all."""
        ignored = {"method", "category"} if self.setting == "unified" else {"method"}
        payload = {k: v for k, v in self._payload().items() if k not in ignored}
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def evaluated(self) -> tuple[str, ...]:
        """The categories whose test sets this cell's run scores."""
        return self.trained_on if self.setting == "unified" else (self.category,)

    def label(self) -> str:
        unified = "/unified" if self.setting == "unified" else ""
        return f"{self.method}/{self.backbone}/{self.category}/seed{self.seed}{unified}"


_KEY_DEFAULTS = {
    "eval_every": 0,
    "fpr_limit": metrics.DEFAULT_FPR_LIMIT,
    "bootstrap": metrics.DEFAULT_RESAMPLES,
    "setting": "separate",
    "trained_on": (),
}
SETTINGS = ("separate", "unified")
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
    reused: a zero-padded backbone's features never reach a cell that asked for reflection,
    and a checkpoint file replaced since is loaded again."""
    version = _file_version(weights) if weights not in WEIGHT_POLICIES else None
    key = (backbone, tuple(layers), weights, version, provenance, input_size, device, padding)
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


@dataclass
class _TestSet:
    """One category's test images, ground truth and streamed features."""

    category: str
    samples: list
    images: ImageSet
    gt: Any
    features: StreamedFeatures


def _test_set(
    category: str, samples: list, pre: Preprocess, has_masks: bool,
    extractor: FeatureExtractor, env: Environment,
) -> _TestSet:  # fmt: skip
    images = ImageSet(samples, pre)
    features = StreamedFeatures(
        extractor,
        lambda b, s, g, d: _loader(images, b, env.workers),
        len(images),
        torch.device(env.device),
    )
    return _TestSet(category, samples, images, load_ground_truth(samples, pre, has_masks), features)


def data_fingerprint(train: list[Sample], test: list[Sample]) -> str:
    """Which images a row was trained and tested on, wherever the dataset folder sits:
    each sample's split, name, label and defect, and the size of its image and mask files
    (the pixels themselves for in-memory images). A run compares it with its finished rows,
    so results of a dataset since changed are not passed off as done."""
    digest = hashlib.sha256()
    for split, samples in (("train", train), ("test", test)):
        for sample in samples:
            digest.update(f"{split}\0{sample.name}\0{sample.label}\0{sample.defect}".encode())
            for item in (sample.image, sample.mask):
                if isinstance(item, np.ndarray):
                    digest.update(np.ascontiguousarray(item).data)
                else:
                    digest.update(f"\0{'-' if item is None else _file_size(item)}".encode())
    return digest.hexdigest()[:16]


def _file_version(path: str) -> tuple[int, int] | None:
    try:
        stat = Path(path).expanduser().stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _file_size(path: Path) -> int | str:
    try:
        return Path(path).stat().st_size
    except OSError:
        return "missing"


def cell_samples(cell: Cell, dataset: Dataset) -> tuple[list[Sample], dict[str, list[Sample]]]:
    """The training images (every category a unified cell trains on) and each evaluated
    category's test images."""
    for category in cell.evaluated:
        dataset.check_category(category)
    train = [s for category in cell.evaluated for s in dataset.train(category)]
    return train, {category: dataset.test(category) for category in cell.evaluated}


def run_cell(cell: Cell, env: Environment) -> list[dict[str, Any]]:
    """Train and evaluate one cell: one result row per evaluated category (one category,
    except in the unified setting)."""
    seed_everything(cell.seed)
    release_freed_memory()  # the peak is measured from what the process holds now
    peak = PeakMemory(torch.device(env.device))
    dataset = DATASETS.get(cell.dataset)(Path(env.data_root) if env.data_root else None)
    train_samples, test_samples = cell_samples(cell, dataset)
    method, extractor, pre = build_method(cell, env)
    train_images = ImageSet(train_samples, pre)
    tests = [
        _test_set(c, samples, pre, dataset.has_masks, extractor, env)
        for c, samples in test_samples.items()
    ]

    sync = torch.cuda.synchronize if env.device.startswith("cuda") else (lambda: None)
    maps_shape = pre.output_size if dataset.has_masks else None
    history: dict[str, list[dict[str, Any]]] = {t.category: [] for t in tests}
    evaluating = [0.0]  # seconds spent in evaluations during fit, not counted as fit time

    def evaluate_epoch(epoch: int) -> None:
        if epoch % cell.eval_every:
            return
        start = time.perf_counter()
        for test in tests:
            with preserved_random_state():
                scores, maps = predict_test_set(method, test.features, maps_shape)
            values = metrics.evaluate(test.gt, scores, maps, cell.fpr_limit)
            history[test.category].append({"epoch": epoch, **values})
        evaluating[0] += time.perf_counter() - start

    if cell.eval_every:
        method.context = dataclasses.replace(method.context, on_epoch=evaluate_epoch)
    t0 = time.perf_counter()
    train = _train_source(method, extractor, train_images, cell, env)
    sync()
    # A CPU worker thread (bench.kernels) allocates from a glibc arena of its own and cannot
    # reuse blocks another thread freed: hand each phase's freed blocks back before the next.
    release_freed_memory()
    t1 = time.perf_counter()
    method.fit(train)
    sync()
    t2 = time.perf_counter()
    del train
    release_freed_memory()
    fit_seconds = t2 - t1 - evaluating[0]

    rows = []
    for test in tests:
        start = time.perf_counter()
        scores, maps = predict_test_set(method, test.features, maps_shape)
        sync()
        tested = time.perf_counter()
        values, evidence = metrics.evaluate_with_evidence(test.gt, scores, maps, cell.fpr_limit)
        if cell.bootstrap:
            values.update(metrics.confidence_intervals(evidence, cell.bootstrap))
        measured = time.perf_counter()
        epochs = history[test.category]
        if cell.eval_every and (not epochs or epochs[-1]["epoch"] != _epochs_run(method)):
            epochs.append({"epoch": _epochs_run(method), **values})
        row = ResultRow(
            dataset=cell.dataset,
            category=test.category,
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
            n_test=len(test.images),
            n_anomalous=int(test.gt.labels.sum()),
            data_id=data_fingerprint(train_samples, test.samples),
            trainable_params=method.trainable_parameters(),
            feature_seconds=t1 - t0,
            fit_seconds=fit_seconds,
            test_seconds=tested - start,
            metric_seconds=measured - tested,
            device=env.device,
            threads=torch.get_num_threads(),
            settings=cell.settings,
            setting=cell.setting,
            trained_on=",".join(cell.trained_on) if cell.setting == "unified" else None,
            history=epochs or None,
            extra=method.extra_metrics(maps, test.gt.masks),
        ).to_dict()
        if maps is not None:
            row[examples.EXAMPLES_KEY] = examples.collect(test.samples, pre, test.gt.masks, maps)
        row[EVIDENCE_KEY] = evidence
        rows.append(row)
    costs = cell_costs(method, extractor, env.profile, peak, fit_seconds=fit_seconds)
    for row in rows:
        row.update(costs)
        row["cell_key"] = dataclasses.replace(cell, category=row["category"]).key
    return rows


def describe_failure(exc: BaseException, debug: bool) -> str:
    """One line for user errors; the traceback too for bugs or when debugging."""
    if isinstance(exc, BenchError) and not debug:
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    return text + "\n" + traceback.format_exc() if debug else text
