"""One paper table filled from result rows: every cell prints paper / ours / delta.

Ours is the mean over seeds per category, then over the categories a row stands for. A
mean row of an accuracy metric that lacks some of the paper's categories still shows our
partial mean, marked, with no delta: means over different category sets do not compare.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.paper.published import (
    MARK_LEGEND,
    MARKS,
    METRICS,
    STATUSES,
    Column,
    Number,
    PaperTable,
    Row,
    load_table,
    table_names,
)

MISSING = "–"
PARTIAL = "*"
PAPER_FOLDER = "paper"


@dataclass(frozen=True)
class Entry:
    published: Number | None
    ours: float | None
    have: int  # categories with a value of ours
    want: int  # categories the row stands for
    partial: bool  # an accuracy mean over fewer categories than the paper's

    @property
    def delta(self) -> float | None:
        if self.ours is None or self.published is None or self.partial:
            return None
        return self.ours - self.published.value


@dataclass
class FilledTable:
    table: PaperTable
    reference: str
    substitute: str | None  # our backbone where the paper's single backbone was replaced
    entries: dict[tuple[str, str], Entry]
    rows: list[Row]  # the table's rows, plus categories of ours the paper does not have
    used: list[dict[str, Any]] = field(default_factory=list)

    @property
    def has_ours(self) -> bool:
        return any(e.ours is not None for e in self.entries.values())


def _field(result: dict[str, Any], key: str) -> Any:
    if key.startswith("settings."):
        return (result.get("settings") or {}).get(key.removeprefix("settings."))
    return result.get(key)


def _selector(table: PaperTable, row: Row, column: Column, substitute: str | None) -> dict:
    match = {**row.match, **column.match}
    if substitute and match.get("backbone") == table.backbones[0]:
        match["backbone"] = substitute
    return match


def _ambiguous(table: PaperTable, row: Row, column: Column, group: list[dict]) -> BenchError:
    keys = sorted({k for r in group for k in r if k != "settings"} | {"settings"})
    differ = [k for k in keys if len({repr(r.get(k)) for r in group}) > 1 and k != "cell_key"]
    first = group[0]
    return BenchError(
        f"paper table {table.name}, row '{row.label}', column '{column.label}': "
        f"{len(group)} results for {first['category']} seed {first['seed']} "
        f"(they differ in {', '.join(differ) or 'nothing visible'}); keep one configuration "
        "per run folder, or run the table into its own --out"
    )


def _entry(
    table: PaperTable, row: Row, column: Column, results: list[dict], used: dict[str, dict]
) -> Entry:
    metric = METRICS[column.metric]
    published = table.published(row.id, column.id)
    if not row.ours:
        return Entry(published, None, 0, len(row.categories), False)
    cells: dict[tuple[str, int], list[dict]] = {}
    for result in results:
        if result["category"] in row.categories:
            cells.setdefault((result["category"], result["seed"]), []).append(result)
    per_category: dict[str, list[float]] = {}
    for group in cells.values():
        if len(group) > 1:
            raise _ambiguous(table, row, column, group)
        value = metric.value(group[0])
        if value is not None:
            per_category.setdefault(group[0]["category"], []).append(value)
            used[group[0].get("cell_key") or str(id(group[0]))] = group[0]
    if not per_category:
        return Entry(published, None, 0, len(row.categories), False)
    ours = statistics.fmean(statistics.fmean(v) for v in per_category.values())
    have, want = len(per_category), len(row.categories)
    return Entry(published, ours, have, want, metric.accuracy and have < want)


def fill_table(
    table: PaperTable,
    results: list[dict[str, Any]],
    reference: str | None = None,
    substitute: str | None = None,
) -> FilledTable:
    """Fill ``table`` from result rows of one reference (never a mix of references)."""
    rows = [r for r in results if r.get("dataset") == table.dataset]
    references = sorted({r["reference"] for r in rows})
    if reference is None:
        if len(references) > 1:
            raise BenchError(
                f"paper table {table.name}: the run holds references {', '.join(references)}; "
                "choose one with --reference"
            )
        reference = references[0] if references else table.grids[0].get("reference", "original")
    rows = [r for r in rows if r["reference"] == reference]
    table_rows = table.rows + _extra_categories(table, rows, substitute)
    table_rows.sort(key=lambda row: row.is_mean)
    entries: dict[tuple[str, str], Entry] = {}
    used: dict[str, dict] = {}
    for row in table_rows:
        for column in table.columns:
            match = _selector(table, row, column, substitute)
            matching = [r for r in rows if all(_field(r, k) == v for k, v in match.items())]
            entries[(row.id, column.id)] = _entry(table, row, column, matching, used)
    return FilledTable(table, reference, substitute, entries, table_rows, list(used.values()))


def _extra_categories(table: PaperTable, rows: list[dict], substitute: str | None) -> list[Row]:
    """Rows for categories we ran that a per-category table lacks (custom data, say)."""
    if table.category_match is None:
        return []
    match = dict(table.category_match)
    if substitute and match.get("backbone") == table.backbones[0]:
        match["backbone"] = substitute
    known = {c for row in table.rows for c in row.categories}
    ran = [r["category"] for r in rows if all(_field(r, k) == v for k, v in match.items())]
    return [Row(c, c, table.category_match, (c,)) for c in dict.fromkeys(ran) if c not in known]


def _decimals(table: PaperTable, column: Column) -> int:
    metric = METRICS[column.metric]
    return table.decimals if table.decimals is not None and metric.accuracy else metric.decimals


def _cell(entry: Entry, decimals: int) -> str:
    paper = f"{entry.published.text}{entry.published.mark}" if entry.published else MISSING
    if entry.ours is None:
        ours = MISSING
    else:
        ours = f"{entry.ours:.{decimals}f}{PARTIAL if entry.partial else ''}"
    delta = entry.delta
    return f"{paper} / {ours} / {MISSING if delta is None else f'{delta:+.{decimals}f}'}"


def _caption(comparison: FilledTable) -> list[str]:
    table, used = comparison.table, comparison.used
    lines = [f"Published: {table.paper}. Each cell: paper / ours / Δ = ours − paper."]
    if not used:
        lines.append(
            f"Ours: no results in this run for this table "
            f"(dataset {table.dataset}, reference {comparison.reference})."
        )
        return lines
    seeds = sorted({r["seed"] for r in used})
    weights = sorted({str(r.get("weights")) for r in used})
    methods = sorted({r["method"] for r in used})
    inputs = sorted({str(r.get("input")) for r in used})
    lines.append(
        f"Ours: {', '.join(methods)} on {table.dataset}; reference {comparison.reference}; "
        f"weights {', '.join(weights)}; input {'; '.join(inputs)}; "
        f"{'mean over seeds' if len(seeds) > 1 else 'seed'} {', '.join(map(str, seeds))}."
    )
    if not all(r.get("pretrained") for r in used):
        lines.append(
            "**Not comparable with the paper: the backbone weights were not ImageNet "
            f"({', '.join(weights)}).**"
        )
    if comparison.substitute:
        lines.append(
            f"**Ours use backbone {comparison.substitute} where the paper used "
            f"{table.backbones[0]}: not the same model.**"
        )
    return lines


def _footer(comparison: FilledTable) -> list[str]:
    table = comparison.table
    entries = comparison.entries.values()
    lines = []
    for status, mark in MARKS.items():
        if any(e.published and e.published.status == status for e in entries):
            lines.append(f"{mark} {MARK_LEGEND[status]}.")
    partial: dict[str, set[tuple[int, int]]] = {}
    for row in comparison.rows:
        for column in table.columns:
            entry = comparison.entries[(row.id, column.id)]
            if entry.partial:
                partial.setdefault(row.label, set()).add((entry.have, entry.want))
    if partial:
        parts = [
            f"{label} over " + " or ".join(f"{have} of {want}" for have, want in sorted(counts))
            for label, counts in partial.items()
        ]
        lines.append(
            f"{PARTIAL} our mean covers fewer categories than the paper's ({'; '.join(parts)}); "
            "no Δ."
        )
    lines += [f"Note: {note}" for note in table.notes]
    lines += [f"Source {name}: {where}" for name, where in table.sources.items()]
    return lines


def render_markdown(comparison: FilledTable) -> str:
    table = comparison.table
    header = [table.row_header] + [f"{c.label} ({METRICS[c.metric].unit})" for c in table.columns]
    lines = [f"**{table.title}**", "", *_caption(comparison), ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in comparison.rows:
        cells = [
            _cell(comparison.entries[(row.id, c.id)], _decimals(table, c)) for c in table.columns
        ]
        label = f"**{row.label}**" if row.is_mean else row.label
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines.append("")
    lines += [f"- {line}" for line in _footer(comparison)]
    return "\n".join(lines) + "\n"


def render_csv(comparison: FilledTable) -> str:
    """One line per cell, numbers in the paper's unit, for spreadsheets and scripts."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["table", "reference", "row", "column", "metric", "unit", "published", "status"]
        + ["source", "note", "ours", "delta", "categories", "categories_wanted"]
    )
    table = comparison.table
    for row in comparison.rows:
        for column in table.columns:
            e = comparison.entries[(row.id, column.id)]
            p = e.published
            writer.writerow(
                [table.name, comparison.reference, row.id, column.id, column.metric]
                + [METRICS[column.metric].unit, p.text if p else "", p.status if p else ""]
                + [p.source if p else "", p.note if p else ""]
                + ["" if e.ours is None else f"{e.ours:.6g}"]
                + ["" if e.delta is None else f"{e.delta:.6g}", e.have, e.want]
            )
    return out.getvalue()


