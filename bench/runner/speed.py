"""``bench speed``: the complexity table of methods x backbones, with no dataset.

Each (method, backbone) is built with exactly the settings ``bench run`` would give its
cells (``resolve_settings``), then profiled on random input of the model's input size.
Nothing is trained: flows run their real computation untrained, and a method whose
prediction reads fitted statistics gets stand-in ones of the right shape from
``Method.init_untrained`` (PaDiM: zero means and identity inverse covariances at every
position). The profile times ``predict_batch``; CFLOW-AD's ``original`` reference
normalises over the whole test set in ``predict``, which adds a second pass of its cheap
exp-and-upsample scoring that these figures leave out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from bench.profiling import (
    PeakMemory,
    ProfileSettings,
    achieved_gflops,
    peak_gflops,
    profile_inference,
)
from bench.registry import METHODS
from bench.runner.cell import Cell, Environment, build_method, resolve_device
from bench.runner.config import RunConfig, parse_set
from bench.runner.grid import check_set_scopes, resolve_settings

SPEED_DEFAULTS = {"weights": "random", "backbones": ["resnet18"]}


def profile_grid(
    options: dict[str, Any], on_row: Callable[[dict[str, Any]], None] = lambda row: None
) -> tuple[list[dict[str, Any]], ProfileSettings]:
    """``bench speed``: every (backbone, method) of ``options`` profiled, and how.

    Random weights by default: timings do not depend on the weights' values, and nothing
    has to be downloaded.
    """
    values = {**SPEED_DEFAULTS, **options}
    config = RunConfig(
        methods=values.get("methods")
        or [
            m
            for m in METHODS.names()
            if values.get("reference", "original") in METHODS.get(m).references
        ],
        backbones=values["backbones"],
        set=parse_set(values.get("set_items") or []),
        **{k: v for k, v in values.items() if k in _CONFIG_KEYS},
    )
    config.validate()
    settings = config.profile_settings()
    device = resolve_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    rows = []
    for row in speed_rows(config, settings, device):
        on_row(row)
        rows.append(row)
    return rows, settings


_CONFIG_KEYS = (
    "reference",
    "weights",
    "input_size",
    "device",
    "threads",
    "profile_repeats",
    "profile_warmup",
    "throughput_batch",
)


def speed_rows(
    config: RunConfig, settings: ProfileSettings, device: str
) -> Iterator[dict[str, Any]]:
    """One profiled row per (backbone, method), in the order ``bench run`` expands them."""
    check_set_scopes(config)
    env = Environment(data_root=None, device=device, progress=False)
    for backbone in config.backbones:
        for name in config.methods:
            base, method_settings = resolve_settings(name, backbone, config)
            cell = Cell(
                method=name,
                base=base,
                dataset="none",
                category="none",
                backbone=backbone,
                seed=config.seeds[0],
                reference=config.reference,
                weights=config.weights,
                settings=dataclasses.asdict(method_settings),
            )
            try:
                yield _profile_row(cell, env, settings, device)
            except Exception as exc:  # one method that cannot run must not hide the others
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                yield {**_identity(cell), "error": reason}


def _identity(cell: Cell) -> dict[str, Any]:
    return {
        "method": cell.method,
        "base_method": cell.base,
        "backbone": cell.backbone,
        "reference": cell.reference,
    }


def _profile_row(
    cell: Cell, env: Environment, settings: ProfileSettings, device: str
) -> dict[str, Any]:
    peak = PeakMemory(torch.device(device))
    method, extractor, pre = build_method(cell, env)
    method.init_untrained()
    profile = profile_inference(method, extractor, settings)
    height, width = extractor.input_size
    achieved = achieved_gflops(profile)
    machine = peak_gflops(torch.device(device))
    return {
        **_identity(cell),
        "weights": extractor.weights.describe(),
        "pretrained": extractor.weights.pretrained,
        "input": pre.describe(),
        "model_input": f"{height}x{width}",
        **profile,
        "achieved_gflops": achieved,
        "peak_gflops": machine,
        "fraction_of_peak": None if achieved is None else achieved / machine,
        **peak.read(),
        "device": device,
        "threads": torch.get_num_threads(),
        "settings": cell.settings,
    }
