"""U-Flow (Tailanian et al.): a U-shaped normalising flow over multi-scale features.

One stage of FrEIA 0.2 ``AllInOneBlock`` steps per feature scale, coarsest first. Every
stage but the last splits its output along the channels: the second part is that scale's
latent, the first is upsampled (an invertible 2x2 pixel shuffle, FrEIA's
``IRevNetUpsampling``) and concatenated after the next finer scale's features as that
stage's input. The anomaly map is one minus the mean over scales of the bilinearly
upsampled per-scale likelihood exp(-mean_c z^2 / 2). The a-contrario threshold
(log NFA = 0) lives in ``bench.methods.uflow_nfa``.

How it is computed, against both references (FrEIA's graph): the permutations are index
gathers instead of one-hot 1x1 convolutions, the steps run on channels-last rows with a
hand-written backward pass for their elementwise part, and tanh(x) is computed as
2 sigmoid(2x) - 1. These change values by float32 rounding only (about 1e-6; maps agree
with anomalib 2.7 to 4e-7).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.datasets.pipeline import Preprocess
from bench.errors import BenchError
from bench.extractor import backbone_spec
from bench.features import FeatureSource
from bench.methods import uflow_nfa
from bench.methods.base import REFERENCES, Method, MethodContext, register_method
from bench.methods.fastflow import Flow, FlowStep, softplus_scale, subnet

MCAIT_LAYERS = ["cait_m48_448.blocks.40", "cait_s24_224.blocks.20"]
CNN_LAYERS = ["layer1", "layer2", "layer3"]
NFA_KINDS = ("tree", "binomial", "off")


@dataclass(frozen=True)
class UFlowSettings:
    """Hyper-parameters; ``UFlow.default_settings`` fills them per backbone and reference."""

    input_size: int = 448
    flow_steps: int = 4
    affine_clamp: float = 2.0
    subnet_ratio: float = 1.0
    epochs: int = 201
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_end_factor: float = 0.4  # LinearLR from 1 to this factor over lr_decay_epochs
    lr_decay_epochs: int = 25000
    score_size: int = 256  # image score: max of the map at this size; 0 = the map's own
    nfa: str = "tree"  # the a-contrario segmentation: tree, binomial or off
    nfa_log_threshold: float = 0.0


def split_sizes(channels: int) -> tuple[int, int]:
    """A stage output's (upsampled, emitted) channels: FrEIA ``Split`` at C // 8 * 4."""
    up = channels // 8 * 4
    return up, channels - up


