"""CFLOW-AD: conditional normalising flows on backbone fibers (docs/methods.md).

One conditional flow per pool layer models the density of single feature vectors
("fibers") given a 2D sin/cos encoding of their position. Training follows the reference's
fiber sampling (one optimiser step per fiber batch); scoring turns per-position
log-likelihoods into a summed per-layer probability map.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.datasets.pipeline import Preprocess
from bench.errors import BenchError
from bench.features import FeatureSource
from bench.kernels import FrozenReluMlp, Snapshot, constant_linear, map_parts
from bench.methods.base import REFERENCES, Method, MethodContext, register_method
from bench.methods.cflow_decoder import CouplingBlock, Decoder, build_decoder

POOL_LAYERS = ("layer2", "layer3", "layer4")
LOG_SQRT_2PI = -0.9189385332046727  # ln(1 / sqrt(2 pi))
NORMALISATIONS = ("test-set", "batch")
LR_SCHEDULES = ("cosine-warmup", "constant")
RESAMPLES = ("lanczos", "bilinear")
PADDINGS = ("reflect", "zeros")
# The encoders the authors build from their own ResNet copy, whose padded convolutions
# reflect the border; every other encoder of theirs comes from timm, which pads with zeros.
REFLECT_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d", "wide_resnet50_2")
# Reflection needs every map at least 2 pixels wide; layer4 has this stride.
LAYER4_STRIDE = 32


@dataclass(frozen=True)
class CFlowSettings:
    """CFLOW-AD hyper-parameters; the defaults are CF-REF's (profile ``original``)."""

    input_size: int = 256
    pool_layers: int = 3  # the last ``pool_layers`` of layer2..layer4
    condition_vector: int = 128
    coupling_blocks: int = 8
    clamp_alpha: float = 1.9
    fiber_batch: int = 256
    fold_remainder: bool = False  # anomalib folds the E mod N leftover fibers into the last step
    eval_chunk: int = 4096  # fibers per decoder call at test time; 0 = fiber_batch (see CFlow)
    lr: float = 2e-4
    lr_schedule: str = "cosine-warmup"
    warmup_epochs: int = 2
    lr_decay_rate: float = 0.1  # eta_min = lr * rate**3
    epochs: int = 25  # meta-epochs for ``original``, plain passes for ``anomalib``
    sub_epochs: int = 8  # passes over the train set per (meta-)epoch
    batch_size: int = 32
    drop_last: bool = True
    permute_soft: bool = True
    rotation_degrees: float = 5.0
    normalisation: str = "test-set"
    resample: str = "lanczos"
    zero_grad_to_none: bool = False  # PyTorch < 2 zeroed gradients in place
    encoder_padding: str = "reflect"


def positional_encoding_2d(size: int, height: int, width: int) -> Tensor:
    """(size, H, W) sin/cos encoding: first half encodes the column, second half the row."""
    if size % 4:
        raise BenchError(f"cflow.condition_vector must be a multiple of 4, got {size}")
    half = size // 2
    freqs = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    cols = torch.arange(0.0, width).unsqueeze(1) * freqs  # (W, half/2)
    rows = torch.arange(0.0, height).unsqueeze(1) * freqs  # (H, half/2)
    encoding = torch.zeros(size, height, width)
    encoding[0:half:2] = torch.sin(cols).T.unsqueeze(1).expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(cols).T.unsqueeze(1).expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T.unsqueeze(2).expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows).T.unsqueeze(2).expand(-1, -1, width)
    return encoding


def log_likelihood(z: Tensor, log_det: Tensor, channels: int) -> Tensor:
    """log p(e) under a standard normal base: C ln(1/sqrt(2 pi)) - |z|^2 / 2 + log|det J|."""
    return channels * LOG_SQRT_2PI - 0.5 * z.pow(2).sum(1) + log_det


def fiber_loss(z: Tensor, log_det: Tensor, channels: int) -> Tensor:
    """Per-fiber loss -log sigmoid(log p / C) = softplus(-log p / C) (CF-REF's ``log_theta``)."""
    return F.softplus(-log_likelihood(z, log_det, channels) / channels)


