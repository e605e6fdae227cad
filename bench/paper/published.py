"""Published numbers and how result rows map onto each paper table, read from
``bench/paper/tables/``.

Each paper table is two files: ``<name>.yaml`` (title, source list, the grid(s) to run,
how result rows map onto the table's rows and columns) and ``<name>.csv`` (the published
numbers, one per line, each with its status tag and source). A cell the sources do not
give is simply absent from the CSV: it prints as missing, never as a guess.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from bench.errors import BenchError
from bench.metrics import METRICS as ACCURACY
from bench.registry import DATASETS

# libyaml's parser where PyYAML was built with it: every report reads all the tables
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Status tags of every published number: P primary, X cross-checked, S single secondary
# source, U doubtful. S and U are marked wherever a number is printed.
STATUSES = {
    "P": "primary",
    "X": "cross-checked",
    "S": "single secondary source",
    "U": "doubtful",
}
MARKS = {"S": "†", "U": "‡"}
MARK_LEGEND = {
    "S": "single secondary source, not verified against the paper",
    "U": "doubtful: conflicting copies or unclear origin",
}


def _percent(key: str) -> Callable[[dict], float | None]:
    def get(row: dict) -> float | None:
        value = row.get(key)
        return None if value is None else 100.0 * float(value)

    return get


def _params_m(row: dict) -> float | None:
    value = row.get("params_additional") or row.get("params_head", row.get("trainable_params"))
    return None if value is None else float(value) / 1e6


def _fps(row: dict) -> float | None:
    value = row.get("latency_e2e_ms")
    return None if not value else 1000.0 / float(value)


def _scaled(key: str, factor: float) -> Callable[[dict], float | None]:
    def get(row: dict) -> float | None:
        value = row.get(key)
        return None if value is None else float(value) * factor

    return get


@dataclass(frozen=True)
class Metric:
    """How one table quantity is read from a result row, in the unit papers print."""

    label: str
    unit: str
    value: Callable[[dict], float | None]
    accuracy: bool  # a mean needs every category; a cost averages whatever ran
    decimals: int = 1


METRICS: dict[str, Metric] = {
    **{m.name: Metric(m.label, "%", _percent(m.name), True) for m in ACCURACY},
    "params_m": Metric("additional params", "M", _params_m, False, 2),
    "fps": Metric("FPS (1000 / end-to-end latency)", "img/s", _fps, False),
    "latency_e2e_ms": Metric(
        "end-to-end latency, batch 1", "ms", _scaled("latency_e2e_ms", 1.0), False
    ),
    "latency_head_ms": Metric(
        "head latency, batch 1", "ms", _scaled("latency_head_ms", 1.0), False, 2
    ),
    "model_gb": Metric("stored model", "GB", _scaled("model_bytes", 1e-9), False, 2),
    "peak_memory_gb": Metric("peak memory", "GB", _scaled("peak_memory_mb", 1 / 1024), False, 2),
}


@dataclass(frozen=True)
class Number:
    """One published number exactly as its source prints it."""

    text: str
    status: str
    source: str
    note: str = ""

    @property
    def value(self) -> float:
        return float(self.text)

    @property
    def mark(self) -> str:
        return MARKS.get(self.status, "")


@dataclass(frozen=True)
class Column:
    id: str
    label: str
    metric: str
    match: dict[str, Any]


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    match: dict[str, Any]
    categories: tuple[str, ...]  # one category, or those a mean row averages
    ours: bool = True  # False: a published-only row (nothing of ours can match it)
    is_mean: bool = False  # a mean row under per-category rows


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    paper: str
    dataset: str
    grids: list[dict[str, Any]]
    row_header: str
    rows: list[Row]
    columns: list[Column]
    numbers: dict[tuple[str, str], Number]
    sources: dict[str, str]
    notes: list[str]
    decimals: int | None = None
    category_match: dict[str, Any] | None = None  # per-category tables: what every row matches

    @property
    def backbones(self) -> list[str]:
        """Every backbone the table's grids run, in order."""
        return list(dict.fromkeys(b for g in self.grids for b in g.get("backbones", [])))

    def published(self, row: str, column: str) -> Number | None:
        return self.numbers.get((row, column))


