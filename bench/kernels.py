"""Fast paths for the flows' dense layers, channel permutations and CPU training steps,
same mathematics.

PyTorch sends float32 ``F.linear`` on the CPU to MKL's sgemm, which takes its AVX2 code on
AMD processors even where they have AVX-512: on the 2-core AVX-512 EPYC (Zen 5) it reaches
140-220 GFLOP/s where oneDNN (the library behind PyTorch's CPU convolutions) reaches
270-480 GFLOP/s on CFLOW-AD's shapes. Where the CPU has no AVX-512 both run AVX2 code and
MKL is the faster one: on the 2-core AVX2 EPYC, a CFLOW-AD subnet's training step (256
rows) runs at 112-151 GFLOP/s on MKL against 82-108 on oneDNN, and scoring (4096 rows) at
163-171 against 126-144. On Intel processors MKL takes its AVX-512 code, and on a 2-core
AVX-512 Xeon a CFLOW-AD training step (64 fibers) ran 20% faster on MKL and a whole
CFLOW-AD run 3% faster. So the subnets call oneDNN directly where the CPU has AVX-512 and
is not Intel's, and take PyTorch's own path elsewhere; ``LINEAR_BACKEND`` says which, and
the environment variable ``FLOWAD_LINEAR_BACKEND`` (``auto``, ``onednn`` or ``default``)
overrides the choice. The two differ only in summation order (about 1e-6 relative).

Column permutations are gathers with a precomputed inverse: advanced indexing along dim 1
is about eight times slower than ``gather`` and its backward is a scatter.

Training batches split over CPU threads: PyTorch splits every CPU operation over all its
threads, and on the flows' small convolutions that scales badly (on the 2-core AVX2 EPYC a
FastFlow training step of 32 images at 256 px ran 1.45 times faster on two threads than on
one). Each image's loss is independent of the others, so ``backward_in_parts`` runs a
batch's halves on two threads that each take half the torch threads and sums the halves'
gradients in a fixed order: reproducible for a given split, and different from the
unsplit step only in rounding. ``cpu_workers()`` gives the count; the environment variable
``FLOWAD_CPU_WORKERS`` (``auto``, or a count; 1 turns the split off) overrides it.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

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


def _read_cpu_vendor() -> str:
    """The processor's vendor string (``GenuineIntel``, ``AuthenticAMD``), or "" if unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


def choose_backend(choice: str, available: bool, cpu_capability: str, vendor: str = "") -> str:
    """``onednn`` or ``default`` (PyTorch's own path) for float32 CPU dense layers: oneDNN
    only where MKL would run AVX2 code on an AVX-512 processor (any but Intel's)."""
    choice = choice.lower()
    if choice not in BACKENDS:
        raise BenchError(
            f"environment variable {BACKEND_ENV}={choice}: expected one of {', '.join(BACKENDS)}"
        )
    if not available:
        return "default"
    if choice == "auto":
        avx512 = "AVX512" in cpu_capability.upper()
        return "onednn" if avx512 and vendor != "GenuineIntel" else "default"
    return choice


_LINEAR = _onednn_linear_op()
# This processor's vendor, read once: it chooses the backend and run.json records it.
CPU_VENDOR = _read_cpu_vendor()
# What float32 CPU dense layers run on in this process (run.json records it with the hardware).
LINEAR_BACKEND = choose_backend(
    os.environ.get(BACKEND_ENV, "auto"),
    _LINEAR is not None,
    torch.backends.cpu.get_cpu_capability(),
    CPU_VENDOR,
)
# Rows per product that packed weights are laid out for; any row count gives the same result.
_PACK_ROWS_HINT = 4096


def onednn_applies(x: Tensor) -> bool:
    """True where the oneDNN path runs: float32 CPU tensors, where this CPU prefers it."""
    return LINEAR_BACKEND == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Tensor:
    """x @ weight.T (+ bias) (then ReLU) with oneDNN; ``weight`` may be a transposed view."""
    return _LINEAR(x, weight, bias, "relu" if relu else "none", [], "")


S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")


# Every parameter, buffer or submodule assigned anywhere in the process counts one, so a
# module's list of tensors can be kept until something is registered again.
_registrations = 0


def _count_registration(*_: object) -> None:
    global _registrations
    _registrations += 1


nn.modules.module.register_module_parameter_registration_hook(_count_registration)
nn.modules.module.register_module_buffer_registration_hook(_count_registration)
nn.modules.module.register_module_module_registration_hook(_count_registration)
_held_tensors: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _state_tensors(module: nn.Module) -> list[Tensor]:
    """``module``'s parameters and buffers; walking the module tree is most of the cost of a
    check (0.24 ms of 0.29 for FastFlow's 132 modules), so the list is kept until anything
    registers a parameter, buffer or submodule."""
    held = _held_tensors.get(module)
    if held is None or held[0] != _registrations:
        held = (_registrations, [*module.parameters(), *module.buffers()])
        _held_tensors[module] = held
    return held[1]


