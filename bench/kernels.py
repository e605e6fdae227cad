"""Fast paths for the flows' dense layers and channel permutations, same mathematics.

PyTorch sends float32 ``F.linear`` on the CPU to MKL's sgemm, which takes its AVX2 code on
AMD processors even where they have AVX-512: on the 2-core AVX-512 EPYC (Zen 5) it reaches
140-220 GFLOP/s where oneDNN (the library behind PyTorch's CPU convolutions) reaches
270-480 GFLOP/s on CFLOW-AD's shapes. Where the CPU has no AVX-512 both run AVX2 code and
MKL is the faster one: on the 2-core AVX2 EPYC, a CFLOW-AD subnet's training step (256
rows) runs at 112-151 GFLOP/s on MKL against 82-108 on oneDNN, and scoring (4096 rows) at
163-171 against 126-144. So the subnets call oneDNN directly where the CPU has AVX-512 and
take PyTorch's own path elsewhere; ``LINEAR_BACKEND`` says which, and the environment
variable ``FLOWAD_LINEAR_BACKEND`` (``auto``, ``onednn`` or ``default``) overrides the choice.
The two differ only in summation order (about 1e-6 relative).

Column permutations are gathers with a precomputed inverse: advanced indexing along dim 1
is about eight times slower than ``gather`` and its backward is a scatter.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from bench.errors import BenchError


def _onednn_linear_op() -> object | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


BACKEND_ENV = "FLOWAD_LINEAR_BACKEND"
BACKENDS = ("auto", "onednn", "default")


def choose_backend(choice: str, available: bool, cpu_capability: str) -> str:
    """``onednn`` or ``default`` (PyTorch's own path) for float32 CPU dense layers."""
    choice = choice.lower()
    if choice not in BACKENDS:
        raise BenchError(
            f"environment variable {BACKEND_ENV}={choice}: expected one of {', '.join(BACKENDS)}"
        )
    if not available:
        return "default"
    if choice == "auto":
        return "onednn" if "AVX512" in cpu_capability.upper() else "default"
    return choice


_LINEAR = _onednn_linear_op()
# What float32 CPU dense layers run on in this process (run.json records it with the hardware).
LINEAR_BACKEND = choose_backend(
    os.environ.get(BACKEND_ENV, "auto"),
    _LINEAR is not None,
    torch.backends.cpu.get_cpu_capability(),
)
# Rows per product that packed weights are laid out for; any row count gives the same result.
_PACK_ROWS_HINT = 4096


def onednn_applies(x: Tensor) -> bool:
    """True where the oneDNN path runs: float32 CPU tensors, where this CPU prefers it."""
    return LINEAR_BACKEND == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Tensor:
    """x @ weight.T (+ bias) (then ReLU) with oneDNN; ``weight`` may be a transposed view."""
    return _LINEAR(x, weight, bias, "relu" if relu else "none", [], "")


def weights_key(module: nn.Module) -> tuple:
    """Identifies the current weights of ``module``, to tell when a snapshot is stale.

    It changes when a parameter or buffer is replaced, moved to another device or modified
    in place by a tracked operation (``load_state_dict``, ``copy_``). Fused optimiser steps
    do not move the version counters: code that steps one must drop its snapshots itself.
    """
    tensors = (*module.parameters(), *module.buffers())
    return tuple((t.device, t.data_ptr(), t._version) for t in tensors)


class _ReluMlp(torch.autograd.Function):
    """Linear -> ReLU -> Linear as one autograd node, all six products on oneDNN."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):  # noqa: ANN001, ANN205
        hidden = _linear(x, w1, b1, relu=True)
        ctx.save_for_backward(x, w1, hidden, w2)
        return _linear(hidden, w2, b2)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, w1, hidden, w2 = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_w2 = _linear(grad_out.t(), hidden.t(), None)
        grad_b2 = grad_out.sum(0)
        grad_hidden = torch.ops.aten.threshold_backward(_linear(grad_out, w2.t(), None), hidden, 0)
        grad_w1 = _linear(grad_hidden.t(), x.t(), None)
        grad_b1 = grad_hidden.sum(0)
        grad_x = _linear(grad_hidden, w1.t(), None) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


class ReluMlp(nn.Sequential):
    """``nn.Sequential(Linear, ReLU, Linear)``, same parameters and state-dict keys, whose
    forward runs on oneDNN for float32 CPU input where ``LINEAR_BACKEND`` is ``onednn`` (and
    as the plain sequence elsewhere)."""

    def __init__(self, dims_in: int, dims_hidden: int, dims_out: int) -> None:
        super().__init__(
            nn.Linear(dims_in, dims_hidden), nn.ReLU(), nn.Linear(dims_hidden, dims_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        first, _, second = self
        if x.dim() == 2 and onednn_applies(x) and first.weight.dtype == torch.float32:
            return _ReluMlp.apply(x, first.weight, first.bias, second.weight, second.bias)
        return second(F.relu(first(x)))


class FrozenReluMlp:
    """A ``ReluMlp`` snapshot for inference whose outputs are multiplied by ``scale``.

    ``scale`` (a number, or one per output) is folded into the output layer, and on oneDNN
    the weights are packed into its blocked layout once (about 7% faster products,
    bit-identical to unpacked). Later changes to ``mlp`` do not reach it.
    """

    def __init__(self, mlp: ReluMlp, scale: float | Tensor = 1.0) -> None:
        first, _, second = mlp
        scale = torch.as_tensor(scale, dtype=second.weight.dtype, device=second.weight.device)
        self.w1, self.b1 = first.weight.detach().clone(), first.bias.detach().clone()
        self.w2 = second.weight.detach() * scale.reshape(-1, 1)
        self.b2 = second.bias.detach() * scale
        self.onednn = onednn_applies(self.w1)
        if self.onednn:
            self.w1 = torch.ops.mkldnn._reorder_linear_weight(self.w1, _PACK_ROWS_HINT)
            self.w2 = torch.ops.mkldnn._reorder_linear_weight(self.w2, _PACK_ROWS_HINT)

    def __call__(self, x: Tensor) -> Tensor:
        if self.onednn:
            return _linear(_linear(x, self.w1, self.b1, relu=True), self.w2, self.b2)
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


class _ConstantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):  # noqa: ANN001, ANN205
        ctx.save_for_backward(weight)
        return _linear(x, weight, None)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (weight,) = ctx.saved_tensors
        return _linear(grad.contiguous(), weight.t(), None), None


def constant_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight.T`` for a fixed ``weight`` (no gradient flows to it), on oneDNN where
    it applies: the flows' dense channel rotations."""
    if x.dim() == 2 and onednn_applies(x) and weight.dtype == torch.float32:
        return _ConstantLinear.apply(x, weight.detach())
    return F.linear(x, weight)


class _PermuteColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, inverse):  # noqa: ANN001, ANN205
        ctx.save_for_backward(inverse)
        return x.gather(1, index.expand(x.shape[0], -1))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (inverse,) = ctx.saved_tensors
        return grad.gather(1, inverse.expand(grad.shape[0], -1)), None, None


def permute_columns(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """``x[:, index]`` for a 2D ``x``, where ``inverse`` is ``index.argsort()``."""
    return _PermuteColumns.apply(x, index, inverse)
