"""``bench list``: every registered method (with its variants), dataset and backbone."""

from __future__ import annotations

from bench.extractor import registered_backbones
from bench.registry import DATASETS, METHODS


def describe_plugins() -> str:
    """One block per kind, as ``bench list`` prints it."""
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
