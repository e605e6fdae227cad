"""CFLOW-AD fidelity checks against docs/methods.md (tiny sizes, no reference code)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from bench.errors import BenchError
from bench.features import CachedFeatures
from bench.kernels import WORKERS_ENV
from bench.methods.base import MethodContext
from bench.methods.cflow import (
    CFlow,
    CFlowModel,
    CFlowSettings,
    FrozenDecoder,
    fiber_loss,
    learning_rate,
    log_likelihood,
    positional_encoding_2d,
)
from bench.methods.cflow_decoder import build_decoder

CHANNELS = {"layer2": 8, "layer3": 12, "layer4": 16}
SHAPES = {"layer2": (8, 8), "layer3": (4, 4), "layer4": (2, 2)}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_settings(reference: str, **changes) -> CFlowSettings:
    base = CFlow.default_settings("resnet18", reference)
    small = dict(
        condition_vector=8, coupling_blocks=2, fiber_batch=8, batch_size=4, epochs=1, sub_epochs=1
    )
    return dataclasses.replace(base, **{**small, **changes})


def context(reference: str, seed: int = 0) -> MethodContext:
    return MethodContext(
        backbone="resnet18",
        reference=reference,
        channels=CHANNELS,
        shapes=SHAPES,
        output_size=(32, 32),
        device=torch.device("cpu"),
        seed=seed,
        progress=False,
    )


def random_features(n: int, seed: int = 1) -> CachedFeatures:
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(n, c, *SHAPES[k], generator=gen) for k, c in CHANNELS.items()}
    return CachedFeatures(tensors, torch.device("cpu"))


def perturbed_decoder(channels: int, cond: int, soft: bool, blocks: int = 3):
    """A float64 decoder whose global affine parameters are away from their identity init."""
    settings = CFlowSettings(condition_vector=cond, coupling_blocks=blocks, permute_soft=soft)
    torch.manual_seed(0)
    decoder = build_decoder(
        channels,
        settings.coupling_blocks,
        settings.condition_vector,
        settings.clamp_alpha,
        settings.permute_soft,
        torch.Generator().manual_seed(0),
    ).double()
    with torch.no_grad():
        for block in decoder.module_list:
            block.global_scale.add_(torch.randn_like(block.global_scale))
            block.global_offset.add_(torch.randn_like(block.global_offset))
    return decoder


@pytest.mark.parametrize("soft", [False, True])
def test_decoder_is_invertible_given_its_condition(soft: bool) -> None:
    decoder = perturbed_decoder(12, 8, soft)
    x = torch.randn(5, 12, dtype=torch.float64)
    c = torch.randn(5, 8, dtype=torch.float64)
    z, log_det = decoder(x, [c])
    back, log_det_rev = decoder(z, [c], rev=True)
    # A rotation stored in float32 (as FrEIA stores it) has a transpose that is its inverse
    # only to float32 precision; a permutation's is exact.
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5 if soft else 1e-10)
    torch.testing.assert_close(log_det_rev, -log_det, rtol=0, atol=1e-6 if soft else 1e-10)


@pytest.mark.parametrize("soft", [False, True])
def test_log_det_matches_brute_force_jacobian(soft: bool) -> None:
    decoder = perturbed_decoder(6, 4, soft)
    x = torch.randn(3, 6, dtype=torch.float64)
    c = torch.randn(3, 4, dtype=torch.float64)
    _, log_det = decoder(x, [c])
    for i in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda row, i=i: decoder(row.unsqueeze(0), [c[i : i + 1]])[0][0], x[i]
        )
        _, logabs = torch.linalg.slogdet(jac)
        # The float32 rotation's determinant is 1 only to float32 precision.
        torch.testing.assert_close(log_det[i], logabs, rtol=0, atol=1e-6 if soft else 1e-9)


def test_gather_permutation_equals_one_hot_product() -> None:
    decoder = perturbed_decoder(10, 4, soft=False).float()
    x, c = torch.randn(7, 10), torch.randn(7, 4)
    z, log_det = decoder(x, [c])
    for block in decoder.module_list:
        assert block.perm_index is not None
        block.perm_index = None  # fall back to FrEIA's dense product
    z_dense, log_det_dense = decoder(x, [c])
    assert torch.equal(z, z_dense) and torch.equal(log_det, log_det_dense)


def freia_twin(decoder):
    """The same weights in FrEIA's own AllInOneBlocks with nn.Sequential subnets."""
    from FrEIA.framework import SequenceINN
    from FrEIA.modules import AllInOneBlock

    first = decoder.module_list[0]
    channels, cond = first.in_channels, first.subnet[0].in_features - first.splits[0]
    twin = SequenceINN(channels)
    for _ in decoder.module_list:
        twin.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(cond,),
            subnet_constructor=lambda i, o: torch.nn.Sequential(
                torch.nn.Linear(i, 2 * i), torch.nn.ReLU(), torch.nn.Linear(2 * i, o)
            ),
            affine_clamping=first.clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=False,
        )
    twin.load_state_dict(decoder.state_dict())
    return twin.to(first.global_scale.dtype)


