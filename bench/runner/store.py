"""Durable, resumable results: one SQLite row per finished (or failed) cell.

Each row is committed the moment its cell ends, with a full fsync, so a crash or Ctrl-C
never loses finished work, and rerunning the same command skips what is done.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import BenchError

if TYPE_CHECKING:  # readers of a run folder (report, compare) import no torch
    from bench.runner.cell import Cell

STORE_NAME = "results.sqlite"
EVIDENCE_FOLDER = "evidence"  # per cell: what its confidence intervals and paired tests resample

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    label TEXT NOT NULL,
    cell TEXT NOT NULL,
    row TEXT,
    error TEXT,
    finished REAL NOT NULL
)
"""


class ResultStore:
    """The run folder's results database; the driver process is its only writer."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / STORE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise BenchError(f"{self.path}: not a usable results store ({exc})") from exc

    @classmethod
    def open_existing(cls, folder: Path) -> ResultStore:
        if not (Path(folder) / STORE_NAME).is_file():
            raise BenchError(f"{folder}: no {STORE_NAME} here; is it a run folder of `bench run`?")
        return cls(folder)

    def status(self, key: str) -> str | None:
        found = self._db.execute("SELECT status FROM cells WHERE key = ?", (key,)).fetchone()
        return found[0] if found else None

    def row(self, key: str) -> dict[str, Any] | None:
        """The finished row of a cell, if it has one."""
        found = self._db.execute(
            "SELECT row FROM cells WHERE key = ? AND status = 'done'", (key,)
        ).fetchone()
        return json.loads(found[0]) if found else None

    def _put(self, cell: Cell, status: str, row: dict | None, error: str | None) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    cell.key,
                    status,
                    cell.label(),
                    json.dumps(cell.__dict__, default=str),
                    json.dumps(row, default=_jsonable) if row is not None else None,
                    error,
                    time.time(),
                ),
            )

    def put_result(self, cell: Cell, row: dict[str, Any]) -> None:
        self._put(cell, "done", row, None)

    def put_failure(self, cell: Cell, error: str) -> None:
        self._put(cell, "failed", None, error)

    def rows(self) -> list[dict[str, Any]]:
        """Finished rows in insertion order."""
        cursor = self._db.execute("SELECT row FROM cells WHERE status = 'done' ORDER BY rowid")
        return [json.loads(r[0]) for r in cursor]

    def failures(self) -> list[tuple[str, str]]:
        cursor = self._db.execute("SELECT label, error FROM cells WHERE status = 'failed'")
        return list(cursor)

    def close(self) -> None:
        self._db.close()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a result row")


def read_store(folder: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Finished rows and failed cells of a run folder; an empty store is an error."""
    store = ResultStore.open_existing(folder)
    try:
        rows, failures = store.rows(), store.failures()
    finally:
        store.close()
    if not rows:
        raise BenchError(f"{folder}: the store holds no finished cells yet")
    return rows, failures
