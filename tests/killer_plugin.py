"""A method plugin whose fit kills its own process, as a segfault or the OOM killer would.

Imported by tests/test_ray_executor.py; Ray workers import it too (the test puts this
folder on their PYTHONPATH), so a cell of it takes down the Ray worker that runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import Tensor, nn

from bench.features import FeatureSource
from bench.methods.base import Method, register_method

NAME = "worker-killer"


@dataclass
class KillerSettings:
    input_size: int = 64
    marker: str = ""  # a file that gets one line (the process id) per attempt


@register_method(NAME)
class WorkerKiller(Method):
    Settings = KillerSettings

    @classmethod
    def needs(cls, backbone: str, settings: KillerSettings) -> list[str]:
        return ["layer1"]

    @property
    def model(self) -> nn.Module:
        return nn.Identity()

    def fit(self, train: FeatureSource) -> None:
        with open(self.settings.marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        os._exit(1)

    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        raise AssertionError("fit never returns")
