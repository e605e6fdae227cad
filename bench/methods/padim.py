"""PaDiM: one Gaussian per feature-map position, scored by Mahalanobis distance.

docs/methods.md describes both references. ``original`` follows the de-facto reference code
(resize 256 with Lanczos, centre crop 224, the ``random.seed(1024)`` channel subset, a
half-sample-symmetric blur border); ``anomalib`` follows anomalib (no crop, bilinear
resize, ``torch.randperm`` subset, the extra 1e-5 on the diagonal, a mirror blur border).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.datasets.pipeline import Preprocess
from bench.errors import BenchError
from bench.features import FeatureSource
from bench.methods.base import Method, MethodContext, register_method

# Kept channels per backbone in the paper (R18-Rd100, WR50-Rd550).
PAPER_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}
LAYERS = ("layer1", "layer2", "layer3")
# Positions whose covariances are estimated together; bounds the float64 scratch memory.
POSITION_CHUNK = 32


@dataclass(frozen=True)
class PadimSettings:
    input_size: int = 256
    # Centre crop as a fraction of input_size: original crops 224 of 256 (0.875), so
    # a smaller --input-size keeps the same field of view.
    crop_fraction: float = 1.0
    n_features: int | None = None  # None: the paper's value for the backbone
    batch_size: int = 32
    regularisation: float = 0.01
    extra_regularisation: float = 0.0  # anomalib adds 1e-5 before inverting
    blur_sigma: float = 4.0
    blur_border: str = "symmetric"  # scipy 'reflect' (original) or 'mirror' (anomalib)
    subset: str = "python-random-1024"  # or "torch-randperm"


def channel_subset(total: int, keep: int, how: str) -> list[int]:
    """The kept channel indices; ``python-random-1024`` reproduces PD-REF exactly."""
    if not 0 < keep <= total:
        raise BenchError(f"--set padim.n_features={keep}: must be between 1 and {total}")
    if how == "python-random-1024":
        return random.Random(1024).sample(range(total), keep)
    if how == "torch-randperm":
        return torch.randperm(total)[:keep].tolist()
    raise BenchError(f"--set padim.subset={how}: expected python-random-1024 or torch-randperm")


def gaussian_kernel(sigma: float) -> Tensor:
    """The 1D kernel of scipy.ndimage.gaussian_filter (truncate 4) and kornia's blur."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _pad(x: Tensor, radius: int, dim: int, border: str) -> Tensor:
    """Pad one spatial dim; 'symmetric' repeats the edge sample, 'mirror' does not."""
    n = x.shape[dim]
    if radius >= n:
        raise BenchError(f"anomaly map of size {n} is too small for a blur radius of {radius}")
    if border == "symmetric":
        before = x.narrow(dim, 0, radius).flip(dim)
        after = x.narrow(dim, n - radius, radius).flip(dim)
    elif border == "mirror":
        before = x.narrow(dim, 1, radius).flip(dim)
        after = x.narrow(dim, n - radius - 1, radius).flip(dim)
    else:
        raise BenchError(f"--set padim.blur_border={border}: expected symmetric or mirror")
    return torch.cat([before, x, after], dim=dim)


def gaussian_blur(maps: Tensor, sigma: float, border: str) -> Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps.device)
    radius = kernel.numel() // 2
    x = maps.unsqueeze(1)
    x = _pad(x, radius, 2, border)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = _pad(x, radius, 3, border)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.squeeze(1)


class PadimModel(nn.Module):
    """The fitted statistics: a mean (d, HW) and an inverse covariance (HW, d, d)."""

    def __init__(self, index: list[int], grid: tuple[int, int]) -> None:
        super().__init__()
        d = len(index)
        positions = grid[0] * grid[1]
        self.grid = grid
        self.register_buffer("index", torch.tensor(index, dtype=torch.long))
        self.register_buffer("mean", torch.zeros(d, positions))
        self.register_buffer("inv_covariance", torch.zeros(positions, d, d))

    def embed(self, features: dict[str, Tensor]) -> Tensor:
        """(B, d, HW): kept channels of layers 1-3, deeper layers nearest-upsampled to layer1.

        Channels are picked before upsampling (cheaper) and then put back in the subset's
        order, so the layout equals selecting from the full upsampled concatenation.
        """
        offset, pieces, slots = 0, [], []
        for layer in LAYERS:
            value = features[layer]
            channels = value.shape[1]
            inside = (self.index >= offset) & (self.index < offset + channels)
            slots.append(torch.nonzero(inside).flatten())
            picked = value.index_select(1, self.index[inside] - offset)
            if picked.shape[-2:] != self.grid:
                picked = F.interpolate(picked, size=self.grid, mode="nearest")
            pieces.append(picked)
            offset += channels
        order = torch.argsort(torch.cat(slots))
        return torch.cat(pieces, dim=1).index_select(1, order).flatten(2)

    def distances(self, embedding: Tensor) -> Tensor:
        """Mahalanobis distance per position, (B, H, W)."""
        diff = (embedding - self.mean.unsqueeze(0)).permute(2, 0, 1)  # (HW, B, d)
        projected = torch.bmm(diff, self.inv_covariance)
        squared = (projected * diff).sum(-1).clamp_min(0)  # (HW, B)
        return squared.sqrt().transpose(0, 1).reshape(-1, *self.grid)


