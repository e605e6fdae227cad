"""MSFlow (Zhou et al., TNNLS 2024): parallel flows per feature scale, then a fusion flow.

The authors' code (MS-REF) pools each of the layer1-3 features with a 3x3 stride-2 average
(zero padding counted), runs one conditional 2D flow per scale (FrEIA ``AllInOneBlock``s
with a 2D sin/cos position code as condition, subnet conv3x3 -> LayerNorm over channels
-> ReLU -> conv3x3, 2/5/8 blocks for layer1/2/3, clamp 1.9), then one fusion coupling
across the three scales (each scale's channels randomly permuted first; two affine
couplings whose subnets pool every scale to the smallest grid, mix them with
conv3x3 -> LayerNorm -> ReLU -> conv3x3 -> ReLU, upsample back, add the input, and predict
s and t per scale with a conv3x3 each; scale factor ``exp(1.9 * 0.636 * atan(s / 1.9))``).

Training: loss = batch mean of sum over scales of 0.5 |z|^2 minus the total log-det; Adam
(lr 1e-4), gradient norm clipped to 2, 25 meta-epochs of 4 passes, batch 8, a linear
warm-up from 0.1 x lr over the first 12 passes and x0.33 at passes 70 and 90 (both
schedules step once per pass, as PyTorch's ``LinearLR`` and ``MultiStepLR`` there).

Scoring, per image: log p_l = -0.5 mean_c z_l^2 on each scale's grid. The *add* map is
max - sum_l up(exp(log p_l - max log p_l)); the *mul* map is max - exp(L - max L) with
L = sum_l up(log p_l) (``up``: bilinear, corners aligned, to the input size). The image
score is the mean of the top 3% (``int(H * W * 0.03)`` pixels) of the mul map. MS-REF
evaluates pixel AUROC on the add map and its PRO on the mul map; ``map_aggregation``
picks which map the harness gets (default add, the pixel AUROC map).

Only the ``original`` reference exists: anomalib has no MSFlow, so ``--reference
anomalib`` is refused with a one-line error.

Differences from MS-REF, all accepted:
- The backbone is the shared timm extractor with torchvision's ImageNet weights. MS-REF
  builds its ResNets with *reflect* padding in every 3x3 convolution and the 7x7 stem
  (zero padding in torchvision and timm), so its features differ near the borders.
- Input size: MS-REF uses 512 for every class but transistor, which its published log
  trains at 256. Settings here do not know the category: pass
  ``--set msflow.input_size=256`` for transistor.
- Batch size 8: ``main.py``'s argument default, which overrides the 16 in ``default.py``.
- MS-REF evaluates on the test set after every meta-epoch and reports, per metric, the best
  epoch; we report the model after the last epoch.
- Random draws: the fixed permutations and the shuffling come from generators seeded with
  the cell seed and the convolutions initialise under that seed (MS-REF: the global NumPy
  and torch streams, seeded with 9826), so no seed gives MS-REF's initial weights.
- MS-REF's optional mixed precision (``--amp_enable``, off by default) is not offered.
- Odd channel counts (which MS-REF's fusion coupling cannot split) are refused.

``epochs`` counts meta-epochs of ``sub_epochs`` passes. The warm-up and the milestones are
counted in passes, as in MS-REF, so a run shorter than 70 passes never decays.

Speed: training runs the modules below (FrEIA's order of operations) channels-last, the
layout the cached features already have. Scoring uses ``FrozenMSFlow``, a snapshot with
the same mathematics rearranged (see its docstring); maps agree with the module path to
about 1e-6. ``scripts/msflow_speed.py`` times both against the modules on NCHW tensors
(the authors' layout): on one CPU thread scoring took 0.60-0.67 of that time for resnet18
and 0.77-0.80 for wide_resnet50_2 at 256; a training step was within +-7% either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.datasets.pipeline import Preprocess
from bench.errors import BenchError
from bench.extractor import backbone_spec
from bench.features import FeatureSource
from bench.kernels import Snapshot
from bench.methods.base import Method, MethodContext, register_method
from bench.methods.cflow import positional_encoding_2d
from bench.methods.fastflow import FlowStep

LAYERS = ("layer1", "layer2", "layer3")
POOL_TYPES = ("avg", "max", "none")
AGGREGATIONS = ("add", "mul")
ATAN_FACTOR = 0.636  # MS-REF's soft clamp: clamp * 0.636 * atan(s / clamp)
Z_LIMIT = 1e6  # MS-REF clamps the fusion flow's outputs to +-1e6


@dataclass(frozen=True)
class MSFlowSettings:
    """MS-REF's defaults (``default.py`` as overridden by ``main.py``'s arguments)."""

    input_size: int = 512
    c_conds: tuple[int, ...] = (64, 64, 64)  # position-code channels per scale
    parallel_blocks: tuple[int, ...] = (2, 5, 8)
    clamp_alpha: float = 1.9
    pool_type: str = "avg"
    epochs: int = 25  # meta-epochs
    sub_epochs: int = 4  # passes over the train set per meta-epoch
    batch_size: int = 8
    lr: float = 1e-4
    lr_warmup_epochs: int = 3  # meta-epochs of linear warm-up; 0 = none
    lr_warmup_from: float = 0.1
    lr_decay_milestones: tuple[int, ...] = (70, 90)  # in passes
    lr_decay_gamma: float = 0.33
    grad_clip: float = 2.0  # max total gradient norm
    top_k: float = 0.03  # fraction of the map's pixels averaged for the image score
    map_aggregation: str = "add"  # the map returned: add (pixel AUROC) or mul (PRO)


# ---- the flows --------------------------------------------------------------------------


def gather_channels(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, index]`` that keeps a channels-last tensor channels-last (``index_select``
    along dim 1 returns a contiguous NCHW tensor, which every next convolution converts back)."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)


class ConditionedSubnet(nn.Module):
    """MS-REF's ``subnet_conv_ln``: conv3x3 -> LayerNorm over channels -> ReLU -> conv3x3."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 1, 1)
        self.ln = nn.LayerNorm(c_in)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(F.relu(h))


