"""flowad-bench: train and evaluate flow-based anomaly detectors under one protocol.

``bench.run(...)`` is the Python API, the same one ``bench run`` calls: it takes the
command line's options as keywords and returns the results as a DataFrame with the run
folder. Importing ``bench`` is cheap; torch and the plugins load on the first run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__version__ = "0.1.0"


@dataclass
class RunResult:
    """What a run left: one DataFrame row per finished cell (the columns of results.csv),
    the run folder, the failed cells and the result tables as markdown."""

    results: pd.DataFrame
    folder: Path
    cells: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    tables: str = ""


def run(
    *,
    command: str | None = None,
    debug: bool = False,
    announce: bool = False,
    **options: Any,
) -> RunResult:
    """Run a grid and write its run folder (store, results.csv, tables, figures, report.md).

    The folder's files cover every finished cell in it, earlier runs' too; the returned
    ``results`` are this grid's rows.

    Keywords are the options of ``bench run`` with underscores (``methods``, ``dataset``,
    ``data_root``, ``categories``, ``backbones``, ``seeds``, ``epochs``, ``out``...; lists
    may be given as "a,b" strings); ``set={"fastflow": {"epochs": 3}}`` overrides method
    settings. Finished cells in the run folder are reused unless ``force=True``.

    >>> import bench
    >>> result = bench.run(methods="padim", epochs=1, out="results/notebook")  # doctest: +SKIP
    >>> result.results[["method", "category", "image_auroc"]]  # doctest: +SKIP
    """
    from bench.report.markdown import write_report
    from bench.report.tables import check_metrics, results_frame
    from bench.runner.options import RUN, build_config, check_keywords, coerce
    from bench.runner.run import run_grid
    from bench.runner.store import read_store

    check_keywords(options, RUN)
    values = coerce(options)
    if values.get("table_metrics"):
        check_metrics(values["table_metrics"])  # before any cell runs, not after
    config = build_config(values)
    if announce:
        print(
            f"run: methods {','.join(config.methods)} | dataset {config.dataset} | "
            f"backbones {','.join(config.backbones)} | seeds {','.join(map(str, config.seeds))} | "
            f"reference {config.reference} | weights {config.weights}"
            + (f" | preset {config.preset}" if config.preset else "")
            + (" | setting unified" if config.setting == "unified" else ""),
            file=sys.stderr,
        )
    summary = run_grid(
        config,
        command or f"bench.run({', '.join(f'{k}={v!r}' for k, v in options.items())})",
        force=bool(values.get("force")),
        debug=debug,
    )
    tables = ""
    if summary.rows:
        # The folder's files cover every cell its store holds, as `bench report` writes
        # them: a run of some of its methods must not leave a results.csv of those alone.
        rows, failures = read_store(summary.folder)
        tables = write_report(
            summary.folder,
            rows,
            failures,
            metrics=values.get("table_metrics"),
            ci=bool(values.get("ci")),
        )
    return RunResult(
        results_frame(summary.rows),
        summary.folder,
        summary.cells,
        summary.failures,
        tables,
    )
