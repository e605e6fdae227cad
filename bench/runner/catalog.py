"""``bench list``: every registered method (with its variants), dataset and backbone.

Listing the methods means importing them, and so torch and timm (about 8 s on a small
machine). The listing depends only on the plugins' code, so it is kept on disk under a key
made of every built-in plugin file's size and modification time and every installed
entry-point plugin (its distribution's version and its module file): any change to them
makes a new key, and the next ``bench list`` imports everything again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from importlib.metadata import entry_points
from pathlib import Path

from bench.datasets.base import cache_dir
from bench.registry import DATASETS, ENTRY_POINT_GROUP, METHODS


def file_stamp(path: Path | str) -> str:
    """A file's path, size and modification time: changes when the file does."""
    stat = Path(path).stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def listing_key() -> str | None:
    """What the listing depends on, hashed; None where a plugin cannot even be located (the
    full import then reports it)."""
    package = Path(__file__).resolve().parents[1]
    sources = [*package.glob("methods/*.py"), *package.glob("datasets/*.py")]
    sources += [package / "extractor.py", package / "registry.py", Path(__file__).resolve()]
    parts = [file_stamp(path) for path in sorted(sources)]
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = ep.dist
        parts.append(
            f"{ep.name}={ep.value} {dist.name if dist else ''} {dist.version if dist else ''}"
        )
        try:
            spec = importlib.util.find_spec(ep.module)
        except (ImportError, ValueError):
            return None
        if spec is None or spec.origin is None:
            return None
        parts.append(file_stamp(spec.origin))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def cached_listing() -> str:
    """``describe_plugins()``, from disk when nothing it depends on has changed."""
    key = listing_key()
    folder = cache_dir()
    path = folder / f"list-{key}.txt"
    if key is not None and path.is_file():
        return path.read_text()
    text = describe_plugins()
    if key is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(text)
            partial.replace(path)
        except OSError:
            pass  # a read-only home only costs the next listing its speed
    return text


def describe_plugins() -> str:
    """One block per kind, as ``bench list`` prints it."""
    from bench.extractor import registered_backbones

    lines = ["methods:"]
    bases: dict[str, list[str]] = {}
    for name in METHODS.names():
        bases.setdefault(METHODS.entry(name).meta["base"], []).append(name)
    for base, names in sorted(bases.items()):
        variants = []
        for name in names:
            if name != base:
                preset = METHODS.entry(name).meta["settings"]
                variants.append(f"{name} ({', '.join(f'{k}={v}' for k, v in preset.items())})")
        suffix = f"; variants: {'; '.join(variants)}" if variants else ""
        lines.append(f"  {base}{suffix}")
    lines.append("datasets:")
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        masks = "" if cls.has_masks else " (no masks: pixel metrics absent)"
        lines.append(f"  {name}{masks}: {', '.join(cls.categories)}")
    lines.append("backbones:")
    for spec in registered_backbones():
        tags = ", ".join(f"{k}: {v}" for k, v in spec.imagenet_tags.items())
        lines.append(f"  {spec.name} [{spec.kind}] ImageNet tags by provenance: {tags}")
    lines.append("  (any other timm CNN name works too, with timm's default weights)")
    return "\n".join(lines)