class ParallelStep(FlowStep):
    """FrEIA 0.2 ``AllInOneBlock`` with a condition: the subnet reads [x1, condition].

    The coupling, SOFTPLUS global affine and hard permutation are FastFlow's ``FlowStep``
    (FrEIA's maths and state-dict layout); the condition is concatenated after x1.
    """

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = torch.split(x, self.splits, dim=1)
        s, t = self._coupling(torch.cat((x1, cond), 1))
        log_det = torch.sum(s, dim=(1, 2, 3))
        y = torch.cat((x1, x2 * torch.exp(s) + t), 1)
        g = self.scale()
        perm = self.perm
        # (y * g + o)[:, perm] value for value, as FastFlow's FlowStep.
        z = gather_channels(y, perm) * g.index_select(1, perm)
        z.add_(self.global_offset.index_select(1, perm))
        return z, log_det + x[0, :1].numel() * torch.sum(torch.log(g))

    def inverse(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        g = self.scale()
        y = (gather_channels(z, self.perm_inv) - self.global_offset) / g
        x1, y2 = torch.split(y, self.splits, dim=1)
        s, t = self._coupling(torch.cat((x1, cond), 1))
        x = torch.cat((x1, (y2 - t) * torch.exp(-s)), 1)
        log_det = -torch.sum(s, dim=(1, 2, 3)) - z[0, :1].numel() * torch.sum(torch.log(g))
        return x, log_det


class ParallelFlow(nn.Module):
    """One scale's flow; ``module_list`` keeps FrEIA's SequenceINN state-dict layout."""

    def __init__(self, steps: list[ParallelStep]) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(steps)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        log_det: Tensor | int = 0
        for step in self.module_list:
            x, j = step(x, cond)
            log_det = j + log_det
        return x, log_det

    def inverse(self, z: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        log_det: Tensor | int = 0
        for step in reversed(self.module_list):
            z, j = step.inverse(z, cond)
            log_det = j + log_det
        return z, log_det


def build_parallel_flow(
    channels: int, cond: int, blocks: int, clamp: float, generator: torch.Generator | None = None
) -> ParallelFlow:
    """``blocks`` conditional steps; each draws its permutation, then its subnet initialises."""
    c1, c2 = channels - channels // 2, channels // 2
    steps = []
    for _ in range(blocks):
        permutation = torch.randperm(channels, generator=generator, device="cpu")
        subnet = ConditionedSubnet(c1 + cond, 2 * c2)
        steps.append(ParallelStep(channels, subnet, permutation, clamp))
    return ParallelFlow(steps)


class FusionNet(nn.Module):
    """MS-REF's ``FusionNet`` (add=True, no condition): mixes all scales on the coarsest grid.

    Every scale is average-pooled to the last (smallest) grid, the concatenation goes
    through conv3x3 -> LayerNorm -> ReLU -> conv3x3 -> ReLU (hidden width a quarter of the
    input), and each scale's slice is upsampled back (bilinear, corners aligned) and added
    to that scale's input.
    """

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        total = sum(channels)
        hidden = total // 4
        self.channels = list(channels)
        self.conv1 = nn.Conv2d(total, hidden, 3, 1, 1)
        self.norm = nn.LayerNorm(hidden)
        self.conv2 = nn.Conv2d(hidden, total, 3, 1, 1)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        grid = xs[-1].shape[-2:]
        h = torch.cat([F.adaptive_avg_pool2d(x, grid) for x in xs], dim=1)
        h = self.norm(self.conv1(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = F.relu(self.conv2(F.relu(h)))
        parts = torch.split(h, self.channels, dim=1)
        return [
            x + F.interpolate(p, size=x.shape[-2:], mode="bilinear", align_corners=True)
            for x, p in zip(xs, parts, strict=True)
        ]


class FusionSubnet(nn.Module):
    """MS-REF's ``FusionSTNets``: the fusion net, then a conv3x3 each for s and t per scale."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.cross_convs = FusionNet(channels)
        self.conv_s = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for c in channels)
        self.conv_t = nn.ModuleList(nn.Conv2d(c, c, 3, 1, 1) for c in channels)

    def forward(self, xs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        mixed = self.cross_convs(xs)
        return [(cs(m), ct(m)) for cs, ct, m in zip(self.conv_s, self.conv_t, mixed, strict=True)]


def soft_log_scale(s: Tensor, clamp: float) -> Tensor:
    """MS-REF's ``log_e``: clamp * 0.636 * atan(s / clamp)."""
    return clamp * ATAN_FACTOR * torch.atan(s / clamp)


class FusionCoupling(nn.Module):
    """MS-REF's ``FusionCouplingLayer``: two affine couplings across all scales at once.

    Each scale splits into x1 (first C//2 channels) and x2; y1 = e(s2) x1 + t2 with
    (s2, t2) from ``subnet_2`` over every x2; y2 = e(s1) x2 + t1 with (s1, t1) from
    ``subnet_1`` over every y1; outputs cat(y1, y2) clamped to +-1e6. The log-det sums
    log e(s1) + log e(s2) per scale, then over scales.
    """

    def __init__(self, channels: list[int], clamp: float) -> None:
        super().__init__()
        self.halves = [c // 2 for c in channels]
        self.clamp = clamp
        self.subnet_1 = FusionSubnet(self.halves)
        self.subnet_2 = FusionSubnet([c - c // 2 for c in channels])

    def split(self, xs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pairs = [(x[:, :h], x[:, h:]) for x, h in zip(xs, self.halves, strict=True)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def log_scales(self, st: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        return [soft_log_scale(s, self.clamp) for s, _ in st]

    def forward(self, xs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        x1s, x2s = self.split(xs)
        st2 = self.subnet_2(x2s)
        log2 = self.log_scales(st2)
        y1s = [torch.exp(g) * x1 + t for x1, g, (_, t) in zip(x1s, log2, st2, strict=True)]
        st1 = self.subnet_1(y1s)
        log1 = self.log_scales(st1)
        y2s = [torch.exp(g) * x2 + t for x2, g, (_, t) in zip(x2s, log1, st1, strict=True)]
        ys = [torch.clamp(torch.cat(y, 1), -Z_LIMIT, Z_LIMIT) for y in zip(y1s, y2s, strict=True)]
        log_det: Tensor | int = 0
        for g1, g2 in zip(log1, log2, strict=True):
            log_det = log_det + (torch.sum(g1, dim=(1, 2, 3)) + torch.sum(g2, dim=(1, 2, 3)))
        return ys, log_det

    def inverse(self, ys: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        y1s, y2s = self.split(ys)
        st1 = self.subnet_1(y1s)
        log1 = self.log_scales(st1)
        x2s = [(y2 - t) / torch.exp(g) for y2, g, (_, t) in zip(y2s, log1, st1, strict=True)]
        st2 = self.subnet_2(x2s)
        log2 = self.log_scales(st2)
        x1s = [(y1 - t) / torch.exp(g) for y1, g, (_, t) in zip(y1s, log2, st2, strict=True)]
        log_det: Tensor | int = 0
        for g1, g2 in zip(log1, log2, strict=True):
            log_det = log_det - (torch.sum(g1, dim=(1, 2, 3)) + torch.sum(g2, dim=(1, 2, 3)))
        return [torch.cat(x, 1) for x in zip(x1s, x2s, strict=True)], log_det


class ChannelPermutation(nn.Module):
    """FrEIA's ``PermuteRandom``: a fixed channel permutation (log-det 0)."""

    def __init__(self, permutation: Tensor) -> None:
        super().__init__()
        self.register_buffer("perm", permutation.clone())
        self.register_buffer("perm_inv", torch.argsort(permutation))

    def forward(self, x: Tensor) -> Tensor:
        return gather_channels(x, self.perm)

    def inverse(self, x: Tensor) -> Tensor:
        return gather_channels(x, self.perm_inv)


class FusionFlow(nn.Module):
    """A random permutation per scale, then the fusion coupling (MS-REF's GraphINN)."""

    def __init__(
        self, channels: list[int], clamp: float, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.permutations = nn.ModuleList(
            ChannelPermutation(torch.randperm(c, generator=generator, device="cpu"))
            for c in channels
        )
        self.coupling = FusionCoupling(channels, clamp)

    def forward(self, xs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        return self.coupling([p(x) for p, x in zip(self.permutations, xs, strict=True)])

    def inverse(self, ys: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        xs, log_det = self.coupling.inverse(ys)
        return [p.inverse(x) for p, x in zip(self.permutations, xs, strict=True)], log_det


class MSFlowModel(nn.Module):
    """Parallel flows (one per scale) and the fusion flow; no backbone, no training loop."""

    def __init__(
        self,
        channels: list[int],
        c_conds: tuple[int, ...],
        blocks: tuple[int, ...],
        clamp: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.c_conds = tuple(c_conds)
        self.parallel_flows = nn.ModuleList(
            build_parallel_flow(c, p, n, clamp, generator)
            for c, p, n in zip(channels, c_conds, blocks, strict=True)
        )
        self.fusion_flow = FusionFlow(channels, clamp, generator)
        self._conditions: dict[tuple, Tensor] = {}

    def condition(self, scale: int, like: Tensor) -> Tensor:
        """The position code of ``scale`` for a batch shaped like ``like``, channels-last."""
        b, _, h, w = like.shape
        key = (scale, b, h, w, like.device, like.dtype)
        if key not in self._conditions:
            code = positional_encoding_2d(self.c_conds[scale], h, w).to(like)
            batch = code.unsqueeze(0).expand(b, -1, -1, -1)
            self._conditions[key] = batch.contiguous(memory_format=torch.channels_last)
        return self._conditions[key]

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Latents per scale and the total log-det (parallel + fusion) per image."""
        latents, log_det = [], 0
        for index, (flow, x) in enumerate(zip(self.parallel_flows, features, strict=True)):
            z, j = flow(x, self.condition(index, x))
            latents.append(z)
            log_det = log_det + j
        latents, fuse = self.fusion_flow(latents)
        return latents, fuse + log_det


def pool(x: Tensor, pool_type: str) -> Tensor:
    """MS-REF's pooling of each backbone map before its flow (3x3, stride 2, padding 1)."""
    if pool_type == "avg":
        return F.avg_pool2d(x, 3, 2, 1)  # count_include_pad=True, as nn.AvgPool2d
    if pool_type == "max":
        return F.max_pool2d(x, 3, 2, 1)
    return x


def msflow_loss(latents: list[Tensor], log_det: Tensor) -> Tensor:
    """Batch mean of sum over scales of 0.5 |z|^2, minus the total log-det."""
    total: Tensor | float = 0.0
    for z in latents:
        total = total + 0.5 * torch.sum(z**2, dim=(1, 2, 3))
    return torch.mean(total - log_det)


def log_likelihoods(latents: list[Tensor]) -> list[Tensor]:
    """MS-REF's per-position score -0.5 mean_c z^2 per scale, (B, h, w) each."""
    return [-0.5 * torch.mean(z**2, dim=1) for z in latents]


def _per_image_max(x: Tensor) -> Tensor:
    return x.amax(dim=(-2, -1), keepdim=True)


def anomaly_maps(log_ps: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """MS-REF's two aggregations of per-scale log p maps, (B, H, W) each: (add, mul).

    add: max - sum_l up(exp(log p_l - max log p_l)); mul: max - exp(L - max L) with
    L = sum_l up(log p_l). ``up`` is bilinear with aligned corners; maxima per image.
    """
    logp_sum: Tensor | None = None
    prob_sum: Tensor | None = None
    for log_p in log_ps:
        lp = log_p.unsqueeze(1)
        up = F.interpolate(lp, size=size, mode="bilinear", align_corners=True)
        prob = torch.exp(lp - _per_image_max(lp))
        prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=True)
        logp_sum = up if logp_sum is None else logp_sum + up
        prob_sum = prob if prob_sum is None else prob_sum + prob
    mul = torch.exp(logp_sum - _per_image_max(logp_sum))
    return (_per_image_max(prob_sum) - prob_sum)[:, 0], (_per_image_max(mul) - mul)[:, 0]


def top_k_count(size: tuple[int, int], fraction: float) -> int:
    """MS-REF's ``int(H * W * top_k)``."""
    return int(size[0] * size[1] * fraction)


def top_k_score(maps: Tensor, k: int) -> Tensor:
    """Mean of each map's k largest values, (B,)."""
    return maps.reshape(maps.shape[0], -1).topk(k, dim=1).values.mean(dim=1)


# ---- the scoring snapshot --------------------------------------------------------------


class _FrozenStep(NamedTuple):
    conv1_x: Tensor  # conv1's weights over x1 only; the condition's part is in ``bias_maps``
    conv1_cond: Tensor  # conv1's weights over the condition
    conv1_bias: Tensor
    ln: tuple[Tensor, Tensor, float]  # weight, bias, eps
    conv2: tuple[Tensor, Tensor]  # scaled: 0.2 on the s rows (sigmoid form), 0.1 on the t rows
    clamp: float
    scale: Tensor  # (1, C, 1, 1) global affine after its activation
    offset: Tensor
    order: Tensor  # the channel gather after this step (composed with the fusion's for the last)


class FrozenMSFlow:
    """The model's forward pass for scoring, same mathematics, fewer passes over memory.

    - conv1 of every parallel step is split: the position code's part plus the bias is a
      constant map per grid size, computed once, so each call convolves x1 alone (no
      concatenation, 64 fewer input channels);
    - the coupling's 0.1 is folded into conv2, and so is the 2 of
      clamp * tanh(a) = clamp * (2 sigmoid(2a) - 1) (PyTorch's CPU tanh is much slower);
    - no log-determinants (scores need |z| only); the last parallel permutation and the
      fusion's permutation are one gather;
    - pooling and upsampling between grids of equal size are skipped (identities);
    - the parallel steps' weights are channels-last copies.
    The fusion coupling runs on the model's own modules. Values agree with ``MSFlowModel``
    to about 1e-6; rebuild the snapshot when the parallel flows' weights change.
    """

    def __init__(self, model: MSFlowModel) -> None:
        self.c_conds = model.c_conds
        fusion = model.fusion_flow
        self.flows = []
        for flow, permutation in zip(model.parallel_flows, fusion.permutations, strict=True):
            steps = list(flow.module_list)
            frozen = [self._freeze(s, s.perm) for s in steps[:-1]]
            frozen.append(self._freeze(steps[-1], steps[-1].perm[permutation.perm]))
            self.flows.append(frozen)
        self.coupling = fusion.coupling
        self._bias_maps: dict[tuple, Tensor] = {}

    @staticmethod
    def _freeze(step: ParallelStep, order: Tensor) -> _FrozenStep:
        c1, c2 = step.splits
        subnet = step.subnet
        w1 = subnet.conv1.weight.detach()
        factors = torch.cat([torch.full((c2,), 0.2), torch.full((c2,), 0.1)]).to(w1)
        conv2 = subnet.conv2
        return _FrozenStep(
            conv1_x=_nhwc(w1[:, :c1]),
            conv1_cond=_nhwc(w1[:, c1:]),
            conv1_bias=subnet.conv1.bias.detach().clone(),
            ln=(subnet.ln.weight.detach().clone(), subnet.ln.bias.detach().clone(), subnet.ln.eps),
            conv2=(
                _nhwc(conv2.weight.detach() * factors.view(-1, 1, 1, 1)),
                conv2.bias.detach() * factors,
            ),
            clamp=float(step.clamp),
            scale=step.scale().detach().clone(),
            offset=step.global_offset.detach().clone(),
            order=order.clone(),
        )

    def _bias_map(self, scale: int, index: int, step: _FrozenStep, like: Tensor) -> Tensor:
        """conv1 of the position code plus conv1's bias, (1, hidden, h, w), cached per grid."""
        _, _, h, w = like.shape
        key = (scale, index, h, w, like.device, like.dtype)
        if key not in self._bias_maps:
            code = positional_encoding_2d(self.c_conds[scale], h, w).to(like).unsqueeze(0)
            code = code.contiguous(memory_format=torch.channels_last)
            self._bias_maps[key] = F.conv2d(code, step.conv1_cond, step.conv1_bias, 1, 1)
        return self._bias_maps[key]

    def _parallel(self, scale: int, x: Tensor) -> Tensor:
        for index, step in enumerate(self.flows[scale]):
            c1 = step.conv1_x.shape[1]
            x1, x2 = x[:, :c1], x[:, c1:]
            h = F.conv2d(x1, step.conv1_x, None, 1, 1).add_(self._bias_map(scale, index, step, x))
            weight, bias, eps = step.ln
            h = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), weight, bias, eps)
            a = F.conv2d(h.permute(0, 3, 1, 2).relu_(), *step.conv2, 1, 1)
            c2 = x2.shape[1]
            s = torch.sigmoid(a[:, :c2]).mul_(2 * step.clamp).sub_(step.clamp)
            y = torch.cat((x1, torch.addcmul(a[:, c2:], x2, s.exp_())), 1)
            x = gather_channels(torch.addcmul(step.offset, y, step.scale), step.order)
        return x

    @torch.no_grad()
    def __call__(self, features: list[Tensor]) -> list[Tensor]:
        """Per-scale log p maps (B, h, w) for pooled features."""
        xs = [self._parallel(i, x) for i, x in enumerate(features)]
        return [
            -0.5 * (y1.square().sum(1) + y2.square().sum(1)) / (y1.shape[1] + y2.shape[1])
            for y1, y2 in _frozen_fusion(self.coupling, xs)
        ]


def _nhwc(weight: Tensor) -> Tensor:
    return weight.contiguous(memory_format=torch.channels_last)


def _frozen_fusion(coupling: FusionCoupling, xs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The fusion coupling without log-det or concatenation: (y1, y2) per scale, clamped."""
    x1s, x2s = coupling.split(xs)

    def couple(subnet: FusionSubnet, inputs: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        pairs = zip(_fusion_subnet(subnet, inputs), targets, strict=True)
        return [
            torch.addcmul(t, soft_log_scale(s, coupling.clamp).exp_(), x) for (s, t), x in pairs
        ]

    y1s = couple(coupling.subnet_2, x2s, x1s)
    y2s = couple(coupling.subnet_1, y1s, x2s)
    return [
        (a.clamp(-Z_LIMIT, Z_LIMIT), b.clamp(-Z_LIMIT, Z_LIMIT))
        for a, b in zip(y1s, y2s, strict=True)
    ]


def _fusion_subnet(subnet: FusionSubnet, xs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``FusionSubnet.forward`` with identity pooling and upsampling skipped."""
    net = subnet.cross_convs
    grid = xs[-1].shape[-2:]
    pooled = [x if x.shape[-2:] == grid else F.adaptive_avg_pool2d(x, grid) for x in xs]
    h = torch.cat(pooled, dim=1)
    h = net.norm(net.conv1(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    h = net.conv2(h.relu_()).relu_()
    out = []
    for x, part, cs, ct in zip(
        xs, torch.split(h, net.channels, dim=1), subnet.conv_s, subnet.conv_t, strict=True
    ):
        if part.shape[-2:] != x.shape[-2:]:
            part = F.interpolate(part, size=x.shape[-2:], mode="bilinear", align_corners=True)
        mixed = x + part
        out.append((cs(mixed), ct(mixed)))
    return out


# ---- the method -------------------------------------------------------------------------


def port_reference_state(parallel: list[dict[str, Tensor]], fusion: dict[str, Tensor]) -> dict:
    """An MS-REF checkpoint's ``parallel_flows`` and ``fusion_flow`` as an ``MSFlowModel``
    state dict.

    Parallel flows keep their keys under ``parallel_flows.{scale}``. In the fusion GraphINN
    the node order varies, so, as MS-REF's own loader does, each ``PermuteRandom`` is matched
    to its scale by its length (the scales must differ in channels), and the coupling's
    ``subnet_*`` tensors move to ``fusion_flow.coupling``.
    """
    state: dict[str, Tensor] = {}
    for scale, flow in enumerate(parallel):
        state.update({f"parallel_flows.{scale}.{k}": v for k, v in flow.items()})
    lengths = [flow["module_list.0.global_offset"].numel() for flow in parallel]
    for key, value in fusion.items():
        _, _, rest = key.split(".", 2)
        if rest in ("perm", "perm_inv"):
            state[f"fusion_flow.permutations.{lengths.index(len(value))}.{rest}"] = value
        else:
            state[f"fusion_flow.coupling.{rest}"] = value
    return state


def lr_schedulers(
    optimizer: torch.optim.Optimizer, settings: MSFlowSettings
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """MS-REF's schedules, each stepped once per pass: a linear warm-up from
    ``lr_warmup_from`` x lr over ``lr_warmup_epochs`` meta-epochs, then x ``lr_decay_gamma``
    at each milestone pass. Built in MS-REF's order (the warm-up first)."""
    schedules: list[torch.optim.lr_scheduler.LRScheduler] = []
    if settings.lr_warmup_epochs > 0:
        passes = settings.lr_warmup_epochs * settings.sub_epochs
        schedules.append(
            torch.optim.lr_scheduler.LinearLR(optimizer, settings.lr_warmup_from, 1.0, passes)
        )
    if settings.lr_decay_milestones:
        milestones = list(settings.lr_decay_milestones)
        schedules.append(
            torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, settings.lr_decay_gamma)
        )
    return schedules


def _check(settings: MSFlowSettings) -> None:
    choices = {
        "pool_type": (settings.pool_type, POOL_TYPES),
        "map_aggregation": (settings.map_aggregation, AGGREGATIONS),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise BenchError(f"msflow.{name}={value}: expected one of {', '.join(allowed)}")
    for name in ("c_conds", "parallel_blocks"):
        value = tuple(getattr(settings, name))
        if len(value) != len(LAYERS) or min(value) < 1:
            raise BenchError(
                f"msflow.{name}={','.join(map(str, value))}: expected {len(LAYERS)} positive "
                "numbers, one per scale (layer1, layer2, layer3)"
            )
    if any(c % 4 for c in settings.c_conds):
        raise BenchError(f"msflow.c_conds must be multiples of 4, got {settings.c_conds}")
    for name in ("sub_epochs", "batch_size"):
        if getattr(settings, name) < 1:
            raise BenchError(f"msflow.{name} must be positive, got {getattr(settings, name)}")
    if not 0 < settings.top_k <= 1:
        raise BenchError(f"msflow.top_k must be in (0, 1], got {settings.top_k}")


@register_method("msflow")
class MSFlow(Method):
    """MSFlow with the authors' defaults (``original``; there is no anomalib MSFlow)."""

    Settings = MSFlowSettings
    references = ("original",)

    def __init__(self, settings: MSFlowSettings, context: MethodContext) -> None:
        super().__init__(settings, context)
        _check(settings)
        self.layers = self.needs(context.backbone, settings)
        missing = [layer for layer in self.layers if layer not in context.channels]
        if missing:
            raise BenchError(f"msflow needs extractor layers {missing}, which the context lacks")
        channels = [context.channels[layer] for layer in self.layers]
        odd = [f"{layer} ({c})" for layer, c in zip(self.layers, channels, strict=True) if c % 2]
        if odd:
            raise BenchError(
                f"msflow's fusion flow splits channels in halves; backbone {context.backbone} "
                f"gives an odd count at {', '.join(odd)}"
            )
        self.top_k = top_k_count(context.output_size, settings.top_k)
        if self.top_k < 1:
            raise BenchError(
                f"msflow.top_k={settings.top_k} selects no pixel of a "
                f"{context.output_size[0]}x{context.output_size[1]} map; raise it"
            )
        self.history: list[float] = []
        generator = torch.Generator().manual_seed(context.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            model = MSFlowModel(
                channels,
                tuple(settings.c_conds),
                tuple(settings.parallel_blocks),
                settings.clamp_alpha,
                generator,
            )
        self._model = model.to(self.device, memory_format=torch.channels_last)
        self._scoring = Snapshot(FrozenMSFlow)

    @property
    def model(self) -> nn.Module:
        return self._model

    # ---- what the runner asks before building anything -------------------------------
    @classmethod
    def default_settings(cls, backbone: str, reference: str) -> MSFlowSettings:
        if reference != "original":
            raise BenchError(
                f"--reference {reference}: msflow has only the authors' reference "
                "(anomalib has no MSFlow); use --reference original"
            )
        return MSFlowSettings()

    @classmethod
    def needs(cls, backbone: str, settings: Any) -> list[str]:
        if backbone_spec(backbone).kind != "cnn":
            raise BenchError(f"msflow needs a CNN backbone (layer1..layer3); got '{backbone}'")
        return list(LAYERS)

    @classmethod
    def preprocess(cls, backbone: str, reference: str, settings: Any) -> Preprocess:
        """MS-REF resizes with Lanczos to a square and does not crop."""
        return Preprocess((settings.input_size, settings.input_size), None, "lanczos")

    @classmethod
    def weights_provenance(cls, backbone: str, reference: str) -> str:
        return "torchvision"

    # ---- estimator contract ---------------------------------------------------------
    def _pooled(self, features: dict[str, Tensor]) -> list[Tensor]:
        return [pool(features[k].to(self.device), self.settings.pool_type) for k in self.layers]

    def fit(self, train: FeatureSource) -> None:
        """MS-REF's loop: Adam, gradient clipping, warm-up and step decay once per pass."""
        s = self.settings
        model = self._model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # The fused kernel is the same Adam update in one pass over memory.
        optimizer = torch.optim.Adam(params, lr=s.lr, fused=self.device.type in ("cpu", "cuda"))
        schedules = lr_schedulers(optimizer, s)
        self._scoring.drop()  # fused Adam steps leave the version counters unchanged
        generator = torch.Generator().manual_seed(self.context.seed)
        bar = tqdm(range(s.epochs), desc="msflow", unit="epoch", disable=not self.context.progress)
        for epoch in bar:
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            count = 0
            for _ in range(s.sub_epochs):
                for batch in train.batches(s.batch_size, shuffle=True, generator=generator):
                    latents, log_det = model(self._pooled(batch))
                    loss = msflow_loss(latents, log_det)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                    optimizer.step()
                    n = latents[0].shape[0]
                    total += loss.detach() * n
                    count += n
                for scheduler in schedules:
                    scheduler.step()
            self.history.append(float(total) / max(count, 1))
            bar.set_postfix(loss=f"{self.history[-1]:.4g}")
            self.epoch_done(epoch + 1)
            self._scoring.drop()  # an evaluation may have built it from this epoch's weights
        model.eval()

    @torch.no_grad()
    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        log_ps = self._scoring.get(self._model.eval())(self._pooled(features))
        add, mul = anomaly_maps(log_ps, self.context.output_size)
        scores = top_k_score(mul, self.top_k)
        return scores, add if self.settings.map_aggregation == "add" else mul
