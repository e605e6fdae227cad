"""Cost figures of a cell: parameters, FLOPs, latency, throughput, peak memory, train time.

Every figure is measured the same way for every method, on random input of the cell's
size, so ``bench run`` (after a real fit) and ``bench speed`` (untrained, no dataset)
give comparable numbers. docs/profiling.md says what each column means and what the
FLOP counter misses; the report reads these columns by name.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from bench.datasets.base import cache_dir
from bench.errors import BenchError
from bench.extractor import FeatureExtractor
from bench.methods.base import Method

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class ProfileSettings:
    """How long to measure, which bounds what profiling adds to a cell.

    Each latency series (batch 1) is ``warmup`` untimed calls, then ``repeats`` timed ones.
    Throughput calls carry ``throughput_batch`` images each, so their series take one
    warm-up call and a quarter as many timed calls (at least one).
    """

    repeats: int = 20
    warmup: int = 2
    throughput_batch: int = 32

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise BenchError(
                f"--profile-repeats (bench speed: --repeats) {self.repeats}: give at least 1"
            )
        if self.warmup < 0:
            raise BenchError(
                f"--profile-warmup (bench speed: --warmup) {self.warmup}: give 0 or more"
            )
        if self.throughput_batch < 1:
            raise BenchError(f"--throughput-batch {self.throughput_batch}: must be at least 1")

    @property
    def throughput_repeats(self) -> int:
        return math.ceil(self.repeats / 4)

    @property
    def throughput_warmup(self) -> int:
        return min(self.warmup, 1)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """The CPU kernel of scaled_dot_product_attention, counted like the CUDA ones."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _onednn_linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """bench.kernels' oneDNN linear layers, counted as aten.linear would be."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


_EXTRA_FLOP_RULES = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
}
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _EXTRA_FLOP_RULES[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call by PyTorch's FlopCounterMode (2 per multiply-add).

    It counts matrix products and convolutions only (biases, elementwise maths,
    normalisation, interpolation and gathers count 0); attention on CPU and the oneDNN
    linear layers of bench.kernels are added here so every device counts the same.
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_RULES) as mode:
        fn()
    return int(mode.get_total_flops())


def synchroniser(device: torch.device) -> Callable[[], None]:
    """Waits for queued kernels, so a timer read after it covers the work before it."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_calls(
    fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None]
) -> list[float]:
    """Seconds per call of ``repeats`` calls after ``warmup`` untimed ones."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of a non-empty list."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class PeakMemory:
    """Peak memory from construction to ``read``.

    CUDA: ``max_memory_allocated`` after a reset (tensors only, not the caching pool).
    CPU: the process's peak resident set size. On Linux the kernel's peak (VmHWM) is reset
    at construction, so the figure covers this span only (scope "span"); elsewhere it is
    ``ru_maxrss``, the peak of the whole process so far (scope "process").
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.scope = "span"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif not _reset_peak_rss():
            self.scope = "process"

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            return {
                "peak_memory_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "peak_memory_kind": "cuda_max_allocated",
                "peak_memory_scope": self.scope,
            }
        peak = _peak_rss_kib() if self.scope == "span" else None
        if peak is None:
            self.scope = "process"
            peak = _ru_maxrss_kib()
        return {
            "peak_memory_mb": peak / 1024,
            "peak_memory_kind": "cpu_peak_rss",
            "peak_memory_scope": self.scope,
        }


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets the process's peak RSS."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _peak_rss_kib() is not None


def _peak_rss_kib() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_kib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else float(peak)  # bytes on macOS


def parameter_dtype(module: nn.Module) -> str:
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def random_images(extractor: FeatureExtractor, batch: int, device: torch.device) -> Tensor:
    """Normalised-looking input of the extractor's size; a fixed local generator leaves the
    global RNG (and so the rest of the cell) untouched."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, *extractor.input_size, generator=generator).to(device)


def method_size(method: Method) -> dict[str, int]:
    """Trainable parameters, the paper's "additional parameters" (FastFlow: flows without
    the LayerNorm) and the bytes of the model kept for testing (PaDiM: its Gaussians)."""
    return {
        "params_head": method.trainable_parameters(),
        "params_additional": method.additional_parameters(),
        "model_bytes": method.model_bytes(),
    }