def learning_rate(settings: CFlowSettings, epoch: int, step: int, steps_per_epoch: int) -> float:
    """CF-REF's schedule: linear warm-up per image batch, then cosine per meta-epoch.

    ``step`` counts image batches inside the (meta-)epoch ``epoch`` over all sub-epochs.
    """
    base = settings.lr
    if settings.lr_schedule == "constant":
        return base
    eta_min = base * settings.lr_decay_rate**3

    def cosine(at: float) -> float:
        return eta_min + (base - eta_min) * (1 + math.cos(math.pi * at / settings.epochs)) / 2

    if epoch < settings.warmup_epochs:
        start, stop = base / 10, cosine(settings.warmup_epochs)
        progress = (step + epoch * steps_per_epoch) / (settings.warmup_epochs * steps_per_epoch)
        return start + progress * (stop - start)
    return cosine(epoch)


class CFlowModel(nn.Module):
    """One decoder per pool layer; state-dict keys ``decoders.{l}.module_list.{k}...``."""

    def __init__(self, channels: list[int], settings: CFlowSettings, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.decoders = nn.ModuleList(
                build_decoder(
                    c,
                    settings.coupling_blocks,
                    settings.condition_vector,
                    settings.clamp_alpha,
                    settings.permute_soft,
                    generator,
                )
                for c in channels
            )


class _FrozenBlock(NamedTuple):
    mlp: FrozenReluMlp  # output already multiplied by 0.2 (scale half) and 0.1 (shift half)
    clamp: float
    scale: Tensor  # (1, C) global affine scale, after its activation
    offset: Tensor  # (1, C)
    log_scale: Tensor  # sum of log scale: the global affine's log-determinant
    order: tuple[Tensor, Tensor] | None  # a hard permutation, split at the coupling split
    rotation: Tensor | None  # a soft one: a dense (C, C) matrix


class FrozenDecoder:
    """A decoder's forward pass for scoring, in fewer passes over memory.

    The same mathematics as ``CouplingBlock.forward`` block after block, rearranged:
    - the condition is written once per call instead of concatenated in every block;
    - the subnet's factor 0.1 is folded into its packed output layer
      (bench.kernels.FrozenReluMlp), and into it also the 2 of
      ``clamp * tanh(s) = clamp * (2 sigmoid(2 s) - 1)``: PyTorch's CPU tanh is about ten
      times slower than its sigmoid;
    - each permutation gathers straight into the next block's inputs, and the last one is
      skipped: it does not change |z|.
    Values agree with ``CouplingBlock.forward`` to about 1e-6. It snapshots the weights.
    """

    def __init__(self, decoder: Decoder) -> None:
        first = decoder.module_list[0]
        self.split, half = first.splits
        # 0.1 on the shift half; 0.2 = 2 x 0.1 on the scale half, for the sigmoid form of tanh
        factors = torch.cat([torch.full((half,), 0.2), torch.full((half,), 0.1)])
        self.blocks = [self._freeze(block, factors) for block in decoder.module_list]

    def _freeze(self, block: CouplingBlock, factors: Tensor) -> _FrozenBlock:
        scale = block.global_scale_activation(block.global_scale).detach().reshape(1, -1)
        order = block.perm_index
        return _FrozenBlock(
            mlp=FrozenReluMlp(block.subnet, factors.to(scale.device)),
            clamp=float(block.clamp),
            scale=scale,
            offset=block.global_offset.detach().reshape(1, -1).clone(),
            log_scale=torch.sum(torch.log(scale)),
            order=None if order is None else (order[: self.split], order[self.split :]),
            rotation=None
            if order is not None
            else block.w_perm.detach().reshape(scale.shape[1], -1).clone(),
        )

    @torch.no_grad()
    def __call__(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """(z, log|det J|) for fibers ``x`` (N, C) at positions encoded by ``cond`` (N, P);
        z comes without the last block's channel permutation."""
        rows, split = x.shape[0], self.split
        x1c = torch.empty(rows, split + cond.shape[1], dtype=x.dtype, device=x.device)
        x1c[:, split:] = cond
        x1c[:, :split] = x[:, :split]
        x2 = x[:, split:]
        joined = torch.empty_like(x)
        log_det = torch.zeros(rows, dtype=x.dtype, device=x.device)
        for block in self.blocks[:-1]:
            log_det = self._couple(block, x1c, x2, joined, log_det)
            if block.rotation is not None:
                mixed = constant_linear(joined, block.rotation)
                x1c[:, :split] = mixed[:, :split]
                x2 = mixed[:, split:]
            else:
                first_half, second_half = block.order
                torch.gather(joined, 1, first_half.expand(rows, -1), out=x1c[:, :split])
                x2 = joined.gather(1, second_half.expand(rows, -1))
        return joined, self._couple(self.blocks[-1], x1c, x2, joined, log_det)

    def _couple(
        self, block: _FrozenBlock, x1c: Tensor, x2: Tensor, joined: Tensor, log_det: Tensor
    ) -> Tensor:
        """Writes the block's output before its permutation into ``joined``; returns the
        log-determinant so far."""
        split, half = self.split, x2.shape[1]
        a = block.mlp(x1c)
        sub_jac = torch.sigmoid(a[:, :half]).mul_(2 * block.clamp).sub_(block.clamp)
        jac = torch.sum(sub_jac, dim=1) + block.log_scale
        scale, offset = block.scale, block.offset
        torch.addcmul(offset[:, :split], x1c[:, :split], scale[:, :split], out=joined[:, :split])
        coupled = joined[:, split:]
        torch.addcmul(a[:, half:], x2, sub_jac.exp_(), out=coupled)
        torch.addcmul(offset[:, split:], coupled, scale[:, split:], out=coupled)
        return jac + log_det


class _ConditionCache:
    """Positional encodings as (H*W, P) fiber rows, computed once per grid size and device."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: dict[tuple[int, int, str], Tensor] = {}

    def rows(self, height: int, width: int, device: torch.device) -> Tensor:
        key = (height, width, str(device))
        if key not in self._cache:
            encoding = positional_encoding_2d(self.size, height, width)
            self._cache[key] = encoding.permute(1, 2, 0).reshape(height * width, -1).to(device)
        return self._cache[key]


@dataclass(frozen=True)
class RandomRotation:
    """CF-REF's train augmentation, applied to the resized PIL image before normalising.

    As torchvision's ``RandomRotation(degrees, NEAREST, expand=False, fill=0)``: an angle
    uniform in [-degrees, degrees], rotation about the centre, black fill; but the angle
    comes from the generator it is given instead of the global random stream.
    """

    degrees: float

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Image.Image:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import rotate

        angle = float(torch.empty(1).uniform_(-self.degrees, self.degrees, generator=generator))
        return rotate(image, angle, interpolation=InterpolationMode.NEAREST, expand=False, fill=0)


def _freeze_decoders(model: CFlowModel) -> list[FrozenDecoder]:
    """Scoring snapshots of the decoders, one per pool layer."""
    return [FrozenDecoder(decoder) for decoder in model.decoders]


@register_method("cflow")
class CFlow(Method):
    """CFLOW-AD with the authors' (``original``) or anomalib's (``anomalib``) behaviour.

    Epochs: for ``original`` ``epochs`` counts CF-REF's meta-epochs; each meta-epoch is
    ``sub_epochs`` passes over the train set (25 x 8 = 200 passes), the cosine learning rate
    changes per meta-epoch and the warm-up per image batch. For ``anomalib`` ``sub_epochs``
    is 1, so ``epochs`` counts plain passes (anomalib's max 50; its early stopping on the
    test set's pixel AUROC is not reproduced).

    zero_grad: one Adam holds every decoder, and each fiber batch trains one of them.
    CF-REF calls ``zero_grad()``, which under the PyTorch it was written for (< 2) zeroes
    gradients in place: once a decoder has had its first gradient, Adam updates it at every
    later step with its decaying momentum, also while another layer's decoder trains.
    ``original`` reproduces that (``zero_grad_to_none=False``); anomalib runs on PyTorch 2,
    whose ``zero_grad`` sets gradients to None so Adam skips the idle decoders. It matters
    after each switch of layer (about the next 20 steps, while the momentum decays) and
    costs time: every step updates all decoders (81.6M parameters for wide_resnet50_2
    instead of the 5.5M of the layer2 decoder that trains most steps).

    Encoder padding: CF-REF's ResNets (its own copy of torchvision's) pad the 7x7 stem and
    every 3x3 convolution by reflection, not with zeros; ``encoder_padding`` selects it and
    the runner builds a matching extractor.

    Test chunking: both references decode test fibers in chunks of ``fiber_batch`` (keeping
    the last partial chunk). Rows are decoded independently, so the chunk only bounds
    memory; ``eval_chunk`` fibers per call (default 4096) gives the same maps with far
    fewer calls. ``eval_chunk=0`` restores the references' chunking.
    """

    Settings = CFlowSettings

    def __init__(self, settings: CFlowSettings, context: MethodContext) -> None:
        super().__init__(settings, context)
        _validate(settings)
        self.layers = self.needs(context.backbone, settings)
        missing = [layer for layer in self.layers if layer not in context.channels]
        if missing:
            raise BenchError(f"cflow needs extractor layers {missing}, which the context lacks")
        channels = [context.channels[layer] for layer in self.layers]
        self._model = CFlowModel(channels, settings, context.seed).to(self.device)
        self._conditions = _ConditionCache(settings.condition_vector)
        # packing wide_resnet50_2's decoders takes about 30 ms, too much per call
        self._scoring = Snapshot(_freeze_decoders)
        self.history: list[float] = []

    # ---- what the runner asks before building anything -------------------------------
    @classmethod
    def default_settings(cls, backbone: str, reference: str) -> CFlowSettings:
        if reference not in REFERENCES:
            raise BenchError(f"unknown reference '{reference}'; known: {', '.join(REFERENCES)}")
        if reference == "original":
            padding = "reflect" if backbone in REFLECT_ENCODERS else "zeros"
            return CFlowSettings(encoder_padding=padding)
        return CFlowSettings(
            fiber_batch=64,
            fold_remainder=True,
            lr=1e-4,
            lr_schedule="constant",
            warmup_epochs=0,
            epochs=50,
            sub_epochs=1,
            drop_last=False,
            permute_soft=False,
            rotation_degrees=0.0,
            normalisation="batch",
            resample="bilinear",
            zero_grad_to_none=True,
            encoder_padding="zeros",
        )

    @classmethod
    def needs(cls, backbone: str, settings: CFlowSettings) -> list[str]:
        if not 1 <= settings.pool_layers <= len(POOL_LAYERS):
            raise BenchError(f"cflow.pool_layers must be 1..3, got {settings.pool_layers}")
        return list(POOL_LAYERS[-settings.pool_layers :])

    @classmethod
    def preprocess(cls, backbone: str, reference: str, settings: CFlowSettings) -> Preprocess:
        size = settings.input_size
        return Preprocess((size, size), resample=settings.resample)

    @classmethod
    def weights_provenance(cls, backbone: str, reference: str) -> str:
        return "torchvision" if reference == "original" else "timm"

    @classmethod
    def encoder_padding(cls, backbone: str, settings: CFlowSettings) -> str:
        """The authors' ResNets reflect at every padded convolution; anomalib's timm
        encoder pads with zeros."""
        if settings.encoder_padding not in PADDINGS:
            raise BenchError(
                f"cflow.encoder_padding={settings.encoder_padding}: expected one of "
                f"{', '.join(PADDINGS)}"
            )
        if settings.encoder_padding == "reflect" and settings.input_size <= LAYER4_STRIDE:
            raise BenchError(
                f"cflow: --input-size {settings.input_size} leaves layer4 one pixel wide, too "
                "small for the reflect padding of the original reference's encoder; give "
                f"more than {LAYER4_STRIDE} (e.g. 64), or set cflow.encoder_padding=zeros"
            )
        return settings.encoder_padding

    @classmethod
    def train_augmentation(cls, settings: CFlowSettings, reference: str) -> RandomRotation | None:
        """CF-REF rotates every resized training image by up to ``rotation_degrees``."""
        if settings.rotation_degrees > 0:
            return RandomRotation(settings.rotation_degrees)
        return None

    # ---- estimator contract ---------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    def fit(self, train: FeatureSource) -> None:
        s = self.settings
        generator = torch.Generator().manual_seed(self.context.seed)
        optimizers = self._optimizers()
        batches = train.num_batches(s.batch_size, s.drop_last)
        if batches == 0:
            raise BenchError(
                f"cflow: {len(train)} training images give no full batch of {s.batch_size}; "
                "lower cflow.batch_size or set cflow.drop_last=false"
            )
        steps_per_epoch = batches * s.sub_epochs
        self._scoring.drop()  # fused Adam steps leave the version counters unchanged
        self._model.train()
        for epoch in range(s.epochs):
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            fibers = 0
            bar = tqdm(
                total=steps_per_epoch,
                desc=f"cflow epoch {epoch + 1}/{s.epochs}",
                unit="batch",
                leave=False,
                disable=not self.context.progress,
            )
            for sub_epoch in range(s.sub_epochs):
                stream = train.batches(s.batch_size, True, generator, s.drop_last)
                for index, features in enumerate(stream):
                    lr = learning_rate(s, epoch, index + sub_epoch * batches, steps_per_epoch)
                    for optimizer in dict.fromkeys(optimizers):
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                    loss_sum, count = self._train_batch(features, optimizers, generator)
                    total += loss_sum
                    fibers += count
                    bar.update()
            self.history.append(float(total) / max(fibers, 1))
            bar.set_postfix(loss=f"{self.history[-1]:.4f}")
            bar.close()
            self.epoch_done(epoch + 1)
            self._scoring.drop()  # an evaluation may have built it from this epoch's weights
        self._model.eval()

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """One Adam per decoder where gradients are zeroed to None, else one shared by all.

        Adam skips a parameter without a gradient, so with ``zero_grad_to_none`` each
        decoder's steps move its own weights alone and an Adam of its own is the same update;
        that lets the decoders train at once (``_train_batch``). Zeroed in place (``original``),
        every step moves every decoder that has had a gradient, so they share one.
        """
        decoders, lr = list(self._model.decoders), self.settings.lr
        if self.settings.zero_grad_to_none:
            return [_adam([p for p in d.parameters() if p.requires_grad], lr) for d in decoders]
        shared = _adam([p for p in self._model.parameters() if p.requires_grad], lr)
        return [shared] * len(decoders)

    def _train_batch(
        self,
        features: dict[str, Tensor],
        optimizers: list[torch.optim.Optimizer],
        generator: torch.Generator,
    ) -> tuple[Tensor, int]:
        """One pass of every decoder over the shuffled fibers of an image batch.

        Fiber orders are drawn here, layer by layer, as a sequential pass would draw them.
        With an optimiser per decoder the decoders are independent and, on the CPU, train on
        ``cpu_workers()`` threads at once (each decoder's fiber batches of 64 rows are too
        small for PyTorch's own threading to use two cores well); the loss is summed in the
        sequential order either way.
        """
        s = self.settings
        jobs = []
        for decoder, optimizer, layer in zip(
            self._model.decoders, optimizers, self.layers, strict=True
        ):
            x = features[layer].to(self.device, torch.float32)
            b, c, h, w = x.shape
            count = b * h * w
            if count < s.fiber_batch:
                raise BenchError(
                    f"cflow: {layer} has {count} fibers per image batch, fewer than "
                    f"cflow.fiber_batch={s.fiber_batch}; lower fiber_batch or raise batch_size"
                )
            perm = torch.randperm(count, generator=generator).to(self.device)
            jobs.append((decoder, optimizer, x, perm))
        if s.zero_grad_to_none and self.device.type == "cpu":  # an Adam each: independent
            results = map_parts(self._train_decoder, jobs)
        else:
            results = [self._train_decoder(job) for job in jobs]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        used = 0
        for step_losses, count in results:
            for loss in step_losses:
                total += loss
            used += count
        return total, used

    def _train_decoder(
        self, job: tuple[nn.Module, torch.optim.Optimizer, Tensor, Tensor]
    ) -> tuple[list[Tensor], int]:
        """One decoder's steps over one image batch's fibers in ``perm`` order: the summed
        loss of each step and the fibers used."""
        decoder, optimizer, x, perm = job
        s = self.settings
        b, c, h, w = x.shape
        count = b * h * w
        steps = count // s.fiber_batch
        rows = x.permute(0, 2, 3, 1).reshape(count, c)[perm]
        conds = self._conditions.rows(h, w, self.device)[perm % (h * w)]
        losses = []
        used = 0
        for step in range(steps):
            start = step * s.fiber_batch
            last = step == steps - 1
            stop = count if (last and s.fold_remainder) else start + s.fiber_batch
            optimizer.zero_grad(set_to_none=s.zero_grad_to_none)
            z, log_det = decoder(rows[start:stop], [conds[start:stop]])
            loss = fiber_loss(z, log_det, c)
            loss.mean().backward()
            optimizer.step()
            losses.append(loss.detach().sum())
            used += stop - start
        return losses, used

    @torch.no_grad()
    def likelihoods(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-dimension log-likelihood l = log p / C as {layer: (B, H, W)}, ``eval_chunk`` rows
        per decoder call."""
        self._model.eval()
        out: dict[str, Tensor] = {}
        chunk = self.settings.eval_chunk or self.settings.fiber_batch
        for frozen, layer in zip(self._scoring.get(self._model), self.layers, strict=True):
            x = features[layer].to(self.device, torch.float32)
            b, c, h, w = x.shape
            count = b * h * w
            rows = x.permute(0, 2, 3, 1).reshape(count, c)
            conds = self._conditions.rows(h, w, self.device).repeat(b, 1)
            values = torch.empty(count, device=self.device)
            for start in range(0, count, chunk):
                stop = min(start + chunk, count)
                z, log_det = frozen(rows[start:stop], conds[start:stop])
                values[start:stop] = log_likelihood(z, log_det, c) / c
            out[layer] = values.reshape(b, h, w)
        return out

    def _score(self, likelihoods: dict[str, Tensor], maxima: dict[str, Tensor]) -> Tensor:
        """Sum over layers of exp(l - max l), bilinearly upsampled (align_corners=True)."""
        total = None
        for layer in self.layers:
            prob = torch.exp(likelihoods[layer] - maxima[layer]).unsqueeze(1)
            up = F.interpolate(
                prob, size=self.context.output_size, mode="bilinear", align_corners=True
            ).squeeze(1)
            total = up if total is None else total + up
        return total

    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """anomalib's scoring: both maxima are taken over this batch only."""
        lls = self.likelihoods(features)
        score = self._score(lls, {layer: v.max() for layer, v in lls.items()})
        maps = score.max() - score
        return maps.amax(dim=(-2, -1)), maps

    def predict(self, test: FeatureSource, batch_size: int = 32) -> Iterator[tuple[Tensor, Tensor]]:
        """CF-REF's scoring: per-layer and final maxima over the whole test set, in float64."""
        if self.settings.normalisation == "batch":
            yield from super().predict(test, batch_size)
            return
        parts: dict[str, list[Tensor]] = {layer: [] for layer in self.layers}
        for features in test.batches(batch_size):
            for layer, values in self.likelihoods(features).items():
                parts[layer].append(values.double())
        lls = {layer: torch.cat(values) for layer, values in parts.items()}
        maxima = {layer: values.max() for layer, values in lls.items()}
        n = next(iter(lls.values())).shape[0]

        def chunk(start: int) -> dict[str, Tensor]:
            return {layer: values[start : start + batch_size] for layer, values in lls.items()}

        top = max(self._score(chunk(i), maxima).max() for i in range(0, n, batch_size))
        for start in range(0, n, batch_size):
            maps = top - self._score(chunk(start), maxima)
            yield maps.amax(dim=(-2, -1)), maps


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where PyTorch has one for the device.

    Same update rule; one pass over memory instead of several. The layer4 decoder alone
    holds 59M parameters for WRN50, so the plain per-tensor Adam step costs as much as
    the decoder's forward and backward pass at a fiber batch of 64.
    """
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _validate(settings: CFlowSettings) -> None:
    checks = {
        "normalisation": (settings.normalisation, NORMALISATIONS),
        "lr_schedule": (settings.lr_schedule, LR_SCHEDULES),
        "resample": (settings.resample, RESAMPLES),
        "encoder_padding": (settings.encoder_padding, PADDINGS),
    }
    for name, (value, allowed) in checks.items():
        if value not in allowed:
            raise BenchError(f"cflow.{name}={value}: expected one of {', '.join(allowed)}")
    for name in ("fiber_batch", "batch_size", "sub_epochs", "coupling_blocks"):
        if getattr(settings, name) < 1:
            raise BenchError(f"cflow.{name} must be positive, got {getattr(settings, name)}")
    if settings.eval_chunk < 0:
        raise BenchError(
            f"cflow.eval_chunk must be >= 0 (0 = fiber_batch), got {settings.eval_chunk}"
        )
    if settings.condition_vector % 4:
        raise BenchError(
            f"cflow.condition_vector must be a multiple of 4, got {settings.condition_vector}"
        )