def weights_key(module: nn.Module) -> tuple:
    """Identifies the current weights of ``module``, to tell when a snapshot is stale.

    It changes when a parameter, buffer or submodule is assigned, when one is moved to
    another device or dtype, and when one is modified in place by a tracked operation
    (``load_state_dict``, ``copy_``). Fused optimiser steps do not move the version
    counters: code that steps one must drop its snapshots itself. Cheap enough for every
    batch-1 call (0.05 ms for FastFlow's flows against 0.29 walking the modules).
    """
    return tuple((t.device, t.data_ptr(), t._version) for t in _state_tensors(module))


class Snapshot(Generic[S]):
    """A scoring copy of a model (folded constants, packed weights), built once per weights.

    Building one costs tens of milliseconds for the larger flows, too much per batch, so it is
    kept until ``weights_key`` changes. Fused optimiser steps leave that key alone: a training
    loop calls ``drop`` after its steps and after each evaluation it allows.
    """

    def __init__(self, build: Callable[[nn.Module], S]) -> None:
        self._build = build
        self._held: tuple[tuple, S] | None = None

    def get(self, module: nn.Module) -> S:
        """The copy of ``module``'s current weights, rebuilt when they changed."""
        key = weights_key(module)
        if self._held is None or self._held[0] != key:
            self._held = (key, self._build(module))
        return self._held[1]

    def drop(self) -> None:
        """Forget the copy; the next ``get`` builds a new one."""
        self._held = None


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


WORKERS_ENV = "FLOWAD_CPU_WORKERS"


def choose_workers(choice: str, threads: int) -> int:
    """Worker threads for ``threads`` torch threads: two where there are two or more."""
    choice = choice.strip().lower()
    if choice == "auto":
        return 2 if threads >= 2 else 1
    if not choice.isdigit() or int(choice) < 1:
        raise BenchError(
            f"environment variable {WORKERS_ENV}={choice}: expected auto or a positive count"
        )
    return min(int(choice), max(threads, 1))


def cpu_workers() -> int:
    """Worker threads a CPU batch is split over in this process, at today's thread count."""
    return choose_workers(os.environ.get(WORKERS_ENV, "auto"), torch.get_num_threads())


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools() -> None:
    """A forked child has none of its parent's threads: it starts pools of its own."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pools)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="flowad-cpu")
        return _POOLS[workers]


def map_parts(function: Callable[[T], R], parts: Sequence[T]) -> list[R]:
    """``[function(p) for p in parts]``, the parts spread over ``cpu_workers()`` threads that
    each use an equal share of the torch threads; results in the order of ``parts``."""
    threads = torch.get_num_threads()
    workers = min(cpu_workers(), len(parts))
    if workers <= 1:
        return [function(part) for part in parts]
    share = max(threads // workers, 1)
    grad_enabled = torch.is_grad_enabled()  # thread-local: a caller's no_grad must carry over

    def run(part: T) -> R:
        torch.set_num_threads(share)
        with torch.set_grad_enabled(grad_enabled):
            return function(part)

    try:
        return list(_pool(workers).map(run, parts))
    finally:
        # The OpenMP count is per thread, but MKL's is global: give the caller its own back.
        torch.set_num_threads(threads)


def backward_in_parts(
    loss_of: Callable[[list[Tensor], int | None], Tensor],
    params: list[Tensor],
    inputs: list[Tensor],
) -> Tensor:
    """Add the gradient of a batch's loss to each parameter's ``.grad``, as
    ``loss.backward()`` does; return the loss (detached).

    ``loss_of(part, batch_size)`` is the loss of the images in ``part`` as their share of
    the loss of a batch of ``batch_size`` images, or the batch's own loss when
    ``batch_size`` is None. On the CPU the images of ``inputs`` (tensors with the images
    along dim 0) are split over ``cpu_workers()`` threads and the parts' losses and
    gradients are summed in part order; elsewhere the batch runs whole.
    """
    n = inputs[0].shape[0]
    workers = min(cpu_workers(), n) if inputs[0].device.type == "cpu" else 1
    if workers <= 1:
        loss = loss_of(inputs, None)
        loss.backward()
        return loss.detach()

    def part_gradients(part: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        loss = loss_of(list(part), n)
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    parts = list(zip(*(x.tensor_split(workers) for x in inputs), strict=True))
    results = map_parts(part_gradients, parts)
    loss = results[0][0]
    for part_loss, _ in results[1:]:
        loss = loss + part_loss
    for index, param in enumerate(params):
        total: Tensor | None = None
        for _, part_grads in results:
            grad = part_grads[index]
            if grad is not None:  # None: the parameter did not reach this part's loss
                total = grad if total is None else total + grad
        if total is not None:
            param.grad = total if param.grad is None else param.grad + total
    return loss
