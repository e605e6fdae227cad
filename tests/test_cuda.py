"""The CUDA path: every method fits and scores on a GPU, and a model fitted on the CPU scores
the same there. Skipped where no CUDA device is present (CI has none); run with
``pytest -m cuda`` on a GPU machine."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator

import pytest
import torch
from test_datasets import make_mvtec

import bench
from bench.features import CachedFeatures
from bench.methods.base import Method
from bench.runner.cell import Cell, Environment, build_method
from bench.runner.config import RunConfig
from bench.runner.grid import resolve_settings

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# Small but real settings per built-in method: (input size, --set overrides).
METHODS = {
    "fastflow": (64, {"flow_steps": "2", "batch_size": "4"}),
    "fastflow-3x3": (64, {"flow_steps": "2", "batch_size": "4"}),
    "cflow": (
        64,
        {"coupling_blocks": "2", "condition_vector": "8", "batch_size": "2", "fiber_batch": "8"},
    ),
    "padim": (64, {}),
    "csflow": (128, {"coupling_blocks": "2", "hidden_channels": "32", "batch_size": "4"}),
    "uflow": (64, {"flow_steps": "2", "batch_size": "4"}),
    "msflow": (64, {"sub_epochs": "1", "batch_size": "4"}),
}


@pytest.fixture
def exact_cuda() -> Iterator[None]:
    """TF32 off for the comparison: with it, cuDNN convolutions round inputs to 10-bit
    mantissas and maps differ from the CPU's by ~1e-3 for reasons that are not bugs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _built(method: str) -> tuple[Method, torch.nn.Module, tuple[int, int]]:
    size, overrides = METHODS[method]
    config = RunConfig(methods=[method], input_size=size, epochs=1, set={method: overrides})
    base, resolved = resolve_settings(method, "resnet18", config)
    cell = Cell(method, base, "none", "none", "resnet18", 0, "original", "random", {})
    cell = dataclasses.replace(cell, settings=dataclasses.asdict(resolved))
    built, extractor, pre = build_method(cell, Environment(data_root=None, progress=False))
    return built, extractor, pre.output_size


def _on_cuda(method: Method) -> Method:
    return type(method)(method.settings, dataclasses.replace(method.context, device=CUDA))


def _predict(method: Method, features: dict[str, torch.Tensor], device: torch.device):
    outputs = list(method.predict(CachedFeatures(features, device), batch_size=2))
    scores = torch.cat([s.float().cpu() for s, _ in outputs])
    maps = torch.cat([m.float().cpu() for _, m in outputs])
    return scores, maps


@pytest.mark.parametrize("name", list(METHODS))
def test_cpu_fitted_model_scores_the_same_on_cuda(name: str, exact_cuda) -> None:
    method, extractor, size = _built(name)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(10, 3, *size, generator=gen)
    with torch.no_grad():
        features = {k: v.contiguous() for k, v in extractor(images).items()}
        gpu_features = copy.deepcopy(extractor).to(CUDA)(images.to(CUDA))
    for layer, tensor in features.items():
        torch.testing.assert_close(gpu_features[layer].cpu(), tensor, rtol=1e-4, atol=1e-4)
    train = {k: v[:6] for k, v in features.items()}
    test = {k: v[6:] for k, v in features.items()}
    method.fit(CachedFeatures(train, CPU))
    expected_scores, expected_maps = _predict(method, test, CPU)

    on_gpu = _on_cuda(method)
    on_gpu.load_state_dict(method.state_dict())
    scores, maps = _predict(on_gpu, test, CUDA)
    span = float(expected_maps.max() - expected_maps.min()) or 1.0
    torch.testing.assert_close(maps, expected_maps, rtol=1e-3, atol=1e-3 * span)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-3, atol=1e-3 * span)


@pytest.mark.parametrize("name", list(METHODS))
def test_fit_on_cuda_gives_finite_maps(name: str) -> None:
    method, extractor, size = _built(name)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, *size, generator=gen)
    on_gpu = _on_cuda(method)
    with torch.no_grad():
        features = copy.deepcopy(extractor).to(CUDA)(images.to(CUDA))
    on_gpu.fit(CachedFeatures({k: v[:6] for k, v in features.items()}, CUDA))
    assert all(p.device.type == "cuda" for p in on_gpu.model.parameters())
    scores, maps = _predict(on_gpu, {k: v[6:] for k, v in features.items()}, CUDA)
    assert maps.shape == (2, *size) and scores.shape == (2,)
    assert bool(torch.isfinite(maps).all() and torch.isfinite(scores).all())


def test_bench_run_on_cuda_records_the_gpu(tmp_path) -> None:
    root = tmp_path / "data"
    make_mvtec(root, "bottle", train=4, test={"good": 2, "crack": 2})
    out = tmp_path / "run"
    result = bench.run(
        methods=["fastflow"],
        dataset="mvtec",
        data_root=str(root),
        categories="bottle",
        input_size=64,
        weights="random",
        epochs=1,
        set={"fastflow": {"flow_steps": "2", "batch_size": "2"}},
        device="cuda",
        workers=0,
        out=str(out),
    )
    row = result.results.iloc[0]
    assert row["device"] == "cuda" and row["peak_memory_mb"] > 0
    assert row["latency_head_ms"] > 0
    hardware = json.loads((out / "run.json").read_text())["invocations"][-1]["hardware"]
    assert hardware["gpu"] == torch.cuda.get_device_name(0)
