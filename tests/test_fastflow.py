"""FastFlow fidelity (docs/methods.md): the flow maths, counts, training, ViT path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm.models.cait
import timm.models.deit
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import Tensor, nn

from bench.errors import BenchError
from bench.extractor import FeatureExtractor
from bench.features import CachedFeatures
from bench.methods.base import MethodContext, apply_overrides
from bench.methods.fastflow import (
    FastFlow,
    FastFlowModel,
    FastFlowSettings,
    FlowStep,
    FrozenFlows,
    anomaly_map,
    build_flow,
    count_trainable,
    fastflow_loss,
    subnet,
)
from bench.profiling import method_size
from bench.registry import METHODS

CPU = torch.device("cpu")


def _perturb(module: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move trainable tensors off their init so the global affine and offsets matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def _freia_flow(channels: int, size: int, steps: int, conv3x3_only: bool) -> SequenceINN:
    np.random.seed(0)
    inn = SequenceINN(channels, size, size)
    for i in range(steps):
        kernel = 1 if i % 2 == 1 and not conv3x3_only else 3
        inn.append(
            AllInOneBlock,
            subnet_constructor=lambda c_in, c_out, k=kernel: subnet(c_in, c_out, k, 1.0),
            affine_clamping=2.0,
            permute_soft=False,
        )
    return inn


@pytest.mark.parametrize("conv3x3_only", [False, True])
def test_flow_equals_freia_all_in_one_block(conv3x3_only: bool) -> None:
    torch.manual_seed(0)
    reference = _freia_flow(7, 6, 4, conv3x3_only)
    _perturb(reference)
    ours = build_flow(7, 4, 1.0, conv3x3_only, torch.Generator().manual_seed(3))
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, 6, 6)
    z_ref, j_ref = reference(x)
    z, j = ours(x)
    assert torch.equal(z, z_ref) and torch.equal(j, j_ref)
    x_ref, jr_ref = reference(z_ref, rev=True)
    x_back, jr = ours.inverse(z)
    torch.testing.assert_close(x_back, x_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(jr, jr_ref, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("conv3x3_only", [False, True])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_training_step_gradients_are_autographs_bit_for_bit(
    conv3x3_only: bool, layout: torch.memory_format
) -> None:
    """Training runs each step as one autograd node; its values and gradients must be those
    of the step's separate operations, to the last bit (cached features are channels-last)."""
    torch.manual_seed(0)
    model = FastFlowModel([(8, 12, 12), (17, 6, 6)], 4, 1.0, conv3x3_only, True)
    _perturb(model)
    features = [torch.randn(3, 8, 12, 12), torch.randn(3, 17, 6, 6)]
    features = [f.contiguous(memory_format=layout) for f in features]

    def loss_and_grads(graph: bool) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad(set_to_none=True)
        steps = [step for flow in model.flows for step in flow.module_list]
        forwards = [step.forward for step in steps]
        if graph:
            for step in steps:
                step.forward = step.graph_forward
        try:
            loss = fastflow_loss(*model(features))
        finally:
            for step, forward in zip(steps, forwards, strict=True):
                step.forward = forward
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    loss_graph, grads_graph = loss_and_grads(graph=True)
    loss, grads = loss_and_grads(graph=False)
    assert torch.equal(loss, loss_graph)
    assert len(grads) == len(grads_graph) == 2 * 2 + 2 * 4 * 6  # LayerNorms, 8 steps
    for grad, expected in zip(grads, grads_graph, strict=True):
        assert torch.equal(grad, expected)


def test_flow_is_invertible() -> None:
    torch.manual_seed(0)
    flow = build_flow(6, 6, 1.0, False, torch.Generator().manual_seed(0)).double()
    _perturb(flow, scale=0.2)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    z, log_det = flow(x)
    x_back, log_det_inv = flow.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det_inv, -log_det, rtol=0, atol=1e-10)