def profile_inference(
    method: Method,
    extractor: FeatureExtractor,
    settings: ProfileSettings,
) -> dict[str, Any]:
    """Parameters, FLOPs per image, latency and throughput: head alone and end to end.

    The head is ``predict_batch`` on features computed beforehand (the "additional" cost
    of the FastFlow paper); end to end is image tensor -> extractor -> ``predict_batch``.
    """
    device = method.device
    sync = synchroniser(device)
    single = random_images(extractor, 1, device)
    batch = random_images(extractor, settings.throughput_batch, device)
    with torch.no_grad():
        single_features = extractor(single)
        batch_features = extractor(batch)

    def head_single() -> Any:
        return method.predict_batch(single_features)

    def head_batch() -> Any:
        return method.predict_batch(batch_features)

    def e2e_single() -> Any:
        return method.predict_batch(extractor(single))

    def e2e_batch() -> Any:
        return method.predict_batch(extractor(batch))

    row: dict[str, Any] = {
        **method_size(method),
        "params_backbone": count_parameters(extractor),
        "flops_head": count_flops(head_single),
        "flops_backbone": count_flops(lambda: extractor(single)),
        "throughput_batch": settings.throughput_batch,
        "profile_repeats": settings.repeats,
        "profile_warmup": settings.warmup,
        "dtype": parameter_dtype(extractor),
    }
    for name, fn in (("head", head_single), ("e2e", e2e_single)):
        times = time_calls(fn, settings.repeats, settings.warmup, sync)
        row[f"latency_{name}_ms"] = 1000 * statistics.median(times)
        row[f"latency_{name}_ms_p95"] = 1000 * percentile(times, 95)
    for name, fn in (("head", head_batch), ("e2e", e2e_batch)):
        times = time_calls(fn, settings.throughput_repeats, settings.throughput_warmup, sync)
        row[f"throughput_{name}_ips"] = settings.throughput_batch / statistics.median(times)
    return row


def train_seconds_per_epoch(method: Method, fit_seconds: float) -> float | None:
    """Fit seconds per pass over the training set; None for methods that do not train.

    Passes = epochs actually run (the method's per-epoch ``history`` when it keeps one,
    so early stopping counts) times ``sub_epochs`` where the reference has them (CFLOW-AD
    ``original``: one meta-epoch is 8 passes).
    """
    epochs = getattr(method.settings, "epochs", None)
    if epochs is None:
        return None
    history = getattr(method, "history", None)
    run = len(history) if history else epochs
    passes = run * getattr(method.settings, "sub_epochs", 1)
    return fit_seconds / passes if passes else None


def cell_costs(
    method: Method,
    extractor: FeatureExtractor,
    settings: ProfileSettings | None,
    peak: PeakMemory,
    fit_seconds: float,
) -> dict[str, Any]:
    """The cost columns of a trained cell. Peak memory is read first, so it covers the
    cell's own work (data, features, fit, test) and not the profile's batches."""
    costs: dict[str, Any] = {
        **peak.read(),
        "train_seconds_per_epoch": train_seconds_per_epoch(method, fit_seconds),
        **method_size(method),
        "params_backbone": count_parameters(extractor),
        "dtype": parameter_dtype(extractor),
    }
    if settings is None:
        return costs
    try:
        costs.update(profile_inference(method, extractor, settings))
    except RuntimeError as exc:  # e.g. out of memory at the throughput batch
        # The cell's accuracy stands; its speed figures stay absent, with the reason.
        costs["profile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        warnings.warn(
            f"profiling failed ({costs['profile_error']}); lower --throughput-batch",
            stacklevel=2,
        )
        if method.device.type == "cuda":
            torch.cuda.empty_cache()
    return costs


def _machine_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"{name}|{device.type}|threads {torch.get_num_threads()}|torch {torch.__version__}"


def peak_gflops(device: torch.device, seconds: float = 0.5, size: int = 1024) -> float:
    """This machine's dense float32 matrix-product rate: the yardstick a method's achieved
    GFLOP/s is read against. Measured once per (processor, device, threads, torch) with
    repeated ``size``-square products for about ``seconds``, then cached on disk."""
    key = _machine_key(device)
    path = cache_dir() / "peak_gflops.json"
    cached: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(path.read_text())
    if key in cached:
        return cached[key]
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = math.inf
    deadline = time.perf_counter() + seconds
    for _ in range(3):  # warm-up
        a @ b
    sync()
    while time.perf_counter() < deadline or best == math.inf:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    rate = 2 * size**3 / best / 1e9
    cached[key] = rate
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    return rate


def achieved_gflops(row: dict[str, Any]) -> float | None:
    """End-to-end FLOPs per image times images per second at the throughput batch."""
    flops = [row.get("flops_head"), row.get("flops_backbone")]
    ips = row.get("throughput_e2e_ips")
    if ips is None or any(f is None for f in flops):
        return None
    return sum(flops) * ips / 1e9
