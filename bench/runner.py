"""Grid -> cells -> executor -> results store, and the run folder around them."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench import examples
from bench.cell import Environment, default_workers, resolve_device
from bench.config import Cell, RunConfig, expand_cells
from bench.errors import BenchError
from bench.executors import make_executor
from bench.registry import DATASETS
from bench.run_report import write_report
from bench.store import ResultStore

PACKAGES = ("flowad-bench", "torch", "torchvision", "timm", "FrEIA", "numpy", "scikit-learn")


@dataclass
class RunSummary:
    folder: Path
    cells: int
    skipped: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    tables: str = ""


def resolve_categories(config: RunConfig) -> list[str]:
    dataset = DATASETS.get(config.dataset)(Path(config.data_root) if config.data_root else None)
    if config.categories in (["all"], []):
        return list(dataset.available_categories())
    for category in config.categories:
        dataset.check_category(category)
    return list(config.categories)


def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _hardware(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_run_json(folder: Path, config: RunConfig, argv: list[str], device: str) -> None:
    """Append this invocation to run.json: command, versions, git revision, hardware."""
    path = folder / "run.json"
    history = json.loads(path.read_text()).get("invocations", []) if path.is_file() else []
    history.append(
        {
            "command": " ".join(["bench", *argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": asdict(config),
            "versions": _versions(),
            "git_revision": _git_revision(),
            "hardware": _hardware(device),
        }
    )
    latest = dict(history[-1])
    latest["invocations"] = history
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(latest, indent=2, default=str))
    tmp.replace(path)


def group_identical(cells: list[Cell]) -> dict[str, list[Cell]]:
    """First cell of each computation -> every cell it answers for (itself first).

    A variant whose settings equal its base's for this backbone and reference computes the
    same thing; it runs once and each name gets its own row.
    """
    first: dict[str, Cell] = {}
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        head = first.setdefault(cell.work_key, cell)
        groups.setdefault(head.key, []).append(cell)
    return groups


def run_grid(
    config: RunConfig, argv: list[str], force: bool = False, debug: bool = False
) -> RunSummary:
    """Run every cell not already in the store; each row is stored the moment it exists."""
    config.validate()
    executor = make_executor(config, debug)
    # Ray workers resolve the device themselves: the driver may have no GPU while they do.
    device = config.device if config.executor == "ray" else resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    categories = resolve_categories(config)
    cells = expand_cells(config, categories)
    folder = Path(config.out or "results/default")
    store = ResultStore(folder)
    write_run_json(folder, config, argv, device)
    todo: list[Cell] = [c for c in cells if force or store.status(c.key) != "done"]
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

    def on_result(cell: Cell, row: dict[str, Any]) -> None:
        examples.save(
            folder, [t.key for t in twins[cell.key]], row.pop(examples.EXAMPLES_KEY, None)
        )
        for twin in twins[cell.key]:
            store.put_result(twin, {**row, "method": twin.method, "cell_key": twin.key})

    def on_failure(cell: Cell, error: str) -> None:
        for twin in twins[cell.key]:
            store.put_failure(twin, error)
            failures.append((twin.label(), error))
            tqdm.write(f"FAILED {twin.label()}: {error.splitlines()[0]}")

    try:
        representatives = [c for c in todo if c.key in twins]
        executor.execute(representatives, env, on_result, on_failure)
    finally:
        rows = [r for r in store.rows() if r["cell_key"] in {c.key for c in cells}]
        store.close()
    tables = write_report(folder, rows, failures) if rows else ""
    if not cells:
        raise BenchError("the grid is empty: no methods or categories selected")
    return RunSummary(folder, len(cells), skipped, failures, tables)