@pytest.mark.parametrize("soft", [False, True])
def test_coupling_blocks_train_as_freia_does(soft: bool) -> None:
    """Our fiber path (oneDNN subnets, gathers) against FrEIA 0.2's forward, in float32:
    outputs, log-determinants and every parameter's gradient."""
    decoder = perturbed_decoder(16, 8, soft).float()
    twin = freia_twin(decoder)
    x, c = torch.randn(40, 16), torch.randn(40, 8)
    grads = []
    for model in (decoder, twin):
        model.zero_grad()
        z, log_det = model(x, [c])
        fiber_loss(z, log_det, 16).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        if model is decoder:
            ours = z.detach(), log_det.detach()
    torch.testing.assert_close(ours[0], z.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], log_det.detach(), rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3 * 6
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("soft", [False, True])
def test_frozen_decoder_scores_as_the_decoder_does(soft: bool) -> None:
    decoder = perturbed_decoder(16, 8, soft).float()
    x, c = torch.randn(50, 16), torch.randn(50, 8)
    with torch.no_grad():
        z, log_det = decoder(x, [c])
    z_frozen, log_det_frozen = FrozenDecoder(decoder)(x, c)
    # z comes without the last permutation, which leaves |z| and the likelihood unchanged
    torch.testing.assert_close(z_frozen.pow(2).sum(1), z.pow(2).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_det_frozen, log_det, rtol=1e-5, atol=1e-5)
    last = decoder.module_list[-1]
    if not soft:
        torch.testing.assert_close(z_frozen[:, last.perm_index], z, rtol=1e-5, atol=1e-5)


def test_scoring_snapshot_follows_every_weight_change() -> None:
    settings = tiny_settings("anomalib")
    method = CFlow(settings, context("anomalib"))
    batch = next(random_features(4, seed=2).batches(4))
    untrained = method.predict_batch(batch)[1]
    method.fit(random_features(8))  # fused Adam: version counters do not move
    trained = method.predict_batch(batch)[1]
    assert not torch.allclose(untrained, trained)
    fresh = CFlow(settings, context("anomalib"))
    fresh.load_state_dict(method.state_dict())  # in-place copies into existing tensors
    torch.testing.assert_close(fresh.predict_batch(batch)[1], trained, rtol=0, atol=0)
    fresh.load_state_dict(CFlow(settings, context("anomalib", seed=5)).state_dict())
    assert not torch.allclose(fresh.predict_batch(batch)[1], trained)


def test_positional_encoding_matches_formula() -> None:
    h, w = 5, 7
    p = positional_encoding_2d(128, h, w)
    assert p.shape == (128, h, w)
    ys, xs = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    torch.testing.assert_close(p[0], torch.sin(xs))
    torch.testing.assert_close(p[1], torch.cos(xs))
    torch.testing.assert_close(p[64], torch.sin(ys))
    torch.testing.assert_close(p[65], torch.cos(ys))
    torch.testing.assert_close(p[2], torch.sin(xs * 10000 ** (-2 / 64)))
    torch.testing.assert_close(p[67], torch.cos(ys * 10000 ** (-2 / 64)))


