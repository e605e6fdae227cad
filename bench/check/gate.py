"""``bench check``: a regression gate comparing a run's metrics with a committed baseline.

A baseline file records the grid it was made from (so ``bench check --baseline FILE`` alone
knows what to run), a tolerance per metric, and every cell's metrics. Cells are matched by
their identity, never by row order; a cell missing on either side fails the check, because
a gate that passes when a method silently stops producing rows is no gate.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.check.baseline import (
    DEFAULT_THREADS,
    DEFAULT_TOLERANCES,
    METRICS,
    Baseline,
    baseline_cells,
    baseline_config,
    check_tolerances,
    identity_key,
    load_baseline,
    save_baseline,
)
from bench.errors import BenchError, one_line
from bench.runner.config import RunConfig
from bench.runner.options import build_config
from bench.runner.provenance import read_run_json
from bench.runner.run import resolve_categories, run_grid
from bench.runner.store import read_store


def cell_label(cell: dict[str, Any]) -> str:
    reference = "" if cell["reference"] == "original" else f"/{cell['reference']}"
    return (
        f"{cell['method']}/{cell['dataset']}/{cell['category']}/{cell['backbone']}"
        f"/seed{cell['seed']}{reference}"
    )


def _differences(base: dict[str, Any], run: dict[str, Any]) -> str:
    """What separates two cells that share a label: the settings or weights that changed."""
    changed = [
        f"{key} {base['settings'].get(key)!r} -> {run['settings'].get(key)!r}"
        for key in sorted(set(base["settings"]) | set(run["settings"]))
        if base["settings"].get(key) != run["settings"].get(key)
    ]
    if base["weights_id"] != run["weights_id"]:
        changed.append(f"weights {base['weights_id']} -> {run['weights_id']}")
    return ", ".join(changed)


@dataclass
class MetricCheck:
    """One metric of one cell, baseline against now."""

    cell: str
    metric: str
    baseline: float | None
    now: float | None
    tolerance: float

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.now is None:
            return None
        return self.now - self.baseline

    @property
    def status(self) -> str:
        """ok | regression | improvement | absent (a metric on one side only, or NaN)."""
        if self.baseline is None and self.now is None:
            return "ok"
        delta = self.delta
        if delta is None or math.isnan(delta):
            return "absent"
        if delta < -self.tolerance:
            return "regression"
        return "improvement" if delta > self.tolerance else "ok"


@dataclass
class CheckResult:
    comparisons: list[MetricCheck]
    missing_in_run: list[str]
    missing_in_baseline: list[str]
    changed: list[str]
    failed_cells: list[tuple[str, str]] = field(default_factory=list)

    def of(self, status: str) -> list[MetricCheck]:
        return [c for c in self.comparisons if c.status == status]

    @property
    def passed(self) -> bool:
        return not (
            self.of("regression")
            or self.of("absent")
            or self.missing_in_run
            or self.missing_in_baseline
            or self.changed
            or self.failed_cells
        )


def check_rows(
    baseline: Baseline, rows: list[dict[str, Any]], tolerance: float | None = None
) -> CheckResult:
    """Every metric of every baseline cell against the run's row for the same cell.

    ``tolerance`` replaces every per-metric tolerance of the baseline when given.
    """
    base = {identity_key(c): c for c in baseline.cells}
    now = {identity_key(r): r for r in rows}
    comparisons = [
        MetricCheck(
            cell_label(cell),
            metric,
            cell["metrics"].get(metric),
            now[key].get(metric),
            baseline.tolerance(metric) if tolerance is None else tolerance,
        )
        for key, cell in base.items()
        if key in now
        for metric in METRICS
    ]
    base_only = {cell_label(c): c for k, c in base.items() if k not in now}
    run_only = {cell_label(r): r for k, r in now.items() if k not in base}
    changed = [
        f"{label}: settings changed (baseline -> run: {_differences(base_only[label], run)})"
        for label, run in run_only.items()
        if label in base_only
    ]
    return CheckResult(
        comparisons,
        [
            f"{label}: in the baseline, not in the run"
            for label in base_only
            if label not in run_only
        ],
        [
            f"{label}: in the run, not in the baseline"
            for label in run_only
            if label not in base_only
        ],
        changed,
    )


# --------------------------------------------------------------------------- output


def _number(value: float | None) -> str:
    return "absent" if value is None else f"{value:.4f}"


def _table(comparisons: list[MetricCheck]) -> list[str]:
    header = ("cell", "metric", "baseline", "now", "delta", "tolerance")
    body = [
        (
            c.cell,
            c.metric,
            _number(c.baseline),
            _number(c.now),
            "" if c.delta is None else f"{c.delta:+.4f}",
            f"{c.tolerance:.4f}",
        )
        for c in comparisons
    ]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        text = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        text += [value.rjust(width) for value, width in zip(row[2:], widths[2:], strict=True)]
        return "  " + "  ".join(text)

    return [line(row) for row in (header, *body)]


def format_result(result: CheckResult, baseline_path: Path) -> str:
    """The readable verdict: what failed and why, what improved, then one summary line."""
    lines: list[str] = []
    sections = (
        ("regression", "REGRESSIONS: dropped by more than the tolerance"),
        ("absent", "ABSENT: a metric missing on one side, or NaN"),
        ("improvement", "IMPROVEMENTS beyond the tolerance (the check still passes)"),
    )
    for status, title in sections:
        found = result.of(status)
        if found:
            lines += [f"{title} ({len(found)}):", *_table(found), ""]
    for title, items in (
        ("CELLS MISSING", result.missing_in_run + result.missing_in_baseline),
        ("CELLS WHOSE SETTINGS CHANGED", result.changed),
        (
            "CELLS THAT FAILED in the run",
            [f"{a}: {one_line(e)}" for a, e in result.failed_cells],
        ),
    ):
        if items:
            lines += [f"{title} ({len(items)}):", *(f"  {item}" for item in items), ""]
    cells = len({c.cell for c in result.comparisons})
    compared = [c for c in result.comparisons if c.delta is not None]
    worst = min(compared, key=lambda c: c.delta, default=None)
    largest = ""
    if worst is not None and worst.delta < 0:
        size = f"{worst.delta:+.4f}" if worst.delta <= -5e-5 else f"{worst.delta:+.1e}"
        largest = f"; largest drop {size} ({worst.cell} {worst.metric})"
    elif worst is not None:
        largest = "; no metric dropped"
    if result.passed:
        lines.append(f"PASS: {len(compared)} metrics of {cells} cells within tolerance{largest}")
    else:
        lines.append(
            f"FAIL: {baseline_path} (compared {len(compared)} metrics of {cells} cells{largest})"
        )
    if result.of("improvement") or result.of("regression") or result.changed:
        lines.append(
            f"if the change is intended, record it: bench check --baseline {baseline_path} --update"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count, restored afterwards.

    Seeds need nothing here: every cell seeds Python, NumPy and torch from its own seed.
    """
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def made_with(folder: Path) -> dict[str, Any]:
    """Provenance of the run a baseline comes from, taken from the folder's run.json."""
    latest = read_run_json(folder)
    if latest is None:
        return {}
    keys = ("command", "started", "git_revision", "versions", "hardware")
    return {k: latest.get(k) for k in keys}


