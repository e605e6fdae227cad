"""FastFlow (Yu et al. 2021): one 2D normalising flow per feature scale (docs/methods.md).

The flow step is FrEIA 0.2's ``AllInOneBlock`` (affine coupling with the tanh clamp, a
learned SOFTPLUS global affine, a fixed hard permutation) re-written with identical maths
and the same state-dict layout. The only change is how the permutation is applied: an
index gather instead of FrEIA's convolution with a one-hot C x C matrix, which costs a
matmul per step (more than a whole 1x1 subnet) and is not exact under TF32. The one-hot
``w_perm``/``w_perm_inv`` tensors are kept, non-trainable, so FrEIA, FF-REF and anomalib
checkpoints load unchanged. Training runs each step as one autograd node whose backward
pass computes autograd's gradients bit for bit with fewer passes over memory (3-4% of a
fit, ``docs/cpu_speed.md``).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.datasets.pipeline import Preprocess
from bench.errors import BenchError
from bench.extractor import backbone_spec
from bench.features import CPU_MICRO_BATCH, FeatureSource
from bench.kernels import Snapshot, backward_in_parts
from bench.methods.base import Method, MethodContext, register_method, register_variant

CLAMP = 2.0
# FrEIA's SOFTPLUS global affine: g = 0.1 softplus_0.5(raw), starting at g = 1 from
# raw = 2 ln(exp(0.5 * 10 * 1) - 1)
SOFTPLUS_INIT = 2.0 * math.log(math.exp(5.0) - 1.0)


def softplus_scale(raw: Tensor) -> Tensor:
    """The global affine scale g from its raw parameter, as FrEIA's SOFTPLUS type has it."""
    return 0.1 * F.softplus(raw, beta=0.5)


# FF-REF's configs/*.yaml per backbone: (input, steps, hidden_ratio, conv3x3_only).
_ORIGINAL = {
    "resnet18": (256, 8, 1.0, True),
    "wide_resnet50_2": (256, 8, 1.0, False),
    "deit_base_distilled_patch16_384": (384, 20, 0.16, False),
    "cait_m48_448": (448, 20, 0.16, False),
}
# Transformer layer FastFlow reads: the paper's "block index" (FF-REF's fastflow.py).
_VIT_BLOCK = {"deit_base_distilled_patch16_384": 7, "cait_m48_448": 40}
# Feature (channels, stride) per scale of the supported backbones, to count parameters
# without building a backbone.
KNOWN_FEATURES: dict[str, list[tuple[int, int]]] = {
    "resnet18": [(64, 4), (128, 8), (256, 16)],
    "wide_resnet50_2": [(256, 4), (512, 8), (1024, 16)],
    "deit_base_distilled_patch16_384": [(768, 16)],
    "cait_m48_448": [(768, 16)],
}


@dataclass(frozen=True)
class FastFlowSettings:
    """Hyper-parameters; ``FastFlow.default_settings`` fills them per backbone and reference."""

    input_size: int = 256
    flow_steps: int = 8
    hidden_ratio: float = 1.0
    conv3x3_only: bool = False
    epochs: int = 500
    batch_size: int = 32
    drop_last: bool = False  # FF-REF drops the last incomplete training batch; anomalib keeps it
    lr: float = 1e-3
    weight_decay: float = 1e-5
    early_stop_patience: int = 0  # epochs without a training-loss improvement; 0 = off
    early_stop_min_delta: float = 0.0