def test_likelihood_and_loss_closed_form() -> None:
    z = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    log_det = torch.tensor([1.5, -0.25])
    c = 4
    expected = [
        c * -0.9189385332046727 - 0.5 * sum(v * v for v in row) + d
        for row, d in zip(z.tolist(), log_det.tolist(), strict=True)
    ]
    torch.testing.assert_close(log_likelihood(z, log_det, c), torch.tensor(expected))
    assert pytest.approx(-0.5 * math.log(2 * math.pi), abs=1e-15) == -0.9189385332046727
    loss = [math.log1p(math.exp(-value / c)) for value in expected]
    torch.testing.assert_close(fiber_loss(z, log_det, c), torch.tensor(loss))


@pytest.mark.parametrize(
    ("channels", "per_layer"),
    [
        ((128, 256, 512), (989_184, 2_107_392, 5_523_456)),
        ((512, 1024, 2048), (5_523_456, 17_074_176, 59_049_984)),
    ],
)
def test_trainable_parameter_counts(channels, per_layer) -> None:
    settings = CFlow.default_settings("any", "anomalib")
    with torch.device("meta"):
        model = CFlowModel(list(channels), settings, seed=0)
    counts = [
        sum(p.numel() for p in decoder.parameters() if p.requires_grad)
        for decoder in model.decoders
    ]
    assert tuple(counts) == per_layer
    assert sum(counts) == {128: 8_620_032, 512: 81_647_616}[channels[0]]


def test_learning_rate_schedule() -> None:
    s = CFlow.default_settings("resnet18", "original")
    steps = 8 * 4  # sub-epochs x image batches per pass
    eta_min = 2e-4 * 0.1**3
    warm_to = eta_min + (2e-4 - eta_min) * (1 + math.cos(2 * math.pi / 25)) / 2
    assert warm_to == pytest.approx(1.9687e-4, rel=1e-4)
    assert learning_rate(s, 0, 0, steps) == pytest.approx(2e-5)
    halfway = 2e-5 + 0.5 * (warm_to - 2e-5)
    assert learning_rate(s, 1, 0, steps) == pytest.approx(halfway)
    last = 2e-5 + (2 * steps - 1) / (2 * steps) * (warm_to - 2e-5)
    assert learning_rate(s, 1, steps - 1, steps) == pytest.approx(last)
    assert learning_rate(s, 2, 0, steps) == pytest.approx(warm_to)
    cosine_12 = eta_min + (2e-4 - eta_min) * (1 + math.cos(math.pi * 12 / 25)) / 2
    assert learning_rate(s, 12, 5, steps) == pytest.approx(cosine_12)
    assert learning_rate(s, 12, 5, steps) == learning_rate(s, 12, 30, steps)
    a = CFlow.default_settings("resnet18", "anomalib")
    assert {learning_rate(a, e, i, 10) for e in (0, 3) for i in (0, 9)} == {1e-4}


def test_reference_defaults_and_declarations() -> None:
    o = CFlow.default_settings("wide_resnet50_2", "original")
    a = CFlow.default_settings("wide_resnet50_2", "anomalib")
    assert (o.fiber_batch, o.lr, o.epochs, o.sub_epochs, o.permute_soft) == (256, 2e-4, 25, 8, True)
    assert (a.fiber_batch, a.lr, a.sub_epochs, a.permute_soft) == (64, 1e-4, 1, False)
    assert not o.fold_remainder and a.fold_remainder
    assert (o.normalisation, a.normalisation) == ("test-set", "batch")
    assert CFlow.needs("resnet18", o) == ["layer2", "layer3", "layer4"]
    assert CFlow.needs("resnet18", dataclasses.replace(o, pool_layers=2)) == ["layer3", "layer4"]
    assert CFlow.weights_provenance("resnet18", "original") == "torchvision"
    assert CFlow.weights_provenance("resnet18", "anomalib") == "timm"
    assert CFlow.preprocess("resnet18", "original", o).resample == "lanczos"
    assert CFlow.preprocess("resnet18", "anomalib", a).resample == "bilinear"
    assert CFlow.train_augmentation(a, "anomalib") is None
    rotation = CFlow.train_augmentation(o, "original")
    assert rotation.degrees == 5.0
    image = Image.new("RGB", (16, 16), (200, 100, 50))
    rotated = rotation(image, torch.Generator().manual_seed(0))
    assert rotated.size == image.size and rotated.mode == "RGB"


