"""The expansion of a run configuration into cells, each with every setting resolved.

A cell's key changes whenever anything that affects its result changes, so a rerun of the
same command finds the cells it already finished.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bench.errors import BenchError
from bench.methods.base import apply_overrides
from bench.registry import METHODS
from bench.runner.cell import Cell
from bench.runner.config import SHARED_SETTINGS, RunConfig, scoped


def resolve_settings(
    method: str, backbone: str, config: RunConfig, category: str | None = None
) -> tuple[str, Any]:
    """Reference defaults, then the variant's presets, then shared flags, then --set, then
    the category's own settings (``per_category``), if any."""
    entry = METHODS.entry(method)
    cls = entry.obj
    settings = cls.default_settings(backbone, config.reference)
    settings = apply_overrides(settings, entry.meta.get("settings", {}), method)
    names = {f.name for f in dataclasses.fields(settings)}
    shared = {
        name: getattr(config, name)
        for name in SHARED_SETTINGS
        if getattr(config, name) is not None and name in names
    }
    settings = apply_overrides(settings, shared, method)
    layers = [config.set]
    if category is not None and category in config.per_category:
        layers.append(scoped(config.per_category[category]))
    for layer in layers:
        for scope in ("*", entry.meta["base"], method):
            overrides = dict(layer.get(scope, {}))
            if scope == "*":
                overrides = {k: v for k, v in overrides.items() if k in names}
            settings = apply_overrides(settings, overrides, scope if scope != "*" else method)
    return entry.meta["base"], settings


def check_set_scopes(config: RunConfig) -> None:
    """Every --set names a method in the grid (or applies to at least one)."""
    bases = {METHODS.entry(m).meta["base"] for m in config.methods}
    for scope, values in config.set.items():
        if scope == "*":
            for key in values:
                if not any(
                    key in {f.name for f in dataclasses.fields(METHODS.get(m).Settings)}
                    for m in config.methods
                ):
                    raise BenchError(f"--set {key}: no method in this run has that setting")
        elif scope not in config.methods and scope not in bases:
            raise BenchError(
                f"--set {scope}.…: '{scope}' is not a method of this run ({', '.join(config.methods)})"
            )


def check_unified(config: RunConfig, categories: list[str]) -> None:
    """One model for every category cannot take one category's own settings."""
    if config.setting != "unified":
        return
    own = [c for c in categories if config.per_category.get(c)]
    if own:
        raise BenchError(
            f"--setting unified: the preset sets per-category settings for {', '.join(own)}, "
            "but one model serves every category; use --setting separate or drop per_category"
        )


def expand_cells(config: RunConfig, categories: list[str]) -> list[Cell]:
    """The grid in a stable order: backbone, category, method, seed. In the unified setting
    each category still gets its cell (and row); they share one fit."""
    check_set_scopes(config)
    check_unified(config, categories)
    unified = config.setting == "unified"
    cells = []
    for backbone in config.backbones:
        for category in categories:
            for method in config.methods:
                base, settings = resolve_settings(method, backbone, config, category)
                for seed in config.seeds:
                    cells.append(
                        Cell(
                            method=method,
                            base=base,
                            dataset=config.dataset,
                            category=category,
                            backbone=backbone,
                            seed=seed,
                            reference=config.reference,
                            weights=config.weights,
                            settings=dataclasses.asdict(settings),
                            eval_every=config.eval_every,
                            fpr_limit=config.fpr_limit,
                            bootstrap=config.bootstrap,
                            setting=config.setting,
                            trained_on=tuple(categories) if unified else (),
                        )
                    )
    return cells
