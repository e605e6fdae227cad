"""Paths read from a dataset's split file (VisA's CSV, Real-IAD's JSON), kept inside its root.

A split file is data, not code: a tampered or foreign one could name ``../../etc/passwd``
or an absolute path. Such an entry is refused before anything touches the file system.
Listing checks that every named file exists; one directory listing per folder answers that
for all the files in it, which keeps listing as cheap per image as walking a folder tree.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.errors import BenchError


def inside(base: Path, value: object, source: str, field: str) -> Path:
    """``base / value`` for a relative path ``value`` that cannot leave ``base``.

    ``source`` names the split file and entry (e.g. ``.../1cls.csv line 12``) for the error.
    Both separators count, and a drive (``C:``) is absolute: Windows-style escapes are
    refused too.
    """
    if not isinstance(value, str) or not value.strip():
        raise BenchError(f"{source}: {field} must be a non-empty relative path, got {value!r}")
    parts = value.replace("\\", "/").split("/")
    if parts[0] == "" or ":" in parts[0] or ".." in parts or "\0" in value:
        raise BenchError(
            f"{source}: {field} '{value}' is absolute or climbs out with '..'; split files may "
            "only name paths inside --data-root, so it is refused"
        )
    return base / value


class ExistingFiles:
    """Answers "does this file exist?" from one listing per folder, remembered."""

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def __contains__(self, path: Path) -> bool:
        folder, name = os.path.split(os.fspath(path))
        names = self._names.get(folder)
        if names is None:
            try:
                names = frozenset(os.listdir(folder))
            except OSError:
                names = frozenset()
            self._names[folder] = names
        # a case-insensitive file system finds names the listing spells differently
        return name in names or path.is_file()