def test_rotation_is_torchvisions_with_the_angle_from_the_generator() -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import RandomRotation as TorchvisionRotation

    rotation = CFlow.train_augmentation(CFlow.default_settings("resnet18", "original"), "x")
    pixels = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(3))
    image = Image.fromarray(pixels.numpy().astype("uint8"))
    torch.manual_seed(7)
    expected = TorchvisionRotation(5.0, InterpolationMode.NEAREST, expand=False, fill=0)(image)
    torch.manual_seed(7)
    same_stream = rotation(image, torch.default_generator)
    assert np.array_equal(np.asarray(same_stream), np.asarray(expected))
    angles = {
        np.asarray(rotation(image, torch.Generator().manual_seed(s))).tobytes() for s in range(4)
    }
    assert len(angles) == 4


@pytest.mark.parametrize("reference", ["original", "anomalib"])
def test_fit_and_predict_shapes(reference: str) -> None:
    method = CFlow(tiny_settings(reference, epochs=2, sub_epochs=2), context(reference))
    method.fit(random_features(10))
    assert len(method.history) == 2 and all(math.isfinite(v) for v in method.history)
    outputs = list(method.predict(random_features(6, seed=2), batch_size=4))
    assert [tuple(m.shape) for _, m in outputs] == [(4, 32, 32), (2, 32, 32)]
    assert [tuple(s.shape) for s, _ in outputs] == [(4,), (2,)]
    for scores, maps in outputs:
        assert torch.isfinite(maps).all() and (maps >= 0).all()
        torch.testing.assert_close(scores, maps.amax(dim=(1, 2)))


def test_remainder_fibers_dropped_or_folded() -> None:
    seen = {}
    for reference in ("original", "anomalib"):
        method = CFlow(tiny_settings(reference, fiber_batch=12), context(reference))
        _, used = method._train_batch(
            next(random_features(4).batches(4)),
            method._optimizers(),
            torch.Generator().manual_seed(0),
        )
        seen[reference] = used
    # 256, 64 and 16 fibers per layer; N = 12 leaves 4 in each layer.
    assert seen["original"] == 252 + 60 + 12
    assert seen["anomalib"] == 256 + 64 + 16


def test_test_set_normalisation_ignores_batch_size_and_batch_does_not() -> None:
    test = random_features(6, seed=3)
    maps = {}
    for reference in ("original", "anomalib"):
        method = CFlow(tiny_settings(reference), context(reference))
        method.fit(random_features(8))
        for batch_size in (2, 6):
            out = list(method.predict(test, batch_size=batch_size))
            maps[reference, batch_size] = torch.cat([m for _, m in out])
    torch.testing.assert_close(maps["original", 2], maps["original", 6], rtol=0, atol=1e-6)
    assert not torch.allclose(maps["anomalib", 2], maps["anomalib", 6], atol=1e-3)


@pytest.mark.parametrize("soft", [False, True])
def test_state_dict_round_trip(soft: bool) -> None:
    settings = tiny_settings("anomalib", permute_soft=soft)
    first = CFlow(settings, context("anomalib", seed=0))
    first.fit(random_features(8))
    second = CFlow(settings, context("anomalib", seed=7))
    second.load_state_dict(first.state_dict())
    batch = next(random_features(3, seed=4).batches(3))
    for a, b in zip(first.predict_batch(batch), second.predict_batch(batch), strict=True):
        assert torch.equal(a, b)
    assert first.trainable_parameters() == second.trainable_parameters()


def test_eval_chunk_only_bounds_memory() -> None:
    method = CFlow(tiny_settings("anomalib"), context("anomalib"))
    method.fit(random_features(8))
    batch = next(random_features(3, seed=5).batches(3))
    chunked = method.predict_batch(batch)[1]
    method.settings = dataclasses.replace(method.settings, eval_chunk=0)
    torch.testing.assert_close(method.predict_batch(batch)[1], chunked, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["fiber_batch", "batch_size", "sub_epochs", "coupling_blocks"])
def test_counts_must_be_positive(name: str) -> None:
    with pytest.raises(BenchError, match=rf"cflow\.{name} must be positive, got 0"):
        CFlow(tiny_settings("anomalib", **{name: 0}), context("anomalib"))