@register_method("padim")
class Padim(Method):
    """Per-position Gaussian over concatenated layer1-3 features."""

    Settings = PadimSettings

    @classmethod
    def default_settings(cls, backbone: str, reference: str) -> PadimSettings:
        if reference == "original":
            return PadimSettings(crop_fraction=0.875)
        return PadimSettings(
            extra_regularisation=1e-5, blur_border="mirror", subset="torch-randperm"
        )

    @classmethod
    def needs(cls, backbone: str, settings: PadimSettings) -> list[str]:
        return list(LAYERS)

    @classmethod
    def preprocess(cls, backbone: str, reference: str, settings: PadimSettings) -> Preprocess:
        size = (settings.input_size, settings.input_size)
        if not 0.0 < settings.crop_fraction <= 1.0:
            raise BenchError(
                f"--set padim.crop_fraction={settings.crop_fraction}: expected a value in (0, 1]"
            )
        side = int(round(settings.input_size * settings.crop_fraction))
        crop = (side, side) if side != settings.input_size else None
        return Preprocess(size, crop, "lanczos" if reference == "original" else "bilinear")

    @classmethod
    def weights_provenance(cls, backbone: str, reference: str) -> str:
        return "torchvision" if reference == "original" else "timm"

    def __init__(self, settings: PadimSettings, context: MethodContext) -> None:
        super().__init__(settings, context)
        total = sum(context.channels[layer] for layer in LAYERS)
        keep = settings.n_features or PAPER_FEATURES.get(context.backbone, min(total, 550))
        index = channel_subset(total, keep, settings.subset)
        self._model = PadimModel(index, context.shapes["layer1"]).to(context.device)

    @property
    def model(self) -> nn.Module:
        return self._model

    def trainable_parameters(self) -> int:
        """PaDiM learns statistics, not parameters: nothing is trained by gradient."""
        return 0

    def model_bytes(self) -> int:
        """The stored Gaussians, what the paper's memory figure counts: a mean (d, HW) and an
        inverse covariance (HW, d, d) in float32. WR50-Rd550 at 224 (56 x 56 positions):
        3136 x 550^2 x 4 B = 3.79 GB of inverse covariances, plus 6.9 MB of means."""
        model = self._model
        return sum(t.numel() * t.element_size() for t in (model.mean, model.inv_covariance))

    @torch.no_grad()
    def init_untrained(self) -> None:
        """The statistics of standard normal features: zero mean, identity precision, at
        every position (the distance costs the same whatever the values)."""
        self._model.mean.zero_()
        self._model.inv_covariance.copy_(
            torch.eye(self._model.index.numel(), device=self.device).expand_as(
                self._model.inv_covariance
            )
        )

    @torch.no_grad()
    def fit(self, train: FeatureSource) -> None:
        n = len(train)
        if n < 2:
            raise BenchError("padim needs at least two training images to estimate a covariance")
        model = self._model
        d = model.index.numel()
        positions = model.grid[0] * model.grid[1]
        embeddings = torch.empty(n, d, positions, device=self.device)
        start = 0
        for features in train.batches(self.settings.batch_size):
            emb = model.embed(features)
            embeddings[start : start + emb.shape[0]] = emb
            start += emb.shape[0]
        model.mean.copy_(embeddings.mean(0))
        eye = torch.eye(d, dtype=torch.float64, device=self.device)
        ridge = self.settings.regularisation
        chunks = range(0, positions, POSITION_CHUNK)
        for p0 in tqdm(
            chunks, desc="padim covariance", leave=False, disable=not self.context.progress
        ):
            p1 = min(p0 + POSITION_CHUNK, positions)
            x = embeddings[:, :, p0:p1].permute(2, 0, 1).double()  # (P, N, d)
            centred = x - x.mean(1, keepdim=True)
            cov = centred.transpose(1, 2) @ centred / (n - 1) + ridge * eye
            cov = cov.float()  # the references store float32 covariances
            if self.settings.extra_regularisation:
                cov = cov + self.settings.extra_regularisation * eye.float()
            model.inv_covariance[p0:p1] = torch.linalg.inv(cov)
        del embeddings

    @torch.no_grad()
    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        distances = self._model.distances(self._model.embed(features))
        maps = F.interpolate(
            distances.unsqueeze(1),
            size=self.context.output_size,
            mode="bilinear",
            align_corners=False,
        ).squeeze(1)
        maps = gaussian_blur(maps, self.settings.blur_sigma, self.settings.blur_border)
        return maps.flatten(1).amax(1), maps
