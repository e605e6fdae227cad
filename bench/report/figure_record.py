"""Which figures a run folder holds, and what they were drawn from.

Drawing takes about a second (importing matplotlib, rendering, writing PNGs), most of what
``bench report`` costs on a small run. A figure depends only on the result rows, the saved
examples, the drawing code and matplotlib's version, so a key over those is written beside
the figures; while it matches and every file is in place, the figures are reused as drawn.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any

from bench.runner import examples
from bench.runner.catalog import file_stamp

FOLDER = "figures"
RECORD = "drawn.json"


@dataclass(frozen=True)
class Figure:
    title: str
    path: Path | None  # None when skipped
    note: str = ""


def inputs_key(folder: Path, rows: list[dict[str, Any]]) -> str:
    """A digest of everything the figures show or are drawn with."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode())
    for path in sorted((Path(folder) / examples.FOLDER).glob("*.npz")):
        digest.update(file_stamp(path).encode())
    drawing_code = util.find_spec("bench.report.figures")
    if drawing_code is not None and drawing_code.origin:
        digest.update(Path(drawing_code.origin).read_bytes())
    digest.update(metadata.version("matplotlib").encode())
    return digest.hexdigest()


def reusable(folder: Path, key: str) -> list[Figure] | None:
    """The figures drawn under ``key``, or None when any input or file changed."""
    record = Path(folder) / FOLDER / RECORD
    try:
        stored = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    figures = [
        Figure(f["title"], None if f["path"] is None else Path(folder) / f["path"], f["note"])
        for f in stored.get("figures", [])
    ]
    if any(f.path is not None and not f.path.is_file() for f in figures):
        return None
    return figures


def remember(folder: Path, key: str, figures: list[Figure]) -> None:
    """Write the record last, after every figure it names is on disk."""
    entries = []
    for figure in figures:
        entry = asdict(figure)
        if figure.path is not None:
            entry["path"] = figure.path.relative_to(folder).as_posix()
        entries.append(entry)
    record = Path(folder) / FOLDER / RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "figures": entries}, indent=1))
    tmp.replace(record)