def _folder() -> Any:
    return resources.files("bench") / "paper" / "tables"


def table_names() -> list[str]:
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def _merge(name: str, *matches: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for match in matches:
        for key, value in (match or {}).items():
            if key in merged and merged[key] != value:
                raise BenchError(f"bench/paper/tables/{name}.yaml: '{key}' is matched twice")
            merged[key] = value
    return merged


def _rows(name: str, spec: Any, categories: tuple[str, ...]) -> list[Row]:
    """Either a list of aggregate rows, or one row per category plus mean rows."""
    if isinstance(spec, list):
        return [
            Row(
                str(r["id"]),
                str(r.get("label", r["id"])),
                dict(r.get("match") or {}),
                categories,
                bool(r.get("ours", True)),
            )
            for r in spec
        ]
    match = dict(spec.get("match") or {})
    listed = spec.get("categories", "all")
    per_category = categories if listed == "all" else tuple(map(str, listed))
    rows = [Row(c, c, match, (c,)) for c in per_category]
    for label, members in (spec.get("means") or {}).items():
        group = categories if members == "all" else tuple(map(str, members))
        unknown = sorted(set(group) - set(categories))
        if unknown:
            raise BenchError(
                f"bench/paper/tables/{name}.yaml: unknown categories {', '.join(unknown)}"
            )
        rows.append(Row(str(label), str(label), match, group, is_mean=True))
    return rows


def _numbers(name: str, text: str) -> dict[tuple[str, str], Number]:
    numbers = {}
    for line in csv.DictReader(io.StringIO(text)):
        key = (line["row"], line["column"])
        status = line["status"]
        if status not in STATUSES:
            raise BenchError(
                f"bench/paper/tables/{name}.csv: status '{status}' is not one of P, X, S, U"
            )
        try:
            float(line["value"])
        except ValueError as exc:
            raise BenchError(
                f"bench/paper/tables/{name}.csv: value '{line['value']}' of {key} is not a number"
            ) from exc
        numbers[key] = Number(line["value"], status, line["source"], line.get("note") or "")
    return numbers


def load_table(name: str) -> PaperTable:
    """Read and check one table; unknown names list the known ones."""
    folder = _folder()
    spec_file = folder / f"{name}.yaml"
    if not spec_file.is_file():
        raise BenchError(f"unknown paper table '{name}'; known: {', '.join(table_names())}")
    spec = yaml.load(spec_file.read_text(), Loader=_YAML_LOADER)
    csv_file = folder / f"{name}.csv"
    numbers = _numbers(name, csv_file.read_text()) if csv_file.is_file() else {}
    dataset = spec["dataset"]
    categories = tuple(DATASETS.get(dataset).categories)
    grids = [dict(g) for g in spec["grids"]]
    rows = _rows(name, spec["rows"], categories)
    columns = []
    for c in spec["columns"]:
        if c["metric"] not in METRICS:
            raise BenchError(f"bench/paper/tables/{name}.yaml: unknown metric '{c['metric']}'")
        label = c.get("label", METRICS[c["metric"]].label)
        columns.append(Column(str(c["id"]), label, c["metric"], dict(c.get("match") or {})))
    for row in rows:
        for column in columns:
            _merge(name, row.match, column.match)
    known = {(r.id, c.id) for r in rows for c in columns}
    stray = sorted(set(numbers) - known)
    if stray:
        raise BenchError(f"bench/paper/tables/{name}.csv: cells {stray} are not in the table")
    return PaperTable(
        name=name,
        title=spec["title"],
        paper=spec["paper"],
        dataset=dataset,
        grids=grids,
        row_header=spec.get("row_header", "row"),
        rows=rows,
        columns=columns,
        numbers=numbers,
        sources=dict(spec.get("sources") or {}),
        notes=list(spec.get("notes") or []),
        decimals=spec.get("decimals"),
        category_match=None if isinstance(spec["rows"], list) else rows[0].match,
    )
