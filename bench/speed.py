"""``bench speed``: the complexity table of methods x backbones, with no dataset.

Each (method, backbone) is built with exactly the settings ``bench run`` would give its
cells (``resolve_settings``), then profiled on random input of the model's input size.
Nothing is trained: flows run their real computation untrained, and a method whose
prediction reads fitted statistics gets stand-in ones of the right shape from
``Method.init_untrained`` (PaDiM: zero means and identity inverse covariances at every
position). The profile times ``predict_batch``; CFLOW-AD's ``original`` reference
normalises over the whole test set in ``predict``, which adds a second pass of its cheap
exp-and-upsample scoring that these figures leave out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.cell import Environment, build_method
from bench.config import Cell, RunConfig, check_set_scopes, resolve_settings
from bench.errors import BenchError
from bench.profiling import PeakMemory, ProfileSettings, profile_inference

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
    ("peak MB", ("peak_memory_mb",), "{:.0f}"),
]
SCALE = {"params_head": 1e-6, "params_backbone": 1e-6, "flops_head": 1e-9, "flops_backbone": 1e-9}


def speed_rows(
    config: RunConfig, settings: ProfileSettings, device: str
) -> Iterator[dict[str, Any]]:
    """One profiled row per (backbone, method), in the order ``bench run`` expands them."""
    check_set_scopes(config)
    env = Environment(data_root=None, device=device, progress=False)
    for backbone in config.backbones:
        for name in config.methods:
            base, method_settings = resolve_settings(name, backbone, config)
            cell = Cell(
                method=name,
                base=base,
                dataset="none",
                category="none",
                backbone=backbone,
                seed=config.seeds[0],
                reference=config.reference,
                weights=config.weights,
                settings=dataclasses.asdict(method_settings),
            )
            try:
                yield _profile_row(cell, env, settings, device)
            except Exception as exc:  # one method that cannot run must not hide the others
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                yield {**_identity(cell), "error": reason}


def _identity(cell: Cell) -> dict[str, Any]:
    return {
        "method": cell.method,
        "base_method": cell.base,
        "backbone": cell.backbone,
        "reference": cell.reference,
    }


def _profile_row(
    cell: Cell, env: Environment, settings: ProfileSettings, device: str
) -> dict[str, Any]:
    peak = PeakMemory(torch.device(device))
    method, extractor, pre = build_method(cell, env)
    method.init_untrained()
    profile = profile_inference(method, extractor, settings)
    height, width = extractor.input_size
    return {
        **_identity(cell),
        "weights": extractor.weights.describe(),
        "pretrained": extractor.weights.pretrained,
        "input": pre.describe(),
        "model_input": f"{height}x{width}",
        **profile,
        **peak.read(),
        "device": device,
        "threads": torch.get_num_threads(),
        "settings": cell.settings,
    }


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
        f"p95 of {settings.repeats} calls after {settings.warmup} warm-up. Throughput at "
        f"batch {settings.throughput_batch}: median of {settings.throughput_repeats} calls. "
        "head = predict_batch on precomputed features (the additional cost); e2e = image "
        "tensor to anomaly map; bb = backbone. FLOPs count convolutions and matrix products "
        f"only (2 per multiply-add). Peak memory: {first['peak_memory_kind']}."
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
