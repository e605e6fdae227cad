"""The grids a paper table runs: its specs turned into run configurations, and the
checks that keep ours comparable with the paper (backbones, ImageNet weights).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.paper.published import PaperTable
from bench.runner.config import RunConfig


def grid_configs(table: PaperTable, overrides: dict[str, Any], out: Path) -> list[RunConfig]:
    """The table's grids as run configurations, with the user's overrides on top.

    ``backbones`` in the overrides keeps, per grid, the listed backbones it runs (a grid
    left with none is dropped), except that one backbone given for a one-backbone table
    replaces it (the caption then says the backbone differs from the paper's).
    """
    configs = []
    known = {f.name for f in dataclasses.fields(RunConfig)} - {"out", "preset", "dataset"}
    for grid in table.grids:
        unknown = sorted(set(grid) - known)
        if unknown:
            raise BenchError(
                f"bench/paper/tables/{table.name}.yaml: unknown grid keys {', '.join(unknown)}"
            )
    wanted = overrides.get("backbones")
    substitute = check_backbones(table, wanted)
    for grid in table.grids:
        config = RunConfig(**{**grid, "dataset": table.dataset})
        for key, value in overrides.items():
            if key == "set":
                for scope, values in value.items():
                    config.set = {**config.set, scope: {**config.set.get(scope, {}), **values}}
            elif key != "backbones" and value is not None:
                setattr(config, key, value)
        if wanted:
            if substitute:
                config.backbones = [substitute]
            else:
                config.backbones = [b for b in config.backbones if b in wanted]
                if not config.backbones:
                    continue
        config.out = str(out)
        configs.append(config)
    return configs


def check_backbones(table: PaperTable, backbones: list[str] | None) -> str | None:
    """The substitute backbone when one replaces a one-backbone table's; None otherwise."""
    if not backbones:
        return None
    if len(table.backbones) == 1 and len(backbones) == 1:
        return None if backbones[0] == table.backbones[0] else backbones[0]
    stray = [b for b in backbones if b not in table.backbones]
    if stray:
        raise BenchError(
            f"--backbones {','.join(stray)}: table {table.name} compares "
            f"{', '.join(table.backbones)}; give a subset of them"
        )
    return None


def check_weights(weights: str, allow_random: bool) -> None:
    """Papers used ImageNet weights: anything else must be asked for explicitly."""
    if weights == "imagenet" or allow_random:
        return
    if weights not in ("auto", "random") and Path(weights).expanduser().is_file():
        return
    raise BenchError(
        f"--weights {weights}: bench paper compares with published numbers, which used "
        "ImageNet weights; use --weights imagenet (or a checkpoint file), or add "
        "--allow-random-weights to run anyway (the tables then say they are not comparable)"
    )
