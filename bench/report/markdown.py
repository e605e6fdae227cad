"""``report.md``: one file that shows a run, rebuilt from the run folder alone.

It holds what ran (from run.json), the result tables, every paper table the run has
numbers for (paper / ours / delta), and the figures; ``bench run`` writes it at the end
and ``bench report RUN`` rebuilds it, with everything it links, from the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.errors import BenchError, one_line
from bench.metrics import METRIC_LABELS
from bench.paper.filled import FilledTable, fill_table, render_markdown, write_filled
from bench.paper.published import load_table, table_names
from bench.report import figure_record
from bench.report.compare import ranks_figure
from bench.report.tables import (
    BEST_EPOCH_CAPTION,
    TABLE_METRICS,
    best_epoch_table,
    results_frame,
    to_markdown,
    write_tables,
)
from bench.runner.provenance import read_run_json
from bench.runner.store import read_store

REPORT = "report.md"


def _written(comparison: FilledTable, folder: Path, suffix: str = "") -> tuple[str, str]:
    path = write_filled(comparison, folder, suffix)
    return f"{path.parent.name}/{path.name}", render_markdown(comparison)


def write_paper_tables(
    folder: Path, rows: list[dict[str, Any]], given: Sequence[FilledTable] = ()
) -> list[tuple[str, str]]:
    """Every paper table this run has numbers for: (file or table name, markdown or error).

    ``given`` are tables already built with options (``bench paper``); they replace the
    default build of the same table.
    """
    written = [_written(c, folder) for c in given]
    datasets = {r.get("dataset") for r in rows}
    for name in table_names():
        table = load_table(name)
        if table.dataset not in datasets or name in {c.table.name for c in given}:
            continue
        references = sorted({r["reference"] for r in rows if r.get("dataset") == table.dataset})
        for reference in references:
            try:
                comparison = fill_table(table, rows, reference)
            except BenchError as exc:
                written.append((name, f"not built: {exc}"))
                continue
            if comparison.has_ours:
                suffix = "" if len(references) == 1 else f"-{reference}"
                written.append(_written(comparison, folder, suffix))
    return written


def _run_lines(folder: Path) -> list[str]:
    info = read_run_json(folder)
    if info is None:
        return ["(no run.json in this folder)"]
    hardware = info.get("hardware", {})
    versions = info.get("versions", {})
    device = hardware.get("gpu") or hardware.get("processor") or "?"
    return [
        f"- command: `{info.get('command', '?')}`",
        f"- started: {info.get('started', '?')}; git revision: {info.get('git_revision') or '?'}",
        f"- device: {hardware.get('device', '?')} ({device}); CPU cores: "
        f"{hardware.get('cpu_count', '?')}; torch threads: {hardware.get('torch_threads', '?')}",
        "- versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in ("torch", "timm")),
    ]


def _best_epoch_lines(rows: list[dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    lines = []
    for metric in metrics:
        table = best_epoch_table(rows, metric)
        if table is not None:
            lines += ["", to_markdown(table, f"{METRIC_LABELS[metric]} (%), best epoch on test")]
    if lines:
        lines = [
            "",
            "## Best epoch on test (optimistic, as in the paper's code)",
            "",
            BEST_EPOCH_CAPTION,
            *lines,
        ]
    return lines


def _rank_lines(folder: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Mean ranks with the Friedman test and the critical-difference diagram (5+ categories)."""
    ranks = ranks_figure(rows, folder / "figures" / "critical_difference.png")
    if ranks is None:
        return []
    order = sorted(zip(ranks.mean_ranks, ranks.methods, strict=True))
    friedman = ranks.friedman
    lines = [
        "## Ranks across categories",
        "",
        f"Image AUROC, {ranks.n_categories} categories; mean rank (1 is best): "
        + ", ".join(f"{m} {r:.2f}" for r, m in order)
        + ".",
        "",
        (
            f"Friedman test p = {friedman.p_value:.3g}; "
            if friedman is not None
            else "Friedman test: not applicable; "
        )
        + f"Nemenyi critical difference {ranks.critical_difference:.2f} at alpha "
        f"{ranks.alpha}: methods joined by a bar are not significantly different.",
        "",
        "![critical-difference diagram](figures/critical_difference.png)",
        "",
    ]
    return lines


def write_report(
    folder: Path,
    rows: list[dict[str, Any]],
    failures: Sequence[tuple[str, str]] = (),
    comparisons: Sequence[FilledTable] = (),
    metrics: Sequence[str] | None = None,
    ci: bool = False,
) -> str:
    """Tables, paper tables, figures and report.md; returns the result tables' markdown.

    ``metrics`` chooses the result tables (default: image AUROC, pixel AUROC, AUPRO);
    ``ci`` shows each single-seed cell's 95% interval beside it."""
    folder = Path(folder)
    metrics = list(metrics or TABLE_METRICS)
    tables = write_tables(results_frame(rows), folder, metrics, ci)
    papers = write_paper_tables(folder, rows, comparisons)
    key = figure_record.inputs_key(folder, rows)
    figures = figure_record.reusable(folder, key)
    if figures is None:
        from bench.report.figures import write_figures  # matplotlib: only when drawing

        figures = write_figures(folder, rows)
        figure_record.remember(folder, key, figures)
    lines = [f"# Run {folder.name}", "", *_run_lines(folder), ""]
    lines.append(f"{len(rows)} cells finished, {len(failures)} failed.")
    lines += [f"- failed: {label}: {one_line(error)}" for label, error in failures]
    lines += ["", "## Results", "", tables]
    lines.append(
        "Also as [LaTeX](tables.tex), [CSV](tables.csv) and every row in [results.csv](results.csv)."
    )
    lines += _best_epoch_lines(rows, metrics)
    lines += ["", "## Published numbers beside ours", ""]
    if not papers:
        datasets = ", ".join(sorted(map(str, {r.get("dataset") for r in rows})))
        lines += [f"No paper table covers this run (datasets: {datasets}).", ""]
    for name, text in papers:
        if text.startswith("not built:"):
            lines += [f"Table {name} {text}", ""]
        else:
            lines += [f"[{name}]({name})", "", text]
    lines += _rank_lines(folder, rows)
    lines += ["## Figures", ""]
    for figure in figures:
        if figure.path is None:
            lines += [f"**{figure.title}**: {figure.note}", ""]
        else:
            link = figure.path.relative_to(folder).as_posix()
            lines += [f"**{figure.title}**", "", f"![{figure.title}]({link})", ""]
    (folder / REPORT).write_text("\n".join(lines).rstrip() + "\n")
    return tables


def rebuild_report(
    folder: Path, metrics: Sequence[str] | None = None, ci: bool = False
) -> tuple[str, list[tuple[str, str]]]:
    """``bench report RUN``: everything rebuilt from the store alone."""
    rows, failures = read_store(folder)
    return write_report(folder, rows, failures, metrics=metrics, ci=ci), failures
