"""bench.kernels: the oneDNN paths compute what the plain PyTorch layers compute, and are
chosen where the CPU has AVX-512."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from bench import kernels
from bench.errors import BenchError
from bench.kernels import (
    FrozenReluMlp,
    ReluMlp,
    choose_backend,
    constant_linear,
    onednn_applies,
    permute_columns,
)


@pytest.fixture(params=["onednn", "default"])
def backend(request, monkeypatch) -> str:
    """Each test runs on both paths, whichever this CPU would choose."""
    if request.param == "onednn" and kernels._LINEAR is None:
        pytest.skip("this PyTorch build has no oneDNN linear op")
    monkeypatch.setattr(kernels, "LINEAR_BACKEND", request.param)
    assert onednn_applies(torch.zeros(1)) == (request.param == "onednn")
    return request.param


def test_onednn_where_the_cpu_has_avx512_unless_told() -> None:
    assert choose_backend("auto", True, "AVX512") == "onednn"
    assert choose_backend("auto", True, "AVX512", "AuthenticAMD") == "onednn"
    assert choose_backend("auto", True, "AVX512", "GenuineIntel") == "default"  # MKL: AVX-512
    assert choose_backend("onednn", True, "AVX512", "GenuineIntel") == "onednn"
    assert choose_backend("auto", True, "AVX2") == "default"
    assert choose_backend("onednn", True, "AVX2") == "onednn"
    assert choose_backend("DEFAULT", True, "AVX512") == "default"
    assert choose_backend("onednn", False, "AVX512") == "default"  # the build lacks the op
    with pytest.raises(BenchError, match="FLOWAD_LINEAR_BACKEND=mkl: expected one of auto"):
        choose_backend("mkl", True, "AVX2")


def plain_copy(mlp: ReluMlp) -> nn.Sequential:
    """The same weights in PyTorch's own layers."""
    (hidden, dims_in), (dims_out, _) = mlp[0].weight.shape, mlp[2].weight.shape
    plain = nn.Sequential(nn.Linear(dims_in, hidden), nn.ReLU(), nn.Linear(hidden, dims_out))
    plain.to(mlp[0].weight.dtype).load_state_dict(mlp.state_dict())
    return plain


@pytest.mark.parametrize("rows", [1, 64, 300])
def test_relu_mlp_matches_sequential_forward_and_backward(rows: int, backend: str) -> None:
    torch.manual_seed(0)
    mlp = ReluMlp(24, 48, 16)
    plain = plain_copy(mlp)
    assert set(mlp.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    x = torch.randn(rows, 24, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_(True)
    grad = torch.randn(rows, 16)
    out, expected = mlp(x), plain(x_plain)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(mlp.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_relu_mlp_trains_on_input_that_needs_no_gradient(backend: str) -> None:
    torch.manual_seed(0)
    mlp = ReluMlp(6, 12, 4)
    plain = plain_copy(mlp)
    x = torch.randn(5, 6)
    mlp(x).square().sum().backward()
    plain(x).square().sum().backward()
    for p, q in zip(mlp.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_relu_mlp_float64_takes_the_plain_path() -> None:
    torch.manual_seed(0)
    mlp = ReluMlp(6, 12, 4).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.equal(mlp(x), plain_copy(mlp).double()(x))


@pytest.mark.parametrize("scale", [1.0, 0.1, "per-output"])
def test_frozen_mlp_folds_its_output_scale(scale, backend: str) -> None:
    torch.manual_seed(0)
    mlp = ReluMlp(16, 32, 10)
    factor = torch.linspace(0.1, 2.0, 10) if scale == "per-output" else torch.tensor(scale)
    frozen = FrozenReluMlp(mlp, factor if scale == "per-output" else scale)
    assert frozen.onednn == (backend == "onednn")
    x = torch.randn(33, 16)
    with torch.no_grad():
        expected = plain_copy(mlp)(x) * factor
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a snapshot: later training does not reach it
        for parameter in mlp.parameters():
            parameter.add_(1.0)
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-6)


def test_permute_columns_is_exact_both_ways() -> None:
    x = torch.randn(9, 7, requires_grad=True)
    index = torch.randperm(7)
    out = permute_columns(x, index, index.argsort())
    assert torch.equal(out, x[:, index])
    grad = torch.randn(9, 7)
    out.backward(grad)
    expected = torch.zeros(9, 7)
    expected[:, index] = grad
    assert torch.equal(x.grad, expected)


def test_constant_linear_matches_f_linear(backend: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 12, requires_grad=True)
    weight = torch.linalg.qr(torch.randn(12, 12))[0]
    out = constant_linear(x, weight)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-6)
    grad = torch.randn(40, 12)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-5, atol=1e-6)


def test_flop_counts_do_not_depend_on_the_path(backend: str) -> None:
    from bench.profiling import count_flops

    mlp = ReluMlp(10, 20, 6)
    x = torch.randn(7, 10)
    expected = 2 * 7 * (10 * 20 + 20 * 6)
    assert count_flops(lambda: mlp(x)) == expected
    assert count_flops(lambda: FrozenReluMlp(mlp)(x)) == expected
    assert count_flops(lambda: mlp.double()(x.double())) == expected


def test_snapshot_is_rebuilt_only_when_the_weights_change() -> None:
    layer = nn.Linear(3, 2)
    builds: list[Tensor] = []

    def build(module: nn.Module) -> Tensor:
        builds.append(module.weight.detach().clone())
        return builds[-1]

    snapshot = kernels.Snapshot(build)
    first = snapshot.get(layer)
    assert snapshot.get(layer) is first and len(builds) == 1
    layer.load_state_dict({"weight": torch.ones(2, 3), "bias": torch.zeros(2)})
    assert torch.equal(snapshot.get(layer), torch.ones(2, 3)) and len(builds) == 2
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(snapshot.get(layer), torch.full((2, 3), 2.0)) and len(builds) == 3
    # a fused optimiser step moves the weights without a version bump: hence ``drop``
    layer.weight.grad, layer.bias.grad = torch.ones(2, 3), torch.ones(2)
    torch.optim.Adam(layer.parameters(), lr=0.5, fused=True).step()
    assert snapshot.get(layer) is builds[-1] and len(builds) == 3
    snapshot.drop()
    assert torch.equal(snapshot.get(layer), layer.weight.detach()) and len(builds) == 4


def test_weights_key_sees_every_way_the_weights_change() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    model.register_buffer("perm", torch.arange(2))
    key = kernels.weights_key(model)
    assert kernels.weights_key(model) == key
    changes = [
        lambda: setattr(model[0], "weight", nn.Parameter(torch.ones(2, 3))),
        lambda: setattr(model, "perm", torch.tensor([1, 0])),
        lambda: model.__setitem__(1, nn.LayerNorm(2)),
        lambda: model[1].bias.data.add_(1),  # untracked: no key change
        lambda: model.double(),
        lambda: model.load_state_dict(model.state_dict()),
    ]
    seen = [key]
    for change in changes:
        change()
        seen.append(kernels.weights_key(model))
    distinct = [a != b for a, b in zip(seen, seen[1:], strict=False)]
    assert distinct == [True, True, True, False, True, True]
    # another module's registrations leave this key as it was
    nn.Linear(4, 4)
    assert kernels.weights_key(model) == seen[-1]
