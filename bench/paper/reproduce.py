"""``bench paper TABLE``: run the grids a paper table needs (or read a finished run) and fill
the table with ours beside the published numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.paper.filled import FilledTable, fill_table
from bench.paper.grids import check_backbones, check_weights, grid_configs
from bench.paper.published import load_table
from bench.runner.config import RunConfig, parse_set
from bench.runner.run import resolve_categories, run_grid
from bench.runner.store import read_store

# What still applies to a finished run read with --from: which rows the table shows.
_VIEW_OPTIONS = ("backbones", "reference")


@dataclass
class Reproduction:
    folder: Path
    rows: list[dict[str, Any]]
    filled: FilledTable
    failures: list[tuple[str, str]] = field(default_factory=list)


def paper_folder(name: str, out: str | None) -> Path:
    """Where ``bench paper NAME`` runs its grids: ``--out``, else ``results/paper-NAME``."""
    return Path(out or Path("results") / f"paper-{name}")


def check_grids(configs: list[RunConfig]) -> None:
    """Every grid's options and data layout, checked before any of them runs a cell, as
    ``bench run`` checks its one grid."""
    for config in configs:
        config.validate()
        resolve_categories(config)


def reproduce(
    name: str,
    options: dict[str, Any],
    *,
    source: str | None = None,
    allow_random_weights: bool = False,
    command: str = "bench paper",
    debug: bool = False,
) -> Reproduction:
    """Run (or, with ``source``, read) the rows of table ``name`` and fill it.

    ``options`` are the run options given (dest -> value); with ``source`` only the
    backbone and reference choices apply, since the run is already finished.
    """
    table = load_table(name)
    backbones = options.get("backbones")
    substitute = check_backbones(table, backbones)
    if source:
        stray = [key for key in options if key not in _VIEW_OPTIONS]
        if stray:
            flags = ", ".join(f"--{key.replace('_', '-')}" for key in stray)
            raise BenchError(f"{flags}: --from reads a finished run; run flags do not apply")
        folder = Path(source)
        rows, _ = read_store(folder)
        return Reproduction(
            folder, rows, fill_table(table, rows, options.get("reference"), substitute)
        )
    folder = paper_folder(table.name, options.get("out"))
    overrides = {key: value for key, value in options.items() if key not in ("out", "force")}
    overrides["backbones"] = backbones
    if "set_items" in overrides:
        overrides["set"] = parse_set(overrides.pop("set_items"))
    configs = grid_configs(table, overrides, folder)
    for config in configs:
        check_weights(config.weights, allow_random_weights)
    check_grids(configs)
    rows: list[dict[str, Any]] = []
    failures: list[tuple[str, str]] = []
    for config in configs:
        summary = run_grid(config, command, force=bool(options.get("force")), debug=debug)
        rows += summary.rows
        failures += summary.failures
    filled = fill_table(table, rows, options.get("reference"), substitute)
    return Reproduction(folder, rows, filled, failures)