@pytest.mark.parametrize("channels", [4, 5])
def test_log_det_equals_brute_force_jacobian(channels: int) -> None:
    torch.manual_seed(1)
    flow = build_flow(channels, 3, 1.0, False, torch.Generator().manual_seed(1)).double()
    _perturb(flow, scale=0.3)
    x = torch.randn(1, channels, 3, 3, dtype=torch.float64)
    _, log_det = flow(x)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(x))[0].flatten(), x.flatten())
    # log |det J|: the permutations make the sign of det J +-1.
    _, expected = torch.linalg.slogdet(jac)
    torch.testing.assert_close(log_det[0], expected, rtol=0, atol=1e-9)


def test_global_scale_starts_at_one() -> None:
    step = build_flow(4, 1, 1.0, False).module_list[0]
    torch.testing.assert_close(step.scale(), torch.ones(1, 4, 1, 1), rtol=0, atol=1e-6)


class _Constant(nn.Module):
    """A subnet that outputs a fixed tensor, so the clamp formula can be read off the log-det."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand(x.shape[0], -1, -1, -1).clone()


def test_clamp_is_freia_0_2_formula() -> None:
    a = torch.linspace(-30.0, 30.0, 4 * 2 * 2).view(1, 4, 2, 2)
    step = FlowStep(4, _Constant(a), torch.arange(4))
    with torch.no_grad():
        step.global_scale.fill_(2.0 * np.log(np.exp(5.0) - 1.0))
    x = torch.zeros(1, 4, 2, 2)
    z, log_det = step(x)
    n_pixels = 4
    global_part = n_pixels * torch.log(step.scale()).sum()
    s_freia = 2.0 * torch.tanh(0.1 * a[:, :2])
    s_master = 2.0 * torch.tanh(0.1 * a[:, :2] / 2.0)
    torch.testing.assert_close(log_det - global_part, s_freia.sum().view(1), rtol=1e-6, atol=1e-5)
    assert abs(float(log_det.detach() - global_part.detach()) - float(s_master.sum())) > 0.1
    # The shift is 0.1 * a[c2:], applied to a zero input.
    torch.testing.assert_close(z[:, 2:] / step.scale()[:, 2:], 0.1 * a[:, 2:], rtol=1e-5, atol=1e-5)


def test_loss_equals_hand_computed_nll() -> None:
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 6, 2, 2, generator=gen)]
    log_dets = [torch.randn(3, generator=gen), torch.randn(3, generator=gen)]
    expected = 0.0
    for z, j in zip(latents, log_dets, strict=True):
        per_image = [0.5 * float((z[b] ** 2).sum()) - float(j[b]) for b in range(3)]
        expected += sum(per_image) / 3
    assert float(fastflow_loss(latents, log_dets)) == pytest.approx(expected, rel=1e-6)


def test_zero_latent_map_is_minus_one() -> None:
    latents = [torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 4, 4)]
    maps = anomaly_map(latents, (32, 32))
    assert maps.shape == (2, 32, 32)
    assert torch.equal(maps, torch.full((2, 32, 32), -1.0))


SPEC_COUNTS = {
    # backbone: (flows alternating, flows 3x3-only, LayerNorm): 3C + h (1 + 1.5 C k^2) per
    # step with h = int(hidden_ratio C / 2), 2 C H W per LayerNorm (docs/fastflow_parameters.md)
    "resnet18": (2_593_024, 4_657_408, 917_504),
    "wide_resnet50_2": (41_337_856, 74_368_000, 3_670_016),
    "deit_base_distilled_patch16_384": (7_074_500, 12_696_260, 0),
    "cait_m48_448": (7_074_500, 12_696_260, 0),
}


@pytest.mark.parametrize("backbone", sorted(SPEC_COUNTS))
def test_parameter_counts_equal_spec(backbone: str) -> None:
    alternating, only3, norms = SPEC_COUNTS[backbone]
    settings = FastFlow.default_settings(backbone, "original")
    for conv3x3_only, flows in ((False, alternating), (True, only3)):
        counts = count_trainable(backbone, dataclasses.replace(settings, conv3x3_only=conv3x3_only))
        assert counts == {"flows": flows, "norms": norms, "total": flows + norms}


def test_permutation_matrices_are_not_trainable() -> None:
    flow = build_flow(8, 2, 1.0, False)
    frozen = [n for n, p in flow.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == sorted(
        f"module_list.{k}.{name}" for k in range(2) for name in ("w_perm", "w_perm_inv")
    )


def test_default_settings_per_reference() -> None:
    r18 = FastFlow.default_settings("resnet18", "original")
    assert (r18.input_size, r18.flow_steps, r18.hidden_ratio, r18.conv3x3_only) == (
        256,
        8,
        1.0,
        True,
    )
    assert not FastFlow.default_settings("resnet18", "anomalib").conv3x3_only
    cait = FastFlow.default_settings("cait_m48_448", "original")
    assert (cait.input_size, cait.flow_steps, cait.hidden_ratio) == (448, 20, 0.16)
    deit = FastFlow.default_settings("deit_base_distilled_patch16_384", "anomalib")
    assert (deit.input_size, deit.flow_steps, deit.hidden_ratio) == (384, 8, 1.0)
    assert (r18.lr, r18.weight_decay, r18.batch_size, r18.epochs) == (1e-3, 1e-5, 32, 500)
    assert r18.early_stop_patience == 0
    assert FastFlow.needs("wide_resnet50_2", r18) == ["layer1", "layer2", "layer3"]
    assert FastFlow.needs("deit_base_distilled_patch16_384", deit) == ["blocks.7"]
    assert FastFlow.needs("cait_m48_448", cait) == ["blocks.40"]
    assert FastFlow.weights_provenance("resnet18", "original") == "timm-0.5.4"
    assert FastFlow.weights_provenance("resnet18", "anomalib") == "timm"
    pre = FastFlow.preprocess("cait_m48_448", "original", cait)
    assert (pre.size, pre.crop, pre.resample) == ((448, 448), None, "bilinear")


def test_variant_and_overrides() -> None:
    entry = METHODS.entry("fastflow-3x3")
    assert entry.obj is FastFlow
    assert entry.meta["base"] == "fastflow"
    assert entry.meta["settings"] == {"conv3x3_only": True}
    alternating = METHODS.entry("fastflow-alt")
    assert alternating.obj is FastFlow and alternating.meta["settings"] == {"conv3x3_only": False}
    settings = FastFlow.default_settings("wide_resnet50_2", "original")
    changed = apply_overrides(settings, {"conv3x3_only": "true", "epochs": "3"}, "fastflow")
    assert changed.conv3x3_only is True and changed.epochs == 3


def _context(**kwargs) -> MethodContext:
    base = {
        "backbone": "resnet18",
        "reference": "original",
        "channels": {"layer1": 6, "layer2": 8, "layer3": 10},
        "shapes": {"layer1": (8, 8), "layer2": (4, 4), "layer3": (2, 2)},
        "output_size": (32, 32),
        "device": CPU,
        "seed": 0,
        "progress": False,
    }
    base.update(kwargs)
    return MethodContext(**base)


def _tiny_settings(**kwargs) -> FastFlowSettings:
    base = {"input_size": 32, "flow_steps": 2, "epochs": 6, "batch_size": 4, "lr": 2e-3}
    base.update(kwargs)
    return FastFlowSettings(**base)


def _random_features(context: MethodContext, n: int, seed: int = 0) -> CachedFeatures:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        k: torch.randn(n, c, *context.shapes[k], generator=gen) for k, c in context.channels.items()
    }
    return CachedFeatures(tensors, CPU)


def test_fit_reduces_loss_and_predicts_maps() -> None:
    context = _context()
    method = FastFlow(_tiny_settings(), context)
    assert len(method.model.norms) == 3
    method.fit(_random_features(context, 10))
    assert len(method.history) == 6
    assert method.history[-1] < method.history[0]
    scores, maps = method.predict_batch(next(_random_features(context, 5, seed=1).batches(5)))
    assert maps.shape == (5, 32, 32) and scores.shape == (5,)
    assert torch.equal(scores, maps.amax(dim=(1, 2)))
    assert bool((maps < 0).all() and (maps >= -1).all())


@pytest.mark.parametrize(
    ("conv3x3_only", "layer_norm"), [(False, True), (True, True), (True, False)]
)
def test_scoring_snapshot_gives_the_models_maps(conv3x3_only: bool, layer_norm: bool) -> None:
    shapes = [(6, 8, 8), (8, 4, 4), (10, 2, 2)]
    model = FastFlowModel(shapes, 4, 1.0, conv3x3_only, layer_norm=layer_norm)
    _perturb(model, scale=0.3)  # tanh/sigmoid away from 0, global affine away from 1 and 0
    gen = torch.Generator().manual_seed(3)
    features = [torch.randn(3, c, h, w, generator=gen) for c, h, w in shapes]
    with torch.no_grad():
        expected = anomaly_map(model(features)[0], (32, 32))
        latents = FrozenFlows(model)(features)
        maps = anomaly_map(latents, (32, 32))
        reference = model(features)[0]
    torch.testing.assert_close(maps, expected, rtol=0, atol=2e-6)
    for z, ref in zip(latents, reference, strict=True):  # z up to the last channel order
        torch.testing.assert_close(z.sort(dim=1).values, ref.sort(dim=1).values)


def test_prediction_follows_training() -> None:
    context = _context()
    method = FastFlow(_tiny_settings(epochs=1), context)
    features = next(_random_features(context, 3, seed=2).batches(3))
    _, untrained = method.predict_batch(features)
    method.fit(_random_features(context, 6))  # fused Adam leaves version counters unchanged
    _, maps = method.predict_batch(features)
    with torch.no_grad():
        inputs = [features[k] for k in method.layers]
        expected = anomaly_map(method.model(inputs)[0], context.output_size)
    assert not torch.allclose(maps, untrained)
    torch.testing.assert_close(maps, expected, rtol=0, atol=2e-6)


def test_early_stop_on_training_loss() -> None:
    context = _context()
    settings = _tiny_settings(early_stop_patience=1, early_stop_min_delta=1e9)
    method = FastFlow(settings, context)
    method.fit(_random_features(context, 4))
    assert len(method.history) == 2


def test_seeded_fit_is_reproducible() -> None:
    context = _context()
    runs = []
    for _ in range(2):
        method = FastFlow(_tiny_settings(epochs=2), context)
        method.fit(_random_features(context, 6))
        runs.append(method.history)
    assert runs[0] == runs[1]


def test_state_dict_round_trip_gives_identical_maps(tmp_path) -> None:
    context = _context()
    trained = FastFlow(_tiny_settings(epochs=2), context)
    trained.fit(_random_features(context, 6))
    path = tmp_path / "fastflow.pt"
    torch.save(trained.state_dict(), path)
    fresh = FastFlow(_tiny_settings(epochs=2), dataclasses.replace(context, seed=7))
    features = next(_random_features(context, 3, seed=2).batches(3))
    _, before = fresh.predict_batch(features)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    _, expected = trained.predict_batch(features)
    _, maps = fresh.predict_batch(features)
    assert not torch.equal(before, expected)
    assert torch.equal(maps, expected)


def _tiny_transformer(backbone: str) -> nn.Module:
    """The real architecture class at its native input, with a small width and few blocks."""
    torch.manual_seed(0)
    if backbone == "cait_m48_448":
        return timm.models.cait.Cait(
            img_size=448,
            embed_dim=8,
            depth=41,
            num_heads=1,
            mlp_ratio=1.0,
            depth_token_only=1,
            num_classes=0,
        )
    return timm.models.deit.VisionTransformerDistilled(
        img_size=384, embed_dim=8, depth=8, num_heads=1, mlp_ratio=1.0, num_classes=0
    )


@pytest.mark.parametrize("backbone", ["deit_base_distilled_patch16_384", "cait_m48_448"])
def test_transformer_path_shapes(backbone: str, monkeypatch) -> None:
    tiny = _tiny_transformer(backbone)
    monkeypatch.setattr(FeatureExtractor, "_create", lambda self, *a, **k: tiny)
    settings = dataclasses.replace(
        FastFlow.default_settings(backbone, "original"),
        flow_steps=2,
        hidden_ratio=0.5,
        epochs=1,
        batch_size=1,
    )
    layers = FastFlow.needs(backbone, settings)
    size = settings.input_size
    extractor = FeatureExtractor(backbone, layers, weights="random", input_size=(size, size))
    grid = size // 16
    assert extractor.channels == {layers[0]: 8}
    assert extractor.shapes == {layers[0]: (grid, grid)}
    images = [torch.randn(3, size, size)]
    features = CachedFeatures.extract(extractor, torch.utils.data.DataLoader(images, 1), CPU)
    # Every block is used (depth = block index + 1), so the path equals timm's own features.
    with torch.no_grad():
        tokens = tiny.forward_features(torch.stack(images))
    prefix = 2 if backbone.startswith("deit") else 1
    expected = tokens[:, prefix:].transpose(1, 2).reshape(1, 8, grid, grid)
    torch.testing.assert_close(features.tensors[layers[0]], expected, rtol=1e-5, atol=1e-5)
    context = _context(
        backbone=backbone,
        channels=dict(extractor.channels),
        shapes=dict(extractor.shapes),
        output_size=(size, size),
    )
    method = FastFlow(settings, context)
    assert len(method.model.norms) == 0
    method.fit(features)
    scores, maps = method.predict_batch(next(features.batches(1)))
    assert maps.shape == (1, size, size) and scores.shape == (1,)


class _RecordingFeatures(CachedFeatures):
    """Cached features that note the size of every batch they hand out."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__(tensors, CPU)
        self.sizes: list[int] = []

    def batches(self, batch_size, shuffle=False, generator=None, drop_last=False):
        for batch in super().batches(batch_size, shuffle, generator, drop_last):
            self.sizes.append(next(iter(batch.values())).shape[0])
            yield batch