def write_filled(comparison: FilledTable, folder: Path, suffix: str = "") -> Path:
    """``<run>/paper/<table><suffix>.md`` and ``.csv``; returns the markdown's path."""
    target = Path(folder) / PAPER_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    stem = target / f"{comparison.table.name}{suffix}"
    stem.with_suffix(".csv").write_text(render_csv(comparison))
    path = stem.with_suffix(".md")
    path.write_text(render_markdown(comparison))
    return path


def describe_tables() -> str:
    """``bench paper --list``: name, title, what the grid runs, how sure the numbers are
    (with the legend of the status letters, which the counts use)."""
    legend = ", ".join(
        f"{status} {meaning}" + (f" (marked {MARKS[status]})" if status in MARKS else "")
        for status, meaning in STATUSES.items()
    )
    lines = [f"Published numbers by status: {legend}.", ""]
    for name in table_names():
        table = load_table(name)
        counts = {}
        for number in table.numbers.values():
            counts[number.status] = counts.get(number.status, 0) + 1
        statuses = ", ".join(f"{counts[s]} {s}" for s in "PXSU" if s in counts) or "none found"
        methods = sorted({m for g in table.grids for m in g["methods"]})
        lines.append(f"{name}: {table.title}")
        lines.append(
            f"    runs {', '.join(methods)} on {table.dataset} with "
            f"{', '.join(table.backbones)}; published numbers: {statuses}"
        )
    return "\n".join(lines)
