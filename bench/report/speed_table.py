"""The ``bench speed`` table: columns, caption, and its text, markdown and CSV forms."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.profiling import ProfileSettings

# (header, row key or keys, format): keys joined by " / " print as median / p95.
COLUMNS: list[tuple[str, tuple[str, ...], str]] = [
    ("method", ("method",), "{}"),
    ("backbone", ("backbone",), "{}"),
    ("input", ("model_input",), "{}"),
    ("params head M", ("params_head",), "{:.2f}"),
    ("params bb M", ("params_backbone",), "{:.2f}"),
    ("GFLOPs head", ("flops_head",), "{:.3g}"),
    ("GFLOPs bb", ("flops_backbone",), "{:.3g}"),
    ("head ms med / p95", ("latency_head_ms", "latency_head_ms_p95"), "{:.1f}"),
    ("e2e ms med / p95", ("latency_e2e_ms", "latency_e2e_ms_p95"), "{:.1f}"),
    ("head img/s", ("throughput_head_ips",), "{:.1f}"),
    ("e2e img/s", ("throughput_e2e_ips",), "{:.1f}"),
    ("e2e GFLOP/s", ("achieved_gflops",), "{:.0f}"),
    ("% of peak", ("fraction_of_peak",), "{:.0%}"),
    ("peak MB", ("peak_memory_mb",), "{:.0f}"),
]
SCALE = {"params_head": 1e-6, "params_backbone": 1e-6, "flops_head": 1e-9, "flops_backbone": 1e-9}


def _calls(n: int) -> str:
    return f"{n} call" if n == 1 else f"{n} calls"


def _cell(row: dict[str, Any], keys: tuple[str, ...], fmt: str) -> str:
    values = [row.get(key) for key in keys]
    if any(value is None for value in values):
        return "–"
    return " / ".join(
        fmt.format(value * SCALE.get(key, 1)) for key, value in zip(keys, values, strict=True)
    )


def caption(rows: list[dict[str, Any]], settings: ProfileSettings) -> str:
    done = [row for row in rows if "error" not in row]
    if not done:
        return "no method could be profiled"
    first = done[0]
    weights = ", ".join(sorted({row["weights"] for row in done}))
    return (
        f"device {first['device']}, {first['threads']} threads, {first['dtype']}; "
        f"reference {first['reference']}; weights {weights}. Latency at batch 1: median / "
        f"p95 of {_calls(settings.repeats)} after {settings.warmup} warm-up. Throughput at "
        f"batch {settings.throughput_batch}: median of {_calls(settings.throughput_repeats)}. "
        "head = predict_batch on precomputed features (the additional cost); e2e = image "
        "tensor to anomaly map; bb = backbone. FLOPs count convolutions and matrix products "
        f"only (2 per multiply-add). GFLOP/s: those FLOPs per image times e2e images/s; % of "
        f"peak: against this machine's dense float32 matrix product "
        f"({first.get('peak_gflops') or 0:.0f} GFLOP/s, measured once and cached), so a low "
        f"share means time lost outside the arithmetic. Peak memory: {first['peak_memory_kind']}."
    )


def format_table(rows: list[dict[str, Any]]) -> str:
    """Columns padded to their widest cell, numbers right-aligned."""
    headers = [header for header, _, _ in COLUMNS]
    body = [[_cell(row, keys, fmt) for _, keys, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]
    text_columns = 3

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i < text_columns else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, body)])


def to_markdown(rows: list[dict[str, Any]], settings: ProfileSettings) -> str:
    headers = [header for header, _, _ in COLUMNS]
    lines = [
        f"**Complexity.** {caption(rows, settings)}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, keys, fmt) for _, keys, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def check_out_path(path: Path) -> None:
    if path.suffix not in (".csv", ".md"):
        raise BenchError(f"--out {path}: expected a .csv or .md file name")


def write_table(rows: list[dict[str, Any]], settings: ProfileSettings, path: Path) -> None:
    """CSV holds every raw column (result-row names); markdown the printed table."""
    check_out_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".md":
        path.write_text(to_markdown(rows, settings))
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}
            )
