"""The run configuration and presets: what a grid is, before anything heavy is imported.

Parsing options and presets happens here without torch, timm or the plugins, so the CLI
starts fast; ``validate`` imports the registries it checks against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.profiling import ProfileSettings

# Flags that map onto a method setting of the same name, for every method that has it.
SHARED_SETTINGS = ("input_size", "epochs", "batch_size", "lr")

EXECUTORS = ("local", "ray")
# --input-size bounds. 32 px is the ResNets' coarsest stride (layer4): below it the deepest
# maps are one pixel computed mostly from padding, and PaDiM's blur (radius 16 at its sigma
# of 4) needs maps wider than 16 pixels. Methods that need more say so per cell (CS-Flow: a
# multiple of 4 x the stride; U-Flow's NFA: maps of 3x3; CFLOW-AD's reflect padding: over 32).
MIN_INPUT_SIZE = 32
MAX_INPUT_SIZE = 4096  # five times the largest reference size (CS-Flow's 768)
TRAINING_SETTINGS = ("separate", "unified")  # a model per category, or one for all of them


@dataclass
class RunConfig:
    """Everything ``bench run`` needs; filled from a preset, then the command line."""

    methods: list[str] = field(default_factory=list)
    dataset: str = "synthetic"
    data_root: str | None = None
    categories: list[str] = field(default_factory=lambda: ["all"])
    backbones: list[str] = field(default_factory=lambda: ["resnet18"])
    seeds: list[int] = field(default_factory=lambda: [0])
    setting: str = "separate"  # or "unified": one model on every chosen category's images
    reference: str = "original"
    weights: str = "auto"
    input_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    set: dict[str, dict[str, Any]] = field(default_factory=dict)
    # settings for single categories, over everything else: {category: {"method.key": value}}
    per_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    out: str | None = None
    device: str = "auto"
    workers: int | None = None
    threads: int | None = None
    executor: str = "local"
    ray_address: str | None = None
    gpus_per_cell: float | None = None  # None: one GPU where the cluster has GPUs, else none
    cpus_per_cell: float = 1.0
    retries: int = 1
    preset: str | None = None
    eval_every: int = 0  # evaluate on the test set every K epochs during training; 0: never
    fpr_limit: float = 0.3  # the FPR up to which every AUPRO column integrates
    bootstrap: int = 1000  # resamples of each metric's confidence interval; 0: no intervals
    profile: bool = True  # FLOPs, latency and throughput after each cell's test
    profile_repeats: int = 20
    profile_warmup: int = 2
    throughput_batch: int = 32

    def validate(self) -> None:
        from bench.extractor import WEIGHT_POLICIES
        from bench.methods.base import REFERENCES
        from bench.registry import DATASETS, METHODS

        if self.reference not in REFERENCES:
            raise BenchError(
                f"--reference {self.reference}: expected one of {', '.join(REFERENCES)}"
            )
        if self.weights not in WEIGHT_POLICIES and not Path(self.weights).expanduser().exists():
            raise BenchError(
                f"--weights {self.weights}: expected {', '.join(WEIGHT_POLICIES)} or a checkpoint file"
            )
        for name in self.methods:
            METHODS.entry(name)
        DATASETS.entry(self.dataset)
        if self.setting not in TRAINING_SETTINGS:
            raise BenchError(f"--setting {self.setting}: expected {' or '.join(TRAINING_SETTINGS)}")
        if not self.seeds:
            raise BenchError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
        if not 0 < self.fpr_limit <= 1:
            raise BenchError(f"--fpr-limit {self.fpr_limit}: give a false-positive rate in (0, 1]")
        if self.bootstrap < 0:
            raise BenchError(f"--bootstrap {self.bootstrap}: give 0 (no intervals) or more")
        if self.eval_every < 0:
            raise BenchError(f"--eval-every {self.eval_every}: give 0 (off) or a positive K")
        if self.epochs is not None and self.epochs <= 0:
            raise BenchError(f"--epochs {self.epochs}: must be positive")
        self._validate_resources()
        for category, pairs in self.per_category.items():
            if not isinstance(pairs, dict):
                raise BenchError(
                    f"per_category.{category}: expected a mapping of method.setting: value, "
                    "e.g. {cflow.input_size: 128}"
                )
        self.profile_settings()
        self._validate_executor()

    def _validate_resources(self) -> None:
        """Input size, backbones, threads and workers: checked before a run folder exists."""
        from bench.extractor import backbone_spec

        size = self.input_size
        if size is not None and not MIN_INPUT_SIZE <= size <= MAX_INPUT_SIZE:
            raise BenchError(
                f"--input-size {size}: give {MIN_INPUT_SIZE} (the backbones' coarsest stride) "
                f"to {MAX_INPUT_SIZE} pixels, or omit it for each method's reference size"
            )
        for name in self.backbones:
            try:
                backbone_spec(name)
            except BenchError as exc:
                raise BenchError(f"--backbones {name}: {exc}") from exc
        if self.threads is not None and self.threads < 1:
            raise BenchError(
                f"--threads {self.threads}: give 1 or more, or omit the option for torch's default"
            )
        if self.workers is not None and self.workers < 0:
            raise BenchError(
                f"--workers {self.workers}: give 0 (load images in the main process) or more"
            )

    def profile_settings(self) -> ProfileSettings | None:
        """How each cell is profiled; None when profiling is off."""
        from bench.profiling import ProfileSettings

        settings = ProfileSettings(self.profile_repeats, self.profile_warmup, self.throughput_batch)
        return settings if self.profile else None

    def _validate_executor(self) -> None:
        if self.executor not in EXECUTORS:
            raise BenchError(f"--executor {self.executor}: expected one of {', '.join(EXECUTORS)}")
        if self.executor != "ray" and self.ray_address:
            raise BenchError(f"--ray-address {self.ray_address}: add --executor ray to use it")
        if self.cpus_per_cell <= 0:
            raise BenchError(f"--cpus-per-cell {self.cpus_per_cell}: must be positive")
        if self.gpus_per_cell is not None and self.gpus_per_cell < 0:
            raise BenchError(f"--gpus-per-cell {self.gpus_per_cell}: must be 0 or more")
        if self.retries < 0:
            raise BenchError(f"--retries {self.retries}: must be 0 or more")
        if self.executor == "ray" and self.device.startswith("cuda:"):
            raise BenchError(
                f"--device {self.device}: with --executor ray use --device cuda; Ray assigns each cell its GPU"
            )
        if self.executor == "ray" and self.device == "cuda" and self.gpus_per_cell == 0:
            raise BenchError("--device cuda with --gpus-per-cell 0: a cell would see no GPU")


def _preset_text(name: str) -> str:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise BenchError(f"--preset {name}: file not found")
        return path.read_text()
    packaged = resources.files("bench") / "presets" / f"{name}.yaml"
    if not packaged.is_file():
        known = sorted(p.name[:-5] for p in (resources.files("bench") / "presets").iterdir())
        raise BenchError(f"--preset {name}: unknown preset; built in: {', '.join(known)}")
    return packaged.read_text()


def load_preset(name: str) -> dict[str, Any]:
    """A preset is a YAML mapping with RunConfig field names as keys."""
    try:
        data = yaml.safe_load(_preset_text(name)) or {}
    except yaml.YAMLError as exc:
        raise BenchError(f"--preset {name}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise BenchError(f"--preset {name}: expected a mapping of option: value")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BenchError(
            f"--preset {name}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return data


def scoped(pairs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"method.key": value}`` as ``{method: {key: value}}``; a bare key applies to every
    method ("*")."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in pairs.items():
        method, _, key = str(name).rpartition(".")
        out.setdefault(method or "*", {})[key] = value
    return out


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """``method.key=value`` pairs; a bare ``key=value`` applies to every method ("*")."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise BenchError(f"--set {item}: expected method.key=value, e.g. fastflow.epochs=10")
        lhs, value = item.split("=", 1)
        method, _, key = lhs.rpartition(".")
        out.setdefault(method or "*", {})[key] = value
    return out