def test_original_drops_the_last_incomplete_batch() -> None:
    assert FastFlow.default_settings("resnet18", "original").drop_last
    assert FastFlow.default_settings("cait_m48_448", "original").drop_last
    assert not FastFlow.default_settings("resnet18", "anomalib").drop_last
    context = _context()
    sizes = {}
    for drop_last in (True, False):
        features = _RecordingFeatures(_random_features(context, 10).tensors)
        FastFlow(_tiny_settings(epochs=2, drop_last=drop_last), context).fit(features)
        sizes[drop_last] = features.sizes
    assert sizes[True] == [4, 4, 4, 4]
    assert sizes[False] == [4, 4, 2, 4, 4, 2]
    with pytest.raises(BenchError, match="fastflow.drop_last=false"):
        FastFlow(_tiny_settings(drop_last=True, batch_size=16), context).fit(
            _random_features(context, 10)
        )


def test_additional_parameters_are_the_flows_alone() -> None:
    """The paper's figure leaves out FF-REF's LayerNorm: ResNet18, 3x3-only, 256 input."""
    settings = FastFlow.default_settings("resnet18", "original")
    channels = {"layer1": 64, "layer2": 128, "layer3": 256}
    shapes = {"layer1": (64, 64), "layer2": (32, 32), "layer3": (16, 16)}
    method = FastFlow(settings, _context(channels=channels, shapes=shapes, output_size=(256, 256)))
    size = method_size(method)
    assert size["params_additional"] == method.additional_parameters() == 4_657_408
    assert size["params_head"] == method.trainable_parameters() == 4_657_408 + 917_504
    # kept for testing: every tensor of the state dict, the one-hot permutations included
    permutations = 2 * 8 * (64**2 + 128**2 + 256**2)
    assert size["model_bytes"] == 4 * (4_657_408 + 917_504 + permutations)
