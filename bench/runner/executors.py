"""Executors run cells and hand each outcome back to the driver, which alone writes the store."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from tqdm.auto import tqdm

from bench.runner.cell import Cell, Environment, describe_failure, run_cell

OnResult = Callable[[Cell, list[dict[str, Any]]], None]  # a cell's rows
OnFailure = Callable[[Cell, str], None]


class Executor(Protocol):
    def execute(
        self, cells: list[Cell], env: Environment, on_result: OnResult, on_failure: OnFailure
    ) -> None: ...


class LocalExecutor:
    """Runs cells one after another in this process (the default)."""

    def __init__(self, debug: bool = False) -> None:
        self.debug = debug

    def execute(
        self, cells: list[Cell], env: Environment, on_result: OnResult, on_failure: OnFailure
    ) -> None:
        bar: Iterable[Cell] = tqdm(cells, desc="cells", unit="cell", disable=not env.progress)
        for cell in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(cell.label())
            try:
                rows = run_cell(cell, env)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one broken cell must not stop the grid
                on_failure(cell, describe_failure(exc, self.debug))
                continue
            on_result(cell, rows)