class UFlowModel(nn.Module):
    """LayerNorms (CNN features only) and the U-shaped flow; no backbone, no training loop.

    ``shapes`` are the features' (C, H, W), finest first, each scale half the previous.
    """

    def __init__(
        self,
        shapes: list[tuple[int, int, int]],
        flow_steps: int,
        clamp: float,
        subnet_ratio: float,
        layer_norm: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for (_, h, w), (_, hc, wc) in zip(shapes, shapes[1:], strict=False):
            if (h, w) != (2 * hc, 2 * wc):
                raise BenchError(
                    f"uflow needs each feature scale at half the previous one's size; got "
                    f"{' -> '.join(f'{hh}x{ww}' for _, hh, ww in shapes)}"
                )
        self.norms = nn.ModuleList(
            [nn.LayerNorm(list(shape), elementwise_affine=True) for shape in shapes]
            if layer_norm
            else []
        )
        stages = []
        channels = shapes[-1][0]
        for index in range(len(shapes) - 1, -1, -1):
            stages.append(_stage(channels, flow_steps, clamp, subnet_ratio, generator))
            if index:
                channels = shapes[index - 1][0] + split_sizes(channels)[0] // 4
        self.stages = nn.ModuleList(stages)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Latents (finest first, (B, C, H, W) views of channels-last data) and the
        log-determinant per image.

        The mathematics of the flow steps' ``forward``, run on channels-last rows
        (B*H*W, C): channel splits, concatenations and permutations act on contiguous
        rows, the convolutions take the rows as NHWC images without a copy, and each
        step's elementwise part is one autograd node with a hand-written backward pass
        (``_StepTail``). Values and gradients agree with FrEIA's graph to about 1e-6.
        """
        rows = [self._rows(i, f) for i, f in enumerate(features)]
        x = rows[-1]
        latents: list[Tensor] = []
        log_det: Tensor | int = 0
        last = len(self.stages) - 1
        for index, stage in enumerate(self.stages):
            b, h, w, c = x.shape
            sizes = split_sizes(c) if index < last else (c,)
            outputs, jac = _run_stage(stage, x.reshape(-1, c), (b, h, w), sizes)
            log_det = log_det + jac
            if index == last:
                latents.append(_as_image(outputs[0], (b, h, w)))
                break
            up, out = outputs
            latents.append(_as_image(out, (b, h, w)))
            # FrEIA's IRevNetUpsampling: channel 4k + 2i + j -> channel k at (2y + i, 2x + j)
            up = up.view(b, h, w, -1, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, -1)
            x = torch.cat((rows[last - index - 1], up), dim=-1)
        return latents[::-1], log_det

    def _rows(self, index: int, feature: Tensor) -> Tensor:
        """(B, H, W, C) channels-last features, LayerNorm'd over (C, H, W) when it has one."""
        nhwc = feature.permute(0, 2, 3, 1)
        if not self.norms:
            return nhwc
        norm = self.norms[index]
        return F.layer_norm(
            nhwc,
            nhwc.shape[1:],
            norm.weight.permute(1, 2, 0),
            norm.bias.permute(1, 2, 0),
            norm.eps,
        )


def _as_image(rows: Tensor, geometry: tuple[int, int, int]) -> Tensor:
    b, h, w = geometry
    return rows.view(b, h, w, -1).permute(0, 3, 1, 2)


def _run_stage(
    stage: Flow, x: Tensor, geometry: tuple[int, int, int], sizes: tuple[int, ...]
) -> tuple[list[Tensor], Tensor]:
    """One stage on rows ``x`` (B*H*W, C); its output comes split into ``sizes`` channels."""
    c = x.shape[1]
    c1 = c - c // 2
    # split, not slicing: its backward is one concatenation, where each slice's would fill
    # a zero (B*H*W, C) gradient first
    x1, x2 = x.split((c1, c - c1), dim=1)
    x1 = x1.contiguous()
    log_det: Tensor | int = 0
    steps = stage.module_list
    outputs: list[Tensor] = []
    for k, step in enumerate(steps):
        hidden = _subnet(step.subnet, x1, geometry)
        *outputs, jac = _StepTail.apply(
            x1,
            x2,
            hidden,
            step.global_scale.view(-1),
            step.global_offset.view(-1),
            step.perm,
            sizes if k == len(steps) - 1 else (c1, c - c1),
            step.clamp,
            geometry[0],
        )
        log_det = log_det + jac
        if k < len(steps) - 1:
            x1, x2 = outputs
    return outputs, log_det


def _subnet(subnet: nn.Sequential, x1: Tensor, geometry: tuple[int, int, int]) -> Tensor:
    """The coupling subnet on rows: the convolutions see them as an NHWC image."""
    first, _, second = subnet
    image = _as_image(x1, geometry)
    hidden = F.relu(F.conv2d(image, first.weight, first.bias, padding=first.padding), inplace=True)
    out = F.conv2d(hidden, second.weight, second.bias, padding=second.padding)
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


class _StepTail(torch.autograd.Function):
    """A flow step after its subnet, on rows: affine coupling, global affine, permutation.

    Forward: s = clamp * tanh(0.1 a_s); y2 = x2 * exp(s) + 0.1 a_t; u = (x1, y2) * g + o
    with g = 0.1 softplus_0.5(global_scale); outputs are the columns of u taken by the
    permutation, cut into ``sizes``; log-det = sum(s) + H*W * sum(log g) per image.
    The backward pass writes each gradient once instead of going through autograd's
    slices and concatenations.
    """

    @staticmethod
    def forward(ctx, x1, x2, a, raw_scale, offset, perm, sizes, clamp, batch):  # noqa: ANN001, ANN205
        rows, c1 = x1.shape
        c2 = x2.shape[1]
        # tanh(0.1 a) as 2 sigmoid(0.2 a) - 1: PyTorch's CPU tanh is several times slower
        th = torch.sigmoid(a[:, :c2] * 0.2).mul_(2).sub_(1)
        e = torch.exp(th * clamp)
        y2 = torch.addcmul(a[:, c2:] * 0.1, x2, e)
        g = softplus_scale(raw_scale)
        ug = torch.cat((x1, y2), 1)
        torch.addcmul(offset, ug, g, out=ug)
        outputs = [ug.index_select(1, index) for index in perm.split(sizes)]
        log_det = th.view(batch, -1).sum(1) * clamp + (rows // batch) * torch.log(g).sum()
        ctx.save_for_backward(x1, y2, th, e, x2, g, raw_scale, perm)
        ctx.clamp, ctx.batch, ctx.sizes = clamp, batch, sizes
        return (*outputs, log_det)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        *grad_outputs, grad_log_det = grads
        x1, y2, th, e, x2, g, raw_scale, perm = ctx.saved_tensors
        (rows, c1), c2, batch = x1.shape, x2.shape[1], ctx.batch
        grad_ug = torch.empty(rows, c1 + c2, dtype=x1.dtype, device=x1.device)
        for grad, index in zip(grad_outputs, perm.split(ctx.sizes), strict=True):
            grad_ug.scatter_(1, index.expand(rows, -1), grad)
        grad_offset = grad_ug.sum(0)
        grad_g = torch.cat(((grad_ug[:, :c1] * x1).sum(0), (grad_ug[:, c1:] * y2).sum(0)))
        grad_g += (rows // batch) * grad_log_det.sum() / g
        grad_raw = grad_g * 0.1 * torch.sigmoid(0.5 * raw_scale)
        grad_u = grad_ug.mul_(g)
        grad_y2 = grad_u[:, c1:]
        grad_x2 = grad_y2 * e
        grad_a = torch.empty(rows, 2 * c2, dtype=x1.dtype, device=x1.device)
        torch.mul(grad_y2, 0.1, out=grad_a[:, c2:])
        # d log p / d s = dy2 * x2 * e + d log_det, per image; d s / d a = 0.1 clamp (1 - th^2)
        grad_s = torch.addcmul(
            grad_log_det.view(-1, 1, 1), grad_x2.view(batch, -1, c2), x2.view(batch, -1, c2)
        ).view(rows, c2)
        scale = 0.1 * ctx.clamp
        slope = torch.addcmul(th.new_tensor(scale), th, th, value=-scale)
        torch.mul(grad_s, slope, out=grad_a[:, :c2])
        return grad_u[:, :c1], grad_x2, grad_a, grad_raw, grad_offset, None, None, None, None


def _stage(
    channels: int, steps: int, clamp: float, ratio: float, generator: torch.Generator | None
) -> Flow:
    """``steps`` flow steps with 3x3 and 1x1 subnets in turn (3, 1, 3, 1, ...)."""
    blocks = []
    c1, c2 = channels - channels // 2, channels // 2
    for step in range(steps):
        kernel = 3 if step % 2 == 0 else 1
        permutation = torch.randperm(channels, generator=generator, device="cpu")
        blocks.append(FlowStep(channels, subnet(c1, 2 * c2, kernel, ratio), permutation, clamp))
    return Flow(blocks)


def uflow_loss(latents: list[Tensor], log_det: Tensor) -> Tensor:
    """Batch mean of sum over scales of ||z||^2 / 2, minus the log-determinant."""
    energy = torch.stack([0.5 * torch.sum(z**2, dim=(1, 2, 3)) for z in latents]).sum(0)
    return torch.mean(energy - log_det)


def anomaly_map(latents: list[Tensor], size: tuple[int, int]) -> Tensor:
    """1 - mean over scales of the upsampled exp(-mean_c z^2 / 2); (B, H, W) in [0, 1]."""
    likelihoods = [
        F.interpolate(
            torch.exp(-0.5 * torch.mean(z**2, dim=1, keepdim=True)),
            size=size,
            mode="bilinear",
            align_corners=False,
        )
        for z in latents
    ]
    return 1 - torch.stack(likelihoods, dim=-1).mean(dim=-1)[:, 0]


def port_reference_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An anomalib or U-Flow-code state dict as ``UFlowModel``'s.

    Both hold a FrEIA ``GraphINN`` whose ``flow.module_list`` lists the coupling blocks
    stage by stage, coarsest first, with parameter-free split, upsampling and concatenation
    modules between them (the upsampling's constant kernel is dropped); the CNN LayerNorms
    are ``feature_extractor.feature_normalizations``. The backbone is left out.
    """
    ported: dict[str, Tensor] = {}
    blocks: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("model.")
        if key.startswith("feature_extractor.feature_normalizations."):
            ported["norms." + key.split(".", 2)[2]] = value
        elif key.startswith("flow.module_list.") and not key.endswith(".downsample_kernel"):
            index, name = key[len("flow.module_list.") :].split(".", 1)
            blocks.setdefault(int(index), {})[name] = value
    indices = sorted(blocks)
    stage, step = 0, 0
    for position, index in enumerate(indices):
        if position and index != indices[position - 1] + 1:  # split, up, concat in between
            stage, step = stage + 1, 0
        for name, value in blocks[index].items():
            ported[f"stages.{stage}.module_list.{step}.{name}"] = value
        step += 1
    return ported


@register_method("uflow")
class UFlow(Method):
    """U-Flow with its authors' code (``original``) or anomalib 2.7's (``anomalib``) behaviour.

    ``original`` follows the U-Flow code: MS-CaiT at 448 (CaiT-M48 block 40 and CaiT-S24
    block 20 on the image resized to 224), or resnet18 / wide_resnet50_2 at 256 with a
    trainable LayerNorm per scale; 4 flow steps, clamp 2, hard permutations, subnet ratio
    1; Adam with weight decay 1e-5 and a LinearLR stepped once per epoch from 1 to 0.4
    over 25000 epochs (its trainer cannot count the iterations under Lightning 2 and
    falls back to 25000); ``configs/mvtec_default.yaml``'s batch 8 and lr 1e-4 for 200
    epochs, which its trainer runs as 201. The per-category configs (lr, batch, epochs)
    are in ``bench/paper/uflow-mvtec.yaml``. Its image score is the maximum of the map
    resized to 256, the size at which it evaluates everything; our pixel metrics and
    NFA segmentation use the model resolution instead. Not reproduced: its early
    stopping and checkpoint choice on the test set's pixel AUROC, AUPRO and mIoU.

    ``anomalib`` follows anomalib 2.7's Uflow: its pre-processor resizes every input to
    448; lr 1e-3, the same weight decay and schedule, batch 32 (its datamodule's
    default), 50 epochs (its last shipped config); the image score is the maximum of the
    map at the input size. anomalib resizes float tensors with torchvision's antialiased
    resize; here, as for every method, the PIL image is resized bilinearly.

    The NFA threshold (``extra_metrics``): ``original`` uses the U-Flow code's tree of
    upper level sets, ``anomalib`` the binomial window test of anomalib's
    ``compute_anomaly_mask`` (see ``bench.methods.uflow_nfa``).
    """

    Settings = UFlowSettings

    def __init__(self, settings: UFlowSettings, context: MethodContext) -> None:
        super().__init__(settings, context)
        if settings.nfa not in NFA_KINDS:
            raise BenchError(f"uflow.nfa={settings.nfa}: expected one of {', '.join(NFA_KINDS)}")
        for name in ("flow_steps", "batch_size", "epochs", "lr_decay_epochs"):
            if getattr(settings, name) < 1:
                raise BenchError(f"uflow.{name} must be positive, got {getattr(settings, name)}")
        self.layers = self.needs(context.backbone, settings)
        missing = [layer for layer in self.layers if layer not in context.channels]
        if missing:
            raise BenchError(f"uflow needs extractor layers {missing}, which the context lacks")
        shapes = [(context.channels[k], *context.shapes[k]) for k in self.layers]
        if settings.nfa == "tree" and min(min(h, w) for _, h, w in shapes) < 3:
            raise BenchError(
                "uflow.nfa=tree needs every feature map at least 3x3; raise --input-size "
                "or set uflow.nfa=off"
            )
        self.history: list[float] = []
        self._nfa_stats: list[list[uflow_nfa.ScaleStats]] = []
        generator = torch.Generator().manual_seed(context.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            self._model = UFlowModel(
                shapes,
                settings.flow_steps,
                settings.affine_clamp,
                settings.subnet_ratio,
                layer_norm=backbone_spec(context.backbone).kind == "cnn",
                generator=generator,
            ).to(self.device)

    @property
    def model(self) -> nn.Module:
        return self._model

    @classmethod
    def default_settings(cls, backbone: str, reference: str) -> UFlowSettings:
        if reference not in REFERENCES:
            raise BenchError(f"unknown reference '{reference}'; known: {', '.join(REFERENCES)}")
        if reference == "anomalib":
            return UFlowSettings(epochs=50, batch_size=32, lr=1e-3, score_size=0, nfa="binomial")
        size = 448 if backbone_spec(backbone).kind == "vit" else 256
        return UFlowSettings(input_size=size)

    @classmethod
    def needs(cls, backbone: str, settings: Any) -> list[str]:
        spec = backbone_spec(backbone)
        if spec.kind == "cnn":
            return list(CNN_LAYERS)
        if backbone != "mcait":
            raise BenchError(f"uflow takes CNN backbones or mcait (MS-CaiT); got '{backbone}'")
        return list(MCAIT_LAYERS)

    @classmethod
    def preprocess(cls, backbone: str, reference: str, settings: Any) -> Preprocess:
        return Preprocess((settings.input_size, settings.input_size), None, "bilinear")

    def fit(self, train: FeatureSource) -> None:
        """Adam on the flow's negative log-likelihood; LinearLR stepped after each epoch."""
        s = self.settings
        model = self._model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(
            params, lr=s.lr, weight_decay=s.weight_decay, fused=self.device.type in ("cpu", "cuda")
        )
        schedule = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1.0, end_factor=s.lr_end_factor, total_iters=s.lr_decay_epochs
        )
        generator = torch.Generator().manual_seed(self.context.seed)
        bar = tqdm(range(s.epochs), desc="uflow", unit="epoch", disable=not self.context.progress)
        for epoch in bar:
            total = torch.zeros((), device=self.device)
            count = 0
            for batch in train.batches(s.batch_size, shuffle=True, generator=generator):
                features = [batch[k] for k in self.layers]
                loss = uflow_loss(*model(features))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = features[0].shape[0]
                total += loss.detach() * n
                count += n
            schedule.step()
            self.history.append(float(total) / count)
            bar.set_postfix(loss=f"{self.history[-1]:.4g}")
            self.epoch_done(epoch + 1)
        model.eval()

    @torch.no_grad()
    def latents(self, features: dict[str, Tensor]) -> list[Tensor]:
        """The flow's latents for a batch of features, finest scale first."""
        model = self._model.eval()
        return model([features[k].to(self.device) for k in self.layers])[0]

    def _score(self, latents: list[Tensor]) -> tuple[Tensor, Tensor]:
        maps = anomaly_map(latents, self.context.output_size)
        size = self.settings.score_size
        if size and (size, size) != tuple(maps.shape[-2:]):
            return anomaly_map(latents, (size, size)).amax(dim=(1, 2)), maps
        return maps.amax(dim=(1, 2)), maps

    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self._score(self.latents(features))

    def predict(self, test: FeatureSource, batch_size: int = 32) -> Iterator[tuple[Tensor, Tensor]]:
        """As ``predict_batch``, and keeps what the NFA threshold needs (a few small maps per
        image) for ``extra_metrics``."""
        self._nfa_stats = []
        for features in test.batches(batch_size):
            latents = self.latents(features)
            if self.settings.nfa != "off":
                self._nfa_stats.append(uflow_nfa.statistics(latents, self.settings.nfa))
            yield self._score(latents)

    def extra_metrics(self, maps: np.ndarray | None, masks: np.ndarray | None) -> dict[str, float]:
        """The a-contrario segmentation of the last ``predict`` pass, against ``masks``.

        ``nfa_log_threshold`` is the log10-NFA below which a pixel is anomalous (0: one
        false alarm per image expected under the null hypothesis); ``nfa_miou`` the mean
        over test images of each image's IoU (an image with neither detection nor defect
        counts 1), as the U-Flow code reports it; ``nfa_iou`` the IoU of all test pixels
        pooled. Both are absent without masks or with ``nfa=off``.
        """
        s = self.settings
        out = {"nfa_log_threshold": float(s.nfa_log_threshold)}
        if s.nfa == "off" or masks is None:
            return out
        count = sum(stats[0].maps.shape[0] for stats in self._nfa_stats)
        if count != len(masks) or (maps is not None and len(maps) != count):
            raise BenchError(
                f"uflow: the last predict pass saw {count} test images, but {len(masks)} masks "
                "were given; call extra_metrics right after predict"
            )
        masks = torch.as_tensor(np.asarray(masks))
        size = tuple(masks.shape[-2:])
        parts, start = [], 0
        for stats in self._nfa_stats:
            log_nfa = uflow_nfa.log_nfa(stats, s.nfa, size)
            stop = start + log_nfa.shape[0]
            parts.append(uflow_nfa.overlaps(log_nfa, masks[start:stop], s.nfa_log_threshold))
            start = stop
        intersection, union = (torch.cat(values) for values in zip(*parts, strict=True))
        return out | uflow_nfa.iou_summary(intersection, union)
