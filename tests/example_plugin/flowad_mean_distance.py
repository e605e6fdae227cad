"""A third-party method plugin, as docs/plugins.md describes it: distance to the mean feature.

At every position of one backbone layer it stores the mean training feature; a test image's
map is the Euclidean distance to that mean, upsampled to the model input, and its score is
the map's maximum. Installed through the ``flowad_bench.plugins`` entry point group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.features import FeatureSource
from bench.methods.base import Method, MethodContext, register_method


@dataclass(frozen=True)
class MeanDistanceSettings:
    input_size: int = 64  # a field named like a shared option follows --input-size
    layer: str = "layer2"
    batch_size: int = 16


class MeanFeature(nn.Module):
    """Everything fitted lives in buffers, so it saves and loads as a state dict."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels, height, width))


@register_method("mean-distance")
class MeanDistance(Method):
    Settings = MeanDistanceSettings

    def __init__(self, settings: MeanDistanceSettings, context: MethodContext) -> None:
        super().__init__(settings, context)
        channels = context.channels[settings.layer]
        height, width = context.shapes[settings.layer]
        self._model = MeanFeature(channels, height, width).to(context.device)

    @classmethod
    def needs(cls, backbone: str, settings: MeanDistanceSettings) -> list[str]:
        return [settings.layer]

    @property
    def model(self) -> nn.Module:
        return self._model

    def fit(self, train: FeatureSource) -> None:
        total, count = None, 0
        for features in train.batches(self.settings.batch_size):
            batch = features[self.settings.layer].float()
            total = batch.sum(0) if total is None else total + batch.sum(0)
            count += batch.shape[0]
        self._model.mean.copy_(total / count)

    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        distance = (features[self.settings.layer].float() - self._model.mean).norm(dim=1)
        maps = F.interpolate(
            distance[:, None], size=self.context.output_size, mode="bilinear", align_corners=False
        )[:, 0]
        return maps.flatten(1).amax(1), maps
