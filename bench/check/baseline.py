"""The baseline file of ``bench check``: the grid it was made from, a tolerance per
metric, and every cell's metrics, keyed by cell identity (never by row order).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.metrics import METRIC_LABELS
from bench.runner.config import RunConfig

FORMAT = "flowad-bench baseline 1"
DEFAULT_TOLERANCE = 0.02
"""Largest drop (in metric units: 0.02 is 2 percentage points) a metric may show and pass."""
DEFAULT_TOLERANCES = {"default": DEFAULT_TOLERANCE, "image_auroc": 0.04}
"""What a new baseline file gets. Image AUROC moves in steps of 1 / (normal x anomalous test
images), coarse on small test sets, so it gets more room than the pixel metrics."""
DEFAULT_THREADS = 1
"""A check's torch threads unless its baseline says otherwise. One thread gives the same sums
in the same order on any core count, and on a busy shared runner it does not stall on
thread barriers (two threads on a loaded 2-core machine ran the check grid ~8x slower)."""
DEFAULT_WORKERS = 0
METRICS = tuple(METRIC_LABELS)
IDENTITY = ("method", "dataset", "category", "backbone", "seed", "reference", "weights_id")
"""Row fields that, with ``settings``, say which cell a row is; everything else is outcome."""
_RUN_ONLY = ("out", "executor")  # where and how a run went, not what it computed


@dataclass
class Baseline:
    """What a baseline file holds: the grid, the tolerances, one metrics entry per cell."""

    config: dict[str, Any]
    tolerances: dict[str, float]
    cells: list[dict[str, Any]]
    made_with: dict[str, Any] = field(default_factory=dict)

    def run_config(self, out: str) -> RunConfig:
        return RunConfig(**{**self.config, "out": out})

    def tolerance(self, metric: str) -> float:
        return self.tolerances.get(metric, self.tolerances.get("default", DEFAULT_TOLERANCE))


def check_tolerances(tolerances: Any, where: str) -> dict[str, float]:
    if not isinstance(tolerances, dict):
        raise BenchError(f"{where}: 'tolerances' must map a metric name (or 'default') to a number")
    for name, value in tolerances.items():
        if name != "default" and name not in METRICS:
            raise BenchError(
                f"{where}: unknown tolerance '{name}'; known: default, {', '.join(METRICS)}"
            )
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise BenchError(f"{where}: tolerance '{name}' must be a number >= 0, got {value!r}")
    return {k: float(v) for k, v in tolerances.items()}


def load_baseline(path: Path) -> Baseline:
    """Read and validate a baseline file; every problem is one line naming the file."""
    if not path.is_file():
        raise BenchError(
            f"--baseline {path}: no such file; make one with `bench check --baseline {path} "
            "--update` (plus the grid flags of `bench run`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"--baseline {path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BenchError(f"--baseline {path}: not a baseline file (expected format '{FORMAT}')")
    for key, kind in (("config", dict), ("cells", list)):
        if not isinstance(data.get(key), kind):
            raise BenchError(f"--baseline {path}: '{key}' is missing or not a {kind.__name__}")
    for index, cell in enumerate(data["cells"]):
        if not isinstance(cell, dict) or not isinstance(cell.get("metrics"), dict):
            raise BenchError(f"--baseline {path}: cell {index} has no 'metrics' mapping")
        absent = [k for k in (*IDENTITY, "settings") if k not in cell]
        if absent:
            raise BenchError(f"--baseline {path}: cell {index} lacks {', '.join(absent)}")
    known = {f.name for f in dataclasses.fields(RunConfig)} - set(_RUN_ONLY)
    unknown = sorted(set(data["config"]) - known)
    if unknown:
        raise BenchError(
            f"--baseline {path}: unknown 'config' keys {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    tolerances = check_tolerances(data.get("tolerances", {}), f"--baseline {path}")
    return Baseline(data["config"], tolerances, data["cells"], data.get("made_with", {}))


def save_baseline(path: Path, baseline: Baseline) -> None:
    """Write atomically, cells sorted by identity, so a regenerated file diffs cleanly."""
    data = {
        "format": FORMAT,
        "config": baseline.config,
        "tolerances": baseline.tolerances,
        "made_with": baseline.made_with,
        "cells": sorted(baseline.cells, key=identity_key),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def baseline_config(config: RunConfig, categories: list[str]) -> dict[str, Any]:
    """The grid as a baseline records it: explicit categories, fixed threads and workers."""
    recorded = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RUN_ONLY}
    recorded["categories"] = list(categories)
    recorded["threads"] = config.threads or DEFAULT_THREADS
    recorded["workers"] = DEFAULT_WORKERS if config.workers is None else config.workers
    return recorded


def baseline_cells(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **{k: row[k] for k in IDENTITY},
            "settings": row["settings"],
            "metrics": {m: row.get(m) for m in METRICS},
        }
        for row in rows
    ]


def identity_key(cell: dict[str, Any]) -> str:
    """One string per cell identity; settings compared as sorted JSON, so key order is moot."""
    return json.dumps(
        {**{k: cell[k] for k in IDENTITY}, "settings": cell["settings"]}, sort_keys=True
    )