def _machine(info: dict[str, Any]) -> str:
    versions = info.get("versions") or {}
    hardware = info.get("hardware") or {}
    return (
        f"torch {versions.get('torch')} on {hardware.get('processor')} ({hardware.get('platform')})"
    )


def run_checked_grid(
    config: RunConfig, command: str, debug: bool
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Recompute every cell of the grid (never reuse stored rows: they may predate the code
    under test), deterministically, and return this grid's rows and failures. No report is
    written: the verdict is the output."""
    with deterministic(config.threads or DEFAULT_THREADS):
        summary = run_grid(config, command, force=True, debug=debug)
    return summary.rows, summary.failures


def default_out(baseline_path: Path) -> str:
    return str(Path("results") / "check" / baseline_path.stem)


def execute(
    baseline_path: Path,
    *,
    run: str | None,
    out: str | None,
    tolerance: float | None,
    update: bool,
    new_options: dict[str, Any],
    command: str,
    debug: bool = False,
) -> int:
    """``bench check``: 0 when every metric holds, 1 when the gate fails.

    ``new_options`` (the run options given) describe the grid of a baseline that does not
    exist yet (``--update`` only).
    """
    if tolerance is not None:
        check_tolerances({"default": tolerance}, "--tolerance")
    baseline = None if update and not baseline_path.exists() else load_baseline(baseline_path)
    if run is not None:
        if baseline is None:
            raise BenchError(
                f"--run: {baseline_path} does not exist yet, and a new baseline records the grid "
                "that made it; create it without --run (bench check --baseline FILE --update "
                "plus the grid flags of `bench run`)"
            )
        folder = Path(run)
        rows, failures = read_store(folder)
        recorded = baseline.config
    else:
        if baseline is None:
            config = build_config(new_options)
            recorded = baseline_config(config, resolve_categories(config))
        else:
            recorded = baseline.config
        folder = Path(out or default_out(baseline_path))
        config = Baseline(recorded, {}, []).run_config(str(folder))
        print(
            f"check: {', '.join(config.methods)} on {config.dataset} "
            f"({', '.join(config.categories)}), {config.threads} threads, deterministic "
            f"algorithms -> {folder}",
            file=sys.stderr,
        )
        rows, failures = run_checked_grid(config, command, debug)
    code = 0
    if baseline is not None:
        now = made_with(folder)
        if baseline.made_with and now and _machine(baseline.made_with) != _machine(now):
            print(
                f"note: baseline made with {_machine(baseline.made_with)}; this run: "
                f"{_machine(now)}. Metrics are bit-identical only on the same machine and "
                "versions; elsewhere the tolerances absorb the difference.",
                file=sys.stderr,
            )
        result = check_rows(baseline, rows, tolerance)
        result.failed_cells = failures
        print(format_result(result, baseline_path))
        code = 0 if result.passed else 1
    if not update:
        return code
    if failures:
        label, error = failures[0]
        raise BenchError(
            f"--update: {len(failures)} cells failed (first: {label}: {one_line(error)}); "
            "a baseline needs every cell"
        )
    if tolerance is not None:
        tolerances = {"default": tolerance}
    else:
        tolerances = baseline.tolerances if baseline else dict(DEFAULT_TOLERANCES)
    save_baseline(
        baseline_path, Baseline(recorded, tolerances, baseline_cells(rows), made_with(folder))
    )
    print(f"wrote {baseline_path}: {len(rows)} cells", file=sys.stderr)
    return 0
