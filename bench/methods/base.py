"""The method contract: declare what you need, fit on train features, predict maps.

A method is a small estimator (fit, then predict) around a plain torch model. It never
sees images or the backbone: the runner hands it feature sources, so the backbone runs
once per image per cell and every method is timed and evaluated the same way.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bench.datasets.pipeline import Augment, Preprocess
from bench.errors import BenchError
from bench.features import FeatureSource
from bench.registry import METHODS

REFERENCES = ("original", "anomalib")


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about its cell besides its own settings."""

    backbone: str
    reference: str
    channels: dict[str, int]  # layer -> C
    shapes: dict[str, tuple[int, int]]  # layer -> (H, W)
    output_size: tuple[int, int]  # the anomaly maps' (H, W): the model input after cropping
    device: torch.device
    seed: int
    progress: bool = True
    # Called with the 1-based epoch after each training epoch when the run evaluates during
    # training (--eval-every); None otherwise.
    on_epoch: Callable[[int], None] | None = None


class Method(ABC):
    """Base of every method plugin. Subclasses define ``Settings`` as a dataclass."""

    name: ClassVar[str]
    Settings: ClassVar[type]
    references: ClassVar[tuple[str, ...]] = REFERENCES  # the references it implements

    def __init__(self, settings: Any, context: MethodContext) -> None:
        self.settings = settings
        self.context = context
        self.device = context.device

    # ---- what the runner asks before building anything -------------------------------
    @classmethod
    def default_settings(cls, backbone: str, reference: str) -> Any:
        """The reference's defaults for this backbone (overridden by --set and CLI flags)."""
        return cls.Settings()

    @classmethod
    @abstractmethod
    def needs(cls, backbone: str, settings: Any) -> list[str]:
        """Extractor layers this method consumes."""

    @classmethod
    def preprocess(cls, backbone: str, reference: str, settings: Any) -> Preprocess:
        """The reference's input pipeline (size, crop, resampling)."""
        size = getattr(settings, "input_size", 256)
        return Preprocess((size, size))

    @classmethod
    def weights_provenance(cls, backbone: str, reference: str) -> str:
        """Where the reference took ImageNet weights from: torchvision, timm-0.5.4 or timm."""
        return "timm"

    @classmethod
    def encoder_padding(cls, backbone: str, settings: Any) -> str:
        """How the backbone's padded convolutions fill the border: ``zeros`` (timm) or
        ``reflect``. Part of the extractor's identity, so features are never shared across."""
        return "zeros"

    @classmethod
    def train_augmentation(cls, settings: Any, reference: str) -> Augment | None:
        """A random transform applied to each resized training image (before normalising),
        or None. It must draw only from the generator it is called with. When set, the
        backbone runs on every pass instead of on cached features."""
        return None

    # ---- estimator contract ---------------------------------------------------------
    @abstractmethod
    def fit(self, train: FeatureSource) -> None:
        """Learn from normal training features."""

    @abstractmethod
    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Image scores (B,) and anomaly maps (B, H, W) at ``output_size``; higher = more anomalous."""

    def predict(self, test: FeatureSource, batch_size: int = 32) -> Iterator[tuple[Tensor, Tensor]]:
        """Scores and maps batch by batch, in test order. Methods whose reference normalises
        over the whole test set override this."""
        for features in test.batches(batch_size):
            yield self.predict_batch(features)

    def epoch_done(self, epoch: int) -> None:
        """Trainable methods call this after each epoch (1-based; a CFLOW-AD meta-epoch
        counts as one). The runner may evaluate on the test set here; the model's train or
        eval mode is restored afterwards. A method that caches anything derived from its
        weights for scoring must drop it after this call."""
        if self.context.on_epoch is None:
            return
        training = self.model.training
        self.context.on_epoch(epoch)
        self.model.train(training)

    def extra_metrics(self, maps: Any, masks: Any) -> dict[str, float]:
        """Outputs of the method's own beyond scores and maps (U-Flow: its unsupervised
        threshold and the IoU there), given the last ``predict``'s maps (N, H, W) and the
        model-resolution masks (None without masks); each becomes a column of its row."""
        return {}

    @property
    @abstractmethod
    def model(self) -> nn.Module:
        """The torch module holding every learned tensor (saved and loaded as a state dict)."""

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def additional_parameters(self) -> int:
        """What the method's paper counts as its "additional parameters" beside the frozen
        backbone; the trainable ones unless the paper counts differently."""
        return self.trainable_parameters()

    def model_bytes(self) -> int:
        """Bytes of the fitted model the method keeps for testing: every tensor of its state
        dict unless the paper counts a smaller part."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def init_untrained(self) -> None:
        """Stand-in fitted state, so ``predict_batch`` does its real work without a fit
        (``bench speed`` times untrained methods). Flows predict as built; a method whose
        prediction reads statistics that only ``fit`` sets overrides this."""
        return None

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)


def apply_overrides(settings: Any, overrides: dict[str, Any], method: str) -> Any:
    """Return settings with ``overrides`` applied; values given as text are parsed by field type."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise BenchError(f"--set {method}.{key}: unknown setting; {method} has: {known}")
        current = getattr(settings, key)
        changes[key] = _coerce(value, current, f"{method}.{key}")
    return dataclasses.replace(settings, **changes)


def _coerce(value: Any, current: Any, label: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if isinstance(current, bool):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            return tuple(type(current[0])(v) for v in value.split(",")) if current else ()
        if current is None:
            return None if value.lower() == "none" else _guess(value)
    except ValueError as exc:
        raise BenchError(
            f"--set {label}={value}: expected {type(current).__name__}, got '{value}'"
        ) from exc
    return value


def _guess(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def register_method(name: str, **variant_settings: Any):
    """Class decorator: registers the method under ``name``."""

    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.add(name, cls, base=name, settings=variant_settings)
        return cls

    return decorator


def register_variant(name: str, base: type[Method], **settings: Any) -> None:
    """A named preset of a method (e.g. ``fastflow-3x3``) that a grid can list beside it."""
    METHODS.add(name, base, base=base.name, settings=settings)
