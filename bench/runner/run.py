"""Grid -> cells -> executor -> results store: the one path every run takes.

Nothing here writes tables or reports: callers (the ``bench.run`` API, ``bench paper``)
do that from the rows it returns, and ``bench check`` does not.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from bench.errors import BenchError, failure_text
from bench.registry import DATASETS
from bench.runner import examples
from bench.runner.cell import EVIDENCE_KEY, Cell, Environment, default_workers, resolve_device
from bench.runner.config import EXECUTORS, RunConfig
from bench.runner.executors import Executor, LocalExecutor
from bench.runner.freshness import stale_cells
from bench.runner.grid import expand_cells
from bench.runner.heap import retain_freed_memory
from bench.runner.provenance import write_run_json
from bench.runner.store import EVIDENCE_FOLDER, ResultStore


@dataclass
class RunSummary:
    """What a grid left behind: its folder, this grid's finished rows, and its failures."""

    folder: Path
    cells: int
    skipped: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


class CellLog:
    """Where there is no terminal (CI logs, SLURM, Ray drivers) progress bars are off, so
    each finished cell prints one line with the run's ETA instead."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.stream = stream or sys.stderr
        self.start = time.monotonic()

    def failed(self) -> None:
        self.done += 1

    def finished(self, cell: Cell, row: dict[str, Any]) -> None:
        self.done += 1
        if not self.enabled:
            return
        scores = [
            f"{name.split('_')[0]} {row[name]:.3f}"
            for name in ("image_auroc", "pixel_auroc")
            if row.get(name) is not None
        ]
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        print(
            f"[{self.done}/{self.total}] {cell.method} {cell.category} {cell.backbone} seed "
            f"{cell.seed}: {' '.join(scores) or 'no metrics'}, fit {row['fit_seconds']:.0f} s"
            + (f"; ETA {_duration(eta)}" if self.done < self.total else ""),
            file=self.stream,
            flush=True,
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def make_executor(config: RunConfig, debug: bool = False) -> Executor:
    """The executor a run asks for; Ray is imported only when it is used."""
    if config.executor == "local":
        return LocalExecutor(debug)
    if config.executor == "ray":
        from bench.runner.ray_executor import RayExecutor

        return RayExecutor.from_config(config, debug)
    raise BenchError(f"--executor {config.executor}: expected one of {', '.join(EXECUTORS)}")


def resolve_categories(config: RunConfig) -> list[str]:
    """The grid's categories, each checked against the data root's layout before any cell
    runs (with ``all`` too: a category folder missing part of the layout stops the run)."""
    dataset = DATASETS.get(config.dataset)(Path(config.data_root) if config.data_root else None)
    everything = config.categories in (["all"], [])
    categories = list(dataset.available_categories() if everything else config.categories)
    for category in categories:
        dataset.check_category(category)
    return categories


def group_identical(cells: list[Cell]) -> dict[str, list[Cell]]:
    """First cell of each computation -> every cell it answers for (itself first).

    A variant whose settings equal its base's for this backbone and reference computes the
    same thing; it runs once and each name gets its own row. In the unified setting the
    cells of every category of one model are one computation too.
    """
    first: dict[str, Cell] = {}
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        head = first.setdefault(cell.work_key, cell)
        groups.setdefault(head.key, []).append(cell)
    return groups


def _refuse_stale_rows(
    folder: Path, store: ResultStore, done: list[tuple[Cell, dict[str, Any]]], data_root: str | None
) -> None:
    """Stop before anything runs when a finished cell's row was made with other weights
    or images than this command would use: neither skipping it nor replacing it unasked
    is honest."""
    stale = stale_cells(done, data_root)
    if stale:
        store.close()
        raise BenchError(
            f"{folder}: {len(stale)} finished cell(s) would not be what this command computes; "
            f"{stale[0]}. Run again with --force to recompute them in this folder (their rows "
            "are replaced), or with another --out to keep both"
        )


def run_grid(
    config: RunConfig, command: str, force: bool = False, debug: bool = False
) -> RunSummary:
    """Run every cell not already in the store; each row is stored the moment it exists."""
    config.validate()
    executor = make_executor(config, debug)
    # Ray workers resolve the device themselves: the driver may have no GPU while they do.
    device = config.device if config.executor == "ray" else resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    retain_freed_memory()
    categories = resolve_categories(config)
    cells = expand_cells(config, categories)
    folder = Path(config.out or "results/default")
    store = ResultStore(folder)
    done = [] if force else [(c, row) for c in cells if (row := store.row(c.key)) is not None]
    _refuse_stale_rows(folder, store, done, config.data_root)
    write_run_json(folder, config, command, device)
    finished = {cell.key for cell, _ in done}
    todo: list[Cell] = [c for c in cells if c.key not in finished]
    skipped = len(cells) - len(todo)
    if skipped:
        tqdm.write(f"{skipped} of {len(cells)} cells already done in {folder}; skipping them")
    env = Environment(
        data_root=config.data_root,
        device=device,
        workers=default_workers() if config.workers is None else config.workers,
        progress=sys.stderr.isatty() or os.environ.get("FLOWAD_PROGRESS") == "1",
        spill_dir=str(folder),
        profile=config.profile_settings(),
    )
    failures: list[tuple[str, str]] = []
    twins = group_identical(todo)
    log = CellLog(len(todo), enabled=not env.progress)

    def on_result(cell: Cell, rows: list[dict[str, Any]]) -> None:
        by_category = {row["category"]: row for row in rows}
        for category in dict.fromkeys(t.category for t in twins[cell.key]):
            row = by_category[category]
            answered = [t for t in twins[cell.key] if t.category == category]
            keys = [t.key for t in answered]
            examples.save(folder, keys, row.pop(examples.EXAMPLES_KEY, None))
            evidence = row.pop(EVIDENCE_KEY)
            for key in keys:
                target = folder / EVIDENCE_FOLDER / f"{key}.npz"
                target.parent.mkdir(parents=True, exist_ok=True)
                evidence.save(target)
            for twin in answered:
                store.put_result(twin, {**row, "method": twin.method, "cell_key": twin.key})
                log.finished(twin, row)

    def on_failure(cell: Cell, error: str) -> None:
        for twin in twins[cell.key]:
            store.put_failure(twin, error)
            failures.append((twin.label(), error))
            tqdm.write(f"FAILED {twin.label()}: {failure_text(error, debug)}", file=sys.stderr)
            log.failed()

    try:
        representatives = [c for c in todo if c.key in twins]
        executor.execute(representatives, env, on_result, on_failure)
    finally:
        rows = [r for r in store.rows() if r["cell_key"] in {c.key for c in cells}]
        store.close()
    if not cells:
        raise BenchError("the grid is empty: no methods or categories selected")
    return RunSummary(folder, len(cells), skipped, rows, failures)
