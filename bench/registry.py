"""Name -> plugin lookup for methods, datasets and backbones, plus entry-point plugins.

Built-in plugins register themselves with a decorator when their module is imported;
third-party packages expose a module under the ``flowad_bench.plugins`` entry-point group
and register the same way on import.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from bench.errors import BenchError

T = TypeVar("T")

ENTRY_POINT_GROUP = "flowad_bench.plugins"

# Every module in a registry's package is imported, so a new plugin is one file with a
# decorator; shared helpers that register nothing are left to whoever needs them (the image
# pipeline imports torch, which reading a run folder's datasets must not).
_HELPERS = frozenset({"base", "cflow_decoder", "pipeline", "split_file", "uflow_nfa"})


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A named table of plugins; unknown names raise an error listing the known ones."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package  # where the built-in plugins of this kind live
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if name in self._entries and self._entries[name].obj is not obj:
            raise BenchError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = Entry(name, obj, meta)

    def entry(self, name: str) -> Entry[T]:
        load_plugins(self.package)
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise BenchError(f"unknown {self.kind} '{name}'; known: {known}")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def names(self) -> list[str]:
        load_plugins(self.package)
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        load_plugins(self.package)
        return name in self._entries


METHODS: Registry[Any] = Registry("method", "bench.methods")
DATASETS: Registry[Any] = Registry("dataset", "bench.datasets")
BACKBONES: Registry[Any] = Registry("backbone")

_loaded: set[str | None] = set()  # built-in packages imported; None: the entry points


def load_plugins(package: str | None = None) -> None:
    """Import the entry-point plugins once, and a built-in package's plugin modules once
    (every package's when none is named).

    Each part is marked loaded first, so a plugin that looks something up while it is
    imported does not start the import over; an import cut short (an error, Ctrl-C)
    unmarks it again so the next lookup retries instead of seeing an empty registry.
    """
    packages = [package] if package else [r.package for r in (METHODS, DATASETS)]
    for part in [*packages, None]:
        if part in _loaded:
            continue
        _loaded.add(part)
        try:
            _import_plugins(part)
        except BaseException:
            _loaded.discard(part)
            raise


def _import_plugins(package_name: str | None) -> None:
    if package_name is not None:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in _HELPERS:
                importlib.import_module(f"{package_name}.{info.name}")
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # name the broken third-party plugin, not just its traceback
            raise BenchError(
                f"plugin '{ep.name}' ({ep.value}) from group {ENTRY_POINT_GROUP} failed to load: {exc}"
            ) from exc