class FlowStep(nn.Module):
    """FrEIA 0.2 ``AllInOneBlock`` for images (clamp, SOFTPLUS global affine, hard permutation).

    Forward: x1 | x2 = split(x); a = 0.1 * subnet(x1); s = clamp * tanh(a[:c2]);
    y = (x1, x2 * exp(s) + a[c2:]); z = permute(y * g + o), with
    g = 0.1 * softplus_beta=0.5(global_scale). Log-det = sum(s) + H*W * sum(log g).
    """

    def __init__(
        self, channels: int, subnet: nn.Module, permutation: Tensor, clamp: float = CLAMP
    ) -> None:
        super().__init__()
        self.splits = (channels - channels // 2, channels // 2)
        self.clamp = clamp
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), SOFTPLUS_INIT))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        one_hot = F.one_hot(permutation.cpu(), channels).float().to(self.global_scale.device)
        self.w_perm = nn.Parameter(one_hot.view(channels, channels, 1, 1), requires_grad=False)
        self.w_perm_inv = nn.Parameter(
            one_hot.t().contiguous().view(channels, channels, 1, 1), requires_grad=False
        )
        self.subnet = subnet
        self.register_buffer("perm", permutation.clone(), persistent=False)
        self.register_buffer("perm_inv", torch.argsort(permutation), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_permutation)

    def scale(self) -> Tensor:
        return softplus_scale(self.global_scale)

    def _coupling(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        a = self.subnet(x1)
        a.mul_(0.1)
        c2 = self.splits[1]
        return self.clamp * torch.tanh(a[:, :c2]), a[:, c2:]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled() and _plain_subnet(self.subnet):
            first, _, second = self.subnet
            return _TrainingStep.apply(
                x,
                first.weight,
                first.bias,
                second.weight,
                second.bias,
                self.global_scale,
                self.global_offset,
                self.perm,
                self.perm_inv,
                self.splits,
                self.clamp,
                (first.padding, second.padding),
            )
        return self.graph_forward(x)

    def graph_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``forward`` as separate autograd operations (the values and gradients that
        training's single node reproduces, and the path for other subnets)."""
        x1, x2 = torch.split(x, self.splits, dim=1)
        a = self.subnet(x1)
        a.mul_(0.1)
        z, log_det, _ = _affine_tail(
            x1, x2, a, self.clamp, self.global_scale, self.global_offset, self.perm
        )
        return z, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        g = self.scale()
        y = (z.index_select(1, self.perm_inv) - self.global_offset) / g
        x1, y2 = torch.split(y, self.splits, dim=1)
        s, t = self._coupling(x1)
        x = torch.cat((x1, (y2 - t) * torch.exp(-s)), 1)
        log_det = -torch.sum(s, dim=(1, 2, 3)) - z[0, :1].numel() * torch.sum(torch.log(g))
        return x, log_det


def _affine_tail(
    x1: Tensor,
    x2: Tensor,
    a: Tensor,
    clamp: float,
    raw_scale: Tensor,
    offset: Tensor,
    perm: Tensor,
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """A step after its subnet (``a`` = 0.1 subnet(x1)): z, the log-det, and what the
    training node's backward pass reads (tanh(a_s), exp(s), y[perm], g, g[perm])."""
    c2 = x2.shape[1]
    th = torch.tanh(a[:, :c2])
    s = th * clamp
    e = torch.exp(s)
    y = torch.cat((x1, x2 * e + a[:, c2:]), 1)
    g = softplus_scale(raw_scale)
    # (y * g + o)[:, perm], value for value: gather first, then multiply and add in place
    # (not addcmul, whose fused multiply-add rounds differently from FrEIA).
    y_perm, g_perm = y.index_select(1, perm), g.index_select(1, perm)
    z = y_perm * g_perm
    z.add_(offset.index_select(1, perm))
    log_det = torch.sum(s, dim=(1, 2, 3)) + x1[0, :1].numel() * torch.sum(torch.log(g))
    return z, log_det, (th, e, y_perm, g, g_perm)


def _plain_subnet(subnet: nn.Module) -> bool:
    """True for ``subnet()``'s Conv -> ReLU -> Conv with stride 1 and zero padding."""
    if not (isinstance(subnet, nn.Sequential) and len(subnet) == 3):
        return False
    first, relu, second = subnet
    return (
        type(relu) is nn.ReLU
        and not relu.inplace
        and all(
            type(conv) is nn.Conv2d
            and conv.bias is not None
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)
            for conv in (first, second)
        )
    )


class _TrainingStep(torch.autograd.Function):
    """``FlowStep.forward`` as one autograd node, for training.

    The forward pass runs the same operations as ``FlowStep.forward``; the backward pass
    runs the operations autograd runs for it (the same ATen kernels on the same tensors,
    so the gradients are autograd's values), without the zero-filled buffers that autograd
    builds for the slices, the gather and the split and then sums: the gather's gradient is
    a gather through the inverse permutation and each half of a gradient is written once.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, raw_scale, offset, perm, perm_inv, splits, clamp, pads):  # noqa: ANN001, ANN205
        x1, x2 = torch.split(x, splits, dim=1)
        hidden = torch.relu(F.conv2d(x1, w1, b1, padding=pads[0]))
        a = F.conv2d(hidden, w2, b2, padding=pads[1])
        a.mul_(0.1)
        z, log_det, (th, e, y_perm, g, g_perm) = _affine_tail(
            x1, x2, a, clamp, raw_scale, offset, perm
        )
        ctx.save_for_backward(
            x, w1, hidden, w2, th, e, y_perm, g, g_perm, raw_scale, perm, perm_inv
        )
        ctx.splits, ctx.clamp, ctx.pads = splits, clamp, pads
        return z, log_det

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z, grad_log_det):  # noqa: ANN001, ANN205
        x, w1, hidden, w2, th, e, y_perm, g, g_perm, raw_scale, perm, perm_inv = ctx.saved_tensors
        (c1, c2), clamp, pads = ctx.splits, ctx.clamp, ctx.pads
        x1, x2 = torch.split(x, ctx.splits, dim=1)
        # z = y[perm] * g[perm] + o[perm]; log_det = sum(s) + HW * sum(log g)
        grad_offset = torch.zeros_like(g).index_add_(1, perm, grad_z.sum([0, 2, 3], keepdim=True))
        grad_g = torch.zeros_like(g).index_add_(
            1, perm, (grad_z * y_perm).sum([0, 2, 3], keepdim=True)
        )
        grad_sum_log = grad_log_det.sum() * x[0, :1].numel()
        grad_g = grad_g + grad_sum_log.expand(g.shape) / g
        grad_raw = torch.ops.aten.softplus_backward(grad_g * 0.1, raw_scale, 0.5, 20.0)
        grad_y = (grad_z * g_perm).index_select(1, perm_inv)
        # y = (x1, x2 * e + t); e = exp(s); s = clamp * tanh(a_s); a = 0.1 * conv(...)
        grad_y2 = grad_y[:, c1:]
        grad_a = torch.empty((x.shape[0], 2 * c2, *x.shape[2:]), dtype=x.dtype, device=x.device)
        grad_s = (grad_y2 * x2) * e + grad_log_det.view(-1, 1, 1, 1)
        torch.ops.aten.tanh_backward.grad_input(grad_s * clamp, th, grad_input=grad_a[:, :c2])
        grad_a[:, :c2].mul_(0.1)
        torch.mul(grad_y2, 0.1, out=grad_a[:, c2:])
        mask = [True, True, True]
        grad_hidden, grad_w2, grad_b2 = torch.ops.aten.convolution_backward(
            grad_a, hidden, w2, [w2.shape[0]], [1, 1], list(pads[1]), [1, 1], False, [0, 0], 1, mask
        )
        grad_pre = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0)
        grad_x1, grad_w1, grad_b1 = torch.ops.aten.convolution_backward(
            grad_pre, x1, w1, [w1.shape[0]], [1, 1], list(pads[0]), [1, 1], False, [0, 0], 1, mask
        )
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.add(grad_x1, grad_y[:, :c1], out=grad_x[:, :c1])
        torch.mul(grad_y2, e, out=grad_x[:, c1:])
        return (grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_raw, grad_offset,
                None, None, None, None, None)  # fmt: skip


def _refresh_permutation(module: nn.Module, incompatible_keys: Any) -> None:
    """Loaded one-hot matrices define the permutation; re-derive the gather indices."""
    index = module.w_perm.detach().view(module.w_perm.shape[0], -1).argmax(dim=1)
    module.perm = index.to(module.perm.device)
    module.perm_inv = torch.argsort(index).to(module.perm.device)


class Flow(nn.Module):
    """A sequence of flow steps; the ``module_list`` name keeps FrEIA's SequenceINN layout."""

    def __init__(self, steps: list[FlowStep]) -> None:
        super().__init__()
        self.module_list = nn.ModuleList(steps)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det: Tensor | int = 0
        for step in self.module_list:
            x, j = step(x)
            log_det = j + log_det
        return x, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        log_det: Tensor | int = 0
        for step in reversed(self.module_list):
            z, j = step.inverse(z)
            log_det = j + log_det
        return z, log_det


def subnet(c_in: int, c_out: int, kernel: int, hidden_ratio: float) -> nn.Sequential:
    """Conv(k) -> ReLU -> Conv(k), size kept with explicit zero padding k // 2."""
    hidden = int(c_in * hidden_ratio)
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, kernel, padding=kernel // 2),
        nn.ReLU(),
        nn.Conv2d(hidden, c_out, kernel, padding=kernel // 2),
    )


def build_flow(
    channels: int,
    flow_steps: int,
    hidden_ratio: float,
    conv3x3_only: bool,
    generator: torch.Generator | None = None,
) -> Flow:
    """One scale's flow; kernels 3,1,3,1,... (all 3 when conv3x3_only).

    Each step draws its permutation, then its subnet initialises, the order anomalib uses.
    """
    steps = []
    for i in range(flow_steps):
        kernel = 1 if i % 2 == 1 and not conv3x3_only else 3
        permutation = torch.randperm(channels, generator=generator, device="cpu")
        c1, c2 = channels - channels // 2, channels // 2
        steps.append(FlowStep(channels, subnet(c1, 2 * c2, kernel, hidden_ratio), permutation))
    return Flow(steps)


class FastFlowModel(nn.Module):
    """LayerNorms (CNN features only) and one flow per scale; no backbone, no training loop."""

    def __init__(
        self,
        shapes: list[tuple[int, int, int]],
        flow_steps: int,
        hidden_ratio: float,
        conv3x3_only: bool,
        layer_norm: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.norms = nn.ModuleList(
            [nn.LayerNorm(list(shape), elementwise_affine=True) for shape in shapes]
            if layer_norm
            else []
        )
        self.flows = nn.ModuleList(
            [build_flow(c, flow_steps, hidden_ratio, conv3x3_only, generator) for c, _, _ in shapes]
        )

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Latents z and log-determinants per scale."""
        if self.norms:
            features = [norm(f) for norm, f in zip(self.norms, features, strict=True)]
        outputs = [flow(f) for flow, f in zip(self.flows, features, strict=True)]
        return [z for z, _ in outputs], [j for _, j in outputs]


def fastflow_loss(
    latents: list[Tensor], log_dets: list[Tensor], batch_size: int | None = None
) -> Tensor:
    """Sum over scales of the batch mean of 0.5 * ||z||^2 - log det (constant dropped).

    With ``batch_size``, the sum over these images divided by it: one part's share of the
    mean over a whole batch that was split into parts.
    """
    total = latents[0].new_zeros(())
    for z, log_det in zip(latents, log_dets, strict=True):
        nll = 0.5 * torch.sum(z**2, dim=(1, 2, 3)) - log_det
        total = total + (torch.mean(nll) if batch_size is None else torch.sum(nll) / batch_size)
    return total


def anomaly_map(latents: list[Tensor], output_size: tuple[int, int]) -> Tensor:
    """Mean over scales of the upsampled -exp(-0.5 * mean_c z^2); (B, H, W), in [-1, 0)."""
    maps = [
        F.interpolate(
            -torch.exp(-0.5 * torch.mean(z**2, dim=1, keepdim=True)),
            size=output_size,
            mode="bilinear",
            align_corners=False,
        )
        for z in latents
    ]
    return torch.stack(maps, dim=-1).mean(dim=-1)[:, 0]


class _FrozenStep(NamedTuple):
    """One ``FlowStep``'s weights as scoring uses them (see ``FrozenFlows``)."""

    w1: Tensor
    b1: Tensor
    w2: Tensor  # scale rows times 0.2; shift rows times 0.1 m2 g2, bias 0.1 m2 g2 b + m2 o2
    b2: Tensor
    padding: tuple[int, int]
    twice_clamp: float
    x1_scale: Tensor  # m1 g1
    x1_offset: Tensor  # m1 o1
    perm: Tensor | None  # None for the last step: the map does not depend on channel order


class FrozenFlows:
    """The latents of ``FastFlowModel`` for scoring, in fewer passes over memory.

    The same mathematics as ``FlowStep.forward`` step after step, rearranged:
    - no log-determinant: the anomaly map depends on z alone;
    - ``clamp * tanh(0.1 a) = 2 clamp sigmoid(0.2 a) - clamp``, the 0.2 folded into the
      subnet's scale rows (PyTorch's CPU tanh is several times slower than its sigmoid);
    - each step writes u = y * g + o in its own channel order, and the next step reads
      u[perm]; the constant factor exp(-clamp) of exp(s) and every per-channel factor and
      offset that reaches a channel of x2 are carried in the stored values instead of
      being applied: the next step stores m * u, where m is 1 on the channels the next
      step reads as x1 and that step's factor mu = exp(-clamp) m2 g2 on those it reads as
      x2. Then a step is u1 = m1 (x1 g1 + o1) and u2 = t' + x2_stored * exp(2 clamp
      sigmoid(a_s)), with t' = m2 (g2 t + o2) a convolution whose weights carry m2 g2 and
      whose bias carries m2 o2. The first step's mu goes into the LayerNorm's affine
      (or one product with the input where there is no LayerNorm), the last step stores
      z itself (m = 1) and skips its permutation, since the channel order does not change
      mean_c z^2. Per step that is two products into halves of one buffer and one gather,
      instead of a subtraction, a concatenation, a gather and a full product.
    Maps agree with ``FastFlowModel`` to about 1e-6. It snapshots the weights.
    """

    def __init__(self, model: FastFlowModel) -> None:
        self.norms: list[nn.Module] = []
        self.entry_scales: list[Tensor] = []  # only where there are no LayerNorms
        self.flows: list[list[_FrozenStep]] = []
        for index, flow in enumerate(model.flows):
            steps, mu = self._freeze(list(flow.module_list))
            half = mu.shape[1]
            if model.norms:
                norm = copy.deepcopy(model.norms[index])
                with torch.no_grad():
                    norm.weight[-half:] *= mu[0]
                    norm.bias[-half:] *= mu[0]
                self.norms.append(norm)
            else:
                first = torch.ones_like(steps[0].x1_scale)
                self.entry_scales.append(torch.cat((first, mu), 1))
            self.flows.append(steps)

    @staticmethod
    def _freeze(steps: list[FlowStep]) -> tuple[list[_FrozenStep], Tensor]:
        """The frozen steps, built from the last backwards (each step's weights carry the
        factor the next one wants on its x2), and the first step's factor mu."""
        frozen: list[_FrozenStep] = []
        m: Tensor | None = None  # None: the last step stores z itself
        for index in reversed(range(len(steps))):
            step = steps[index]
            first, _, second = step.subnet
            c1, c2 = step.splits
            g = step.scale().detach().reshape(1, -1, 1, 1)
            o = step.global_offset.detach().reshape(1, -1, 1, 1)
            if m is None:
                m = torch.ones_like(g)
            m1, m2 = m[:, :c1], m[:, c1:]
            shift = (0.1 * m2 * g[:, c1:]).reshape(-1)
            w2, b2 = second.weight.detach(), second.bias.detach()
            frozen.append(
                _FrozenStep(
                    w1=first.weight.detach().clone(),
                    b1=first.bias.detach().clone(),
                    w2=torch.cat((w2[:c2] * 0.2, w2[c2:] * shift.reshape(-1, 1, 1, 1))),
                    b2=torch.cat((b2[:c2] * 0.2, b2[c2:] * shift + (m2 * o[:, c1:]).reshape(-1))),
                    padding=first.padding,
                    twice_clamp=2.0 * float(step.clamp),
                    x1_scale=m1 * g[:, :c1],
                    x1_offset=m1 * o[:, :c1],
                    perm=None if index == len(steps) - 1 else step.perm,
                )
            )
            mu = math.exp(-float(step.clamp)) * m2 * g[:, c1:]
            if index > 0:  # what the step before stores: m[perm[j]] = (1 | mu)[j]
                wanted = torch.cat((torch.ones_like(m1), mu), 1)
                m = torch.empty_like(wanted)
                m[:, steps[index - 1].perm] = wanted
        frozen.reverse()
        return frozen, mu

    @torch.no_grad()
    def __call__(self, features: list[Tensor]) -> list[Tensor]:
        """Latents z per scale (the last step's channel permutation left out)."""
        if self.norms:
            features = [norm(f) for norm, f in zip(self.norms, features, strict=True)]
        else:
            features = [f * s for f, s in zip(features, self.entry_scales, strict=True)]
        return [self._flow(steps, x) for steps, x in zip(self.flows, features, strict=True)]

    @staticmethod
    def _flow(steps: list[_FrozenStep], x: Tensor) -> Tensor:
        for step in steps:
            c1 = step.x1_scale.shape[1]
            half = step.w2.shape[0] // 2
            x1, x2 = x[:, :c1], x[:, c1:]
            hidden = F.conv2d(x1, step.w1, step.b1, padding=step.padding).relu_()
            a = F.conv2d(hidden, step.w2, step.b2, padding=step.padding)
            factor = torch.sigmoid(a[:, :half]).mul_(step.twice_clamp).exp_()
            u = torch.empty_like(x)
            torch.addcmul(step.x1_offset, x1, step.x1_scale, out=u[:, :c1])
            torch.addcmul(a[:, half:], x2, factor, out=u[:, c1:])
            x = u if step.perm is None else u.index_select(1, step.perm)
        return x


def port_reference_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an anomalib or FF-REF FastFlow state dict to ``FastFlowModel``.

    anomalib's ``fast_flow_blocks`` and FF-REF's ``nf_flows`` become ``flows``; anomalib
    versions that pad with ZeroPad2d put the subnet convs at indices 1 and 4 (0 and 2 here).
    The backbone (``feature_extractor.*``) is not part of the model and is left out.
    """
    ported: dict[str, Tensor] = {}
    padded = any(re.search(r"\.subnet\.4\.", k) for k in state)
    for key, value in state.items():
        if key.startswith("feature_extractor."):
            continue
        key = re.sub(r"^(fast_flow_blocks|nf_flows)\.", "flows.", key)
        if padded:
            key = re.sub(r"\.subnet\.1\.", ".subnet.0.", key)
            key = re.sub(r"\.subnet\.4\.", ".subnet.2.", key)
        ported[key] = value
    return ported


def _shapes(context: MethodContext, layers: list[str]) -> list[tuple[int, int, int]]:
    return [(context.channels[k], *context.shapes[k]) for k in layers]


@register_method("fastflow")
class FastFlow(Method):
    """FastFlow with FF-REF's (``original``) or anomalib's per-backbone defaults.

    The references differ in weights, resnet18's kernels, the transformers' flow size and
    whether the last incomplete training batch is dropped (``drop_last``); docs/methods.md
    lists them with the files they come from.
    """

    Settings = FastFlowSettings

    def __init__(self, settings: FastFlowSettings, context: MethodContext) -> None:
        super().__init__(settings, context)
        self.layers = self.needs(context.backbone, settings)
        self.history: list[float] = []
        self._scoring = Snapshot(FrozenFlows)
        generator = torch.Generator().manual_seed(context.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            self._model = FastFlowModel(
                _shapes(context, self.layers),
                settings.flow_steps,
                settings.hidden_ratio,
                settings.conv3x3_only,
                layer_norm=backbone_spec(context.backbone).kind == "cnn",
                generator=generator,
            ).to(self.device)

    @property
    def model(self) -> nn.Module:
        return self._model

    @classmethod
    def default_settings(cls, backbone: str, reference: str) -> FastFlowSettings:
        kind = backbone_spec(backbone).kind
        drop_last = reference == "original"
        if reference == "original" and backbone in _ORIGINAL:
            size, steps, ratio, only3 = _ORIGINAL[backbone]
            return FastFlowSettings(size, steps, ratio, only3, drop_last=drop_last)
        size = backbone_spec(backbone).native_input if kind == "vit" else 256
        return FastFlowSettings(input_size=size, drop_last=drop_last)

    @classmethod
    def needs(cls, backbone: str, settings: Any) -> list[str]:
        if backbone_spec(backbone).kind == "cnn":
            return ["layer1", "layer2", "layer3"]
        if backbone not in _VIT_BLOCK:
            known = ", ".join(_VIT_BLOCK)
            raise BenchError(f"fastflow supports the transformers {known}; got '{backbone}'")
        return [f"blocks.{_VIT_BLOCK[backbone]}"]

    @classmethod
    def preprocess(cls, backbone: str, reference: str, settings: Any) -> Preprocess:
        return Preprocess((settings.input_size, settings.input_size), None, "bilinear")

    @classmethod
    def weights_provenance(cls, backbone: str, reference: str) -> str:
        return "timm-0.5.4" if reference == "original" else "timm"

    def fit(self, train: FeatureSource) -> None:
        """Adam on the NLL; one host read per epoch (the epoch loss for the bar and early stop)."""
        s = self.settings
        model = self._model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # Plain Adam with L2 in the gradient, as both references; the fused kernel is the same
        # update in one pass (it differs from the loop version only in the last bit) and
        # halves the optimizer's share of a step.
        optimizer = torch.optim.Adam(
            params, lr=s.lr, weight_decay=s.weight_decay, fused=self.device.type in ("cpu", "cuda")
        )
        generator = torch.Generator().manual_seed(self.context.seed)
        if train.num_batches(s.batch_size, s.drop_last) == 0:
            raise BenchError(
                f"fastflow: {len(train)} training images give no full batch of {s.batch_size}; "
                "lower fastflow.batch_size or set fastflow.drop_last=false"
            )
        self._scoring.drop()  # fused Adam steps leave the version counters unchanged
        best, stale = math.inf, 0
        bar = tqdm(
            range(s.epochs), desc="fastflow", unit="epoch", disable=not self.context.progress
        )
        for epoch in bar:
            total = torch.zeros((), device=self.device)
            count = 0
            for batch in train.batches(s.batch_size, True, generator, s.drop_last):
                features = [batch[k] for k in self.layers]
                optimizer.zero_grad(set_to_none=True)
                loss = backward_in_parts(
                    lambda part, size: fastflow_loss(*model(part), batch_size=size),
                    params,
                    features,
                )
                optimizer.step()
                n = features[0].shape[0]
                total += loss * n
                count += n
            epoch_loss = float(total) / count
            self.history.append(epoch_loss)
            bar.set_postfix(loss=f"{epoch_loss:.4g}")
            self.epoch_done(epoch + 1)
            self._scoring.drop()  # an evaluation may have built it from this epoch's weights
            if s.early_stop_patience > 0:
                if epoch_loss < best - s.early_stop_min_delta:
                    best, stale = epoch_loss, 0
                else:
                    stale += 1
                    if stale >= s.early_stop_patience:
                        break
        model.eval()

    def additional_parameters(self) -> int:
        """The paper's "additional parameters": the flows alone. The trainable LayerNorm on
        CNN features is FF-REF's addition (docs/fastflow_parameters.md)."""
        return sum(p.numel() for p in self._model.flows.parameters() if p.requires_grad)

    @torch.no_grad()
    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self._model.training:  # eval() walks all 132 modules: 0.23 ms of a 46 ms batch of 1
            self._model.eval()
        flows = self._scoring.get(self._model)
        inputs = [features[k].to(self.device) for k in self.layers]
        # An image's map does not depend on the others in its batch. On the CPU the flows run
        # on cache-sized parts: resnet18 at 256 on 2 cores, 58 ms an image in 32s, 46 in 8s.
        part = CPU_MICRO_BATCH if self.device.type == "cpu" else inputs[0].shape[0]
        maps = torch.cat(
            [
                anomaly_map(flows(list(chunk)), self.context.output_size)
                for chunk in zip(*(x.split(part) for x in inputs), strict=True)
            ]
        )
        return maps.amax(dim=(1, 2)), maps


register_variant("fastflow-3x3", FastFlow, conv3x3_only=True)
register_variant("fastflow-alt", FastFlow, conv3x3_only=False)


def count_trainable(
    backbone: str, settings: FastFlowSettings, layer_norm: bool | None = None
) -> dict[str, int]:
    """Trainable parameters of the flows and LayerNorms, from known feature shapes only.

    Built on the meta device: no memory, no backbone, no weights.
    """
    if backbone not in KNOWN_FEATURES:
        raise BenchError(f"no known feature shapes for '{backbone}'")
    size = settings.input_size
    shapes = [(c, size // stride, size // stride) for c, stride in KNOWN_FEATURES[backbone]]
    if layer_norm is None:
        layer_norm = backbone_spec(backbone).kind == "cnn"
    with torch.device("meta"):
        model = FastFlowModel(
            shapes, settings.flow_steps, settings.hidden_ratio, settings.conv3x3_only, layer_norm
        )

    def trainable(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    flows, norms = trainable(model.flows), trainable(model.norms)
    return {"flows": flows, "norms": norms, "total": flows + norms}