def test_encoder_padding_per_reference() -> None:
    for backbone in ("resnet18", "wide_resnet50_2"):
        original = CFlow.default_settings(backbone, "original")
        assert CFlow.encoder_padding(backbone, original) == "reflect"
        anomalib = CFlow.default_settings(backbone, "anomalib")
        assert CFlow.encoder_padding(backbone, anomalib) == "zeros"
    # the authors take any other encoder from timm, which pads with zeros
    other = CFlow.default_settings("efficientnet_b5", "original")
    assert CFlow.encoder_padding("efficientnet_b5", other) == "zeros"
    bad = dataclasses.replace(CFlow.default_settings("resnet18", "original"), encoder_padding="x")
    with pytest.raises(BenchError, match="cflow.encoder_padding=x"):
        CFlow.encoder_padding("resnet18", bad)
    with pytest.raises(BenchError, match="cflow.encoder_padding=x"):
        CFlow(bad, context("original"))


def test_idle_decoders_keep_moving_as_under_pytorch_1() -> None:
    """``original`` zeroes gradients in place: after its first step a decoder is updated at
    every later step; anomalib's ``set_to_none`` updates only the decoder that trains."""
    steps = {}
    for reference in ("original", "anomalib"):
        settings = tiny_settings(reference, pool_layers=2)
        assert settings.zero_grad_to_none is (reference == "anomalib")
        method = CFlow(settings, context(reference))
        optimizers = method._optimizers()
        assert len({id(o) for o in optimizers}) == (2 if reference == "anomalib" else 1)
        before = [d.module_list[0].global_offset.clone() for d in method.model.decoders]
        method._train_batch(
            next(random_features(4).batches(4)), optimizers, torch.Generator().manual_seed(0)
        )
        first, second = (d.module_list[0].global_offset for d in method.model.decoders)
        assert not torch.equal(first, before[0]) and not torch.equal(second, before[1])
        steps[reference] = [
            int(o.state[d.module_list[0].global_offset]["step"])
            for o, d in zip(optimizers, method.model.decoders, strict=True)
        ]
    # layer3: 64 fibers, layer4: 16, in fiber batches of 8
    assert steps["anomalib"] == [8, 2]
    assert steps["original"] == [10, 2]


@pytest.mark.parametrize("reference", ["anomalib", "original"])
def test_decoders_train_at_once_as_one_thread_trains_them_in_turn(
    reference: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an Adam per decoder (anomalib) the decoders train on two CPU worker threads at
    once, one torch thread each, and the weights are bit for bit those of a one-thread fit
    that trains them in turn; ``original`` (one shared Adam) always trains them in turn."""
    fitted = {}
    for workers, threads in (("1", 1), ("2", 2)):
        monkeypatch.setenv(WORKERS_ENV, workers)
        torch.set_num_threads(threads)
        method = CFlow(tiny_settings(reference, epochs=2), context(reference))
        train_decoder, where = method._train_decoder, set()

        def recorded(job, train_decoder=train_decoder, where=where):  # noqa: ANN001, ANN202
            where.add(threading.current_thread().name.startswith("flowad-cpu"))
            return train_decoder(job)

        method._train_decoder = recorded
        method.fit(random_features(8))
        fitted[workers] = (method.state_dict(), method.history, where)
    torch.set_num_threads(1)
    (alone, history, where_alone), (together, history_together, where_together) = (
        fitted["1"],
        fitted["2"],
    )
    assert where_alone == {False}
    assert where_together == ({True} if reference == "anomalib" else {False})
    assert history == history_together
    assert all(torch.equal(alone[k], together[k]) for k in alone)


def test_building_and_training_a_decoder_imports_neither_freia_nor_scipy() -> None:
    """The decoder is FrEIA's maths written out: a CFLOW-AD run pays no FrEIA import (and
    no scipy.stats, which FrEIA imports)."""
    code = (
        "import sys, torch\n"
        "from bench.methods.cflow_decoder import build_decoder\n"
        "d = build_decoder(8, 2, 4, 1.9, True, torch.Generator().manual_seed(0))\n"
        "z, log_det = d(torch.randn(3, 8), [torch.randn(3, 4)])\n"
        "log_det.sum().backward()\n"
        "print(sorted(m for m in ('FrEIA', 'scipy.stats') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
