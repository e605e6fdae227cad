"""U-Flow: the U-shaped flow against FrEIA, inverse and log-det, map and NFA hand cases,
settings, parameter counts, training, the MS-CaiT composite backbone and the paper table."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from FrEIA import framework as ff
from FrEIA import modules as fm
from torch import Tensor, nn

from bench.cli import main
from bench.errors import BenchError
from bench.extractor import BackboneSpec, FeatureExtractor, backbone_spec
from bench.features import CachedFeatures
from bench.methods import uflow_nfa
from bench.methods.base import MethodContext
from bench.methods.fastflow import subnet
from bench.methods.uflow import (
    MCAIT_LAYERS,
    UFlow,
    UFlowModel,
    anomaly_map,
    port_reference_state,
    split_sizes,
    uflow_loss,
)
from bench.paper.grids import grid_configs
from bench.paper.published import STATUSES, load_table
from bench.registry import BACKBONES, Entry, load_plugins
from bench.runner.grid import expand_cells

CPU = torch.device("cpu")
SHAPES = [(12, 8, 8), (16, 4, 4), (24, 2, 2)]  # finest first, odd channel splits included


def _perturb(module: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move trainable tensors off their init so the global affines and offsets matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def _freia_uflow(shapes: list[tuple[int, int, int]], steps: int) -> ff.GraphINN:
    """The U-Flow graph built from FrEIA's own modules, coarsest stage first."""
    inputs = [ff.InputNode(*shape, name=f"in{i}") for i, shape in enumerate(shapes)]

    def stage(node: ff.Node) -> list[ff.Node]:
        blocks = []
        for step in range(steps):
            kernel = 3 if step % 2 == 0 else 1
            blocks.append(
                ff.Node(
                    node,
                    fm.AllInOneBlock,
                    {
                        "subnet_constructor": lambda c_in, c_out, k=kernel: subnet(
                            c_in, c_out, k, 1.0
                        ),
                        "affine_clamping": 2.0,
                        "permute_soft": False,
                    },
                )
            )
            node = blocks[-1]
        return blocks

    nodes, outputs = [], []
    current = inputs[-1]
    for i in range(len(inputs) - 1, 0, -1):
        blocks = stage(current)
        channels = blocks[-1].output_dims[0][0]
        split = ff.Node(blocks[-1], fm.Split, {"section_sizes": split_sizes(channels), "dim": 0})
        outputs.append(ff.OutputNode(split.out1))
        up = ff.Node(split.out0, fm.IRevNetUpsampling, {})
        current = ff.Node([inputs[i - 1].out0, up.out0], fm.Concat, {"dim": 0})
        nodes += [*blocks, split, up, current]
    blocks = stage(current)
    outputs.append(ff.OutputNode(blocks[-1]))
    return ff.GraphINN(inputs + nodes + blocks + outputs[::-1])


def _context(channels: dict, shapes: dict, output: tuple[int, int], backbone: str = "resnet18"):
    return MethodContext(
        backbone, "original", channels, shapes, output, CPU, seed=0, progress=False
    )


# ---- the flow ------------------------------------------------------------------------


def test_flow_latents_log_det_and_gradients_equal_freias_graph() -> None:
    torch.manual_seed(0)
    reference = _freia_uflow(SHAPES, 4)
    norms = nn.ModuleList(nn.LayerNorm(list(s)) for s in SHAPES)
    _perturb(reference)
    _perturb(norms, seed=1)
    state = {"flow." + k: v for k, v in reference.state_dict().items()}
    state |= {
        f"feature_extractor.feature_normalizations.{k}": v for k, v in norms.state_dict().items()
    }
    ours = UFlowModel(SHAPES, 4, 2.0, 1.0, layer_norm=True)
    ours.load_state_dict(port_reference_state(state))

    features = [torch.randn(3, *s) for s in SHAPES]
    expected, expected_log_det = reference([n(f) for n, f in zip(norms, features, strict=True)])
    uflow_loss(expected, expected_log_det).backward()
    channels_last = [f.contiguous(memory_format=torch.channels_last) for f in features]
    latents, log_det = ours(channels_last)
    uflow_loss(latents, log_det).backward()

    # coarse: 24 channels emit 24 - 12; middle: 16 + 12 / 4 = 19 emit 19 - 8; fine: 12 + 8 / 4
    assert [z.shape[1] for z in latents] == [14, 11, 12]
    for z, ref in zip(latents, expected, strict=True):
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_det, expected_log_det, rtol=1e-5, atol=1e-4)
    grads = {"flow." + k: p.grad for k, p in reference.named_parameters() if p.requires_grad}
    grads |= {
        f"feature_extractor.feature_normalizations.{k}": p.grad for k, p in norms.named_parameters()
    }
    grads = port_reference_state(grads)
    for name, p in ours.named_parameters():
        if p.requires_grad:
            scale = grads[name].abs().max()
            assert (p.grad - grads[name]).abs().max() <= 1e-4 * scale + 1e-7, name


def _inverse(model: UFlowModel, latents: list[Tensor]) -> list[Tensor]:
    """Features (finest first) from latents with each step's own (NCHW) inverse."""
    features: list[Tensor] = []
    x = latents[0]
    for index in range(len(model.stages) - 1, -1, -1):
        x, _ = model.stages[index].inverse(x)
        if index == 0:
            features.append(x)
            break
        feature_channels = x.shape[1] - split_sizes(_stage_channels(model, index - 1))[0] // 4
        feature, up = x[:, :feature_channels], x[:, feature_channels:]
        features.append(feature)
        x = torch.cat((F.pixel_unshuffle(up, 2), latents[len(model.stages) - index]), dim=1)
    return features


def _stage_channels(model: UFlowModel, index: int) -> int:
    return model.stages[index].module_list[0].global_scale.shape[1]


def test_inverse_recovers_features_and_log_det_is_the_jacobians() -> None:
    shapes = [(4, 4, 4), (8, 2, 2)]
    torch.manual_seed(0)
    model = UFlowModel(shapes, 4, 2.0, 1.0, layer_norm=False).double()
    _perturb(model, scale=0.2)
    features = [torch.randn(1, *s, dtype=torch.float64) for s in shapes]
    latents, log_det = model(features)
    recovered = _inverse(model, latents)
    for f, r in zip(features, recovered, strict=True):
        torch.testing.assert_close(r, f, rtol=1e-9, atol=1e-9)

    sizes = [math.prod(s) for s in shapes]

    def flat(x: Tensor) -> Tensor:
        parts = [p.view(1, *s) for p, s in zip(x.split(sizes), shapes, strict=True)]
        return torch.cat([z.reshape(-1) for z in model(parts)[0]])

    jacobian = torch.autograd.functional.jacobian(
        flat, torch.cat([f.reshape(-1) for f in features])
    )
    assert jacobian.shape == (96, 96)
    sign, logabsdet = torch.linalg.slogdet(jacobian)
    assert sign != 0
    torch.testing.assert_close(log_det[0], logabsdet, rtol=1e-9, atol=1e-9)


def test_scales_must_halve() -> None:
    with pytest.raises(BenchError, match="half"):
        UFlowModel([(4, 8, 8), (8, 3, 3)], 2, 2.0, 1.0, layer_norm=False)


def test_map_formula_on_a_hand_case() -> None:
    """1 - mean over scales of the bilinearly upsampled exp(-mean_c z^2 / 2)."""
    fine = torch.zeros(1, 2, 2, 4)  # exp(0) = 1 everywhere
    coarse = torch.tensor([0.0, math.sqrt(2 * math.log(4))]).view(1, 1, 1, 2)  # probs 1, 1/4
    maps = anomaly_map([fine, coarse], (2, 4))
    # bilinear 2 -> 4 (half-pixel centres): [p0, 3/4 p0 + 1/4 p1, 1/4 p0 + 3/4 p1, p1]
    upsampled = torch.tensor([1.0, 0.8125, 0.4375, 0.25])
    expected = (1 - (1 + upsampled) / 2).expand(2, 4)
    torch.testing.assert_close(maps[0], expected)


# ---- settings and counts ---------------------------------------------------------------


def test_settings_per_reference() -> None:
    paper = UFlow.default_settings("mcait", "original")
    assert (paper.input_size, paper.flow_steps, paper.affine_clamp, paper.subnet_ratio) == (
        448,
        4,
        2.0,
        1.0,
    )
    assert (paper.lr, paper.batch_size, paper.epochs, paper.weight_decay) == (1e-4, 8, 201, 1e-5)
    assert (paper.lr_end_factor, paper.lr_decay_epochs, paper.score_size, paper.nfa) == (
        0.4,
        25000,
        256,
        "tree",
    )
    assert UFlow.default_settings("resnet18", "original").input_size == 256
    theirs = UFlow.default_settings("resnet18", "anomalib")
    assert (theirs.input_size, theirs.lr, theirs.batch_size, theirs.epochs) == (448, 1e-3, 32, 50)
    assert (theirs.score_size, theirs.nfa, theirs.weight_decay) == (0, "binomial", 1e-5)
    assert UFlow.needs("mcait", paper) == MCAIT_LAYERS
    assert UFlow.needs("wide_resnet50_2", paper) == ["layer1", "layer2", "layer3"]
    assert UFlow.preprocess("mcait", "original", paper).output_size == (448, 448)
    with pytest.raises(BenchError, match="mcait"):
        UFlow.needs("cait_m48_448", paper)
    with pytest.raises(BenchError, match="reference"):
        UFlow.default_settings("mcait", "paper")


def _hand_count(stage_channels: list[int], steps: int = 4, ratio: float = 1.0) -> int:
    """Per step on C channels (c1 = C - C // 2 in, c2 = C // 2 coupled, hidden int(c1 * ratio),
    kernel k = 3, 1, 3, 1, ...): conv c1 -> hidden and hidden -> 2 c2 with biases, plus the
    global scale and offset (C each)."""
    total = 0
    for channels in stage_channels:
        c1, c2 = channels - channels // 2, channels // 2
        hidden = int(c1 * ratio)
        for step in range(steps):
            k = 3 if step % 2 == 0 else 1
            total += c1 * hidden * k * k + hidden + hidden * 2 * c2 * k * k + 2 * c2 + 2 * channels
    return total


def test_trainable_parameters_of_the_paper_config_and_resnet18() -> None:
    # MS-CaiT: stages on 384 channels (14x14) and 768 + (384 // 8 * 4) / 4 = 816 (28x28)
    assert _hand_count([384, 816]) == 12_216_480
    mcait = UFlow(
        UFlow.default_settings("mcait", "original"),
        _context(
            dict(zip(MCAIT_LAYERS, (768, 384), strict=True)),
            dict(zip(MCAIT_LAYERS, ((28, 28), (14, 14)), strict=True)),
            (448, 448),
            "mcait",
        ),
    )
    assert mcait.trainable_parameters() == 12_216_480
    # resnet18 at 256: stages on 256, 128 + 128 / 4 = 160, 64 + 80 / 4 = 84 channels, and a
    # LayerNorm (weight and bias per feature value) on each of the three scales
    layers = ["layer1", "layer2", "layer3"]
    shapes = {"layer1": (64, 64), "layer2": (32, 32), "layer3": (16, 16)}
    norms = 2 * (64 * 64 * 64 + 128 * 32 * 32 + 256 * 16 * 16)
    assert _hand_count([256, 160, 84]) + norms == 1_479_880 + 917_504
    resnet = UFlow(
        UFlow.default_settings("resnet18", "original"),
        _context(dict(zip(layers, (64, 128, 256), strict=True)), shapes, (256, 256)),
    )
    assert resnet.trainable_parameters() == 2_397_384


# ---- training and prediction -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_features() -> tuple[FeatureExtractor, CachedFeatures]:
    extractor = FeatureExtractor(
        "resnet18", ["layer1", "layer2", "layer3"], "random", input_size=(64, 64)
    )
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return extractor, CachedFeatures(extractor(images), CPU)


def _tiny_method(extractor: FeatureExtractor, **changes) -> UFlow:
    settings = dataclasses.replace(
        UFlow.default_settings("resnet18", "original"),
        input_size=64,
        epochs=2,
        batch_size=4,
        lr=1e-3,
        **changes,
    )
    return UFlow(settings, _context(dict(extractor.channels), dict(extractor.shapes), (64, 64)))


def test_tiny_fit_predict_and_determinism(tiny_features, one_thread) -> None:
    extractor, features = tiny_features
    first = _tiny_method(extractor)
    first.fit(features)
    assert len(first.history) == 2 and all(math.isfinite(v) for v in first.history)
    scores, maps = zip(*first.predict(features, batch_size=4), strict=True)
    scores, maps = torch.cat(scores), torch.cat(maps)
    assert scores.shape == (6,) and maps.shape == (6, 64, 64)
    assert maps.min() >= 0 and maps.max() <= 1
    # the original reference scores on the map resized to 256, not on the returned one
    batch = next(features.batches(6))
    latents = first.latents(batch)
    torch.testing.assert_close(scores, anomaly_map(latents, (256, 256)).amax(dim=(1, 2)))

    second = _tiny_method(extractor)
    second.fit(features)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert torch.equal(second.predict_batch(batch)[1], maps)


def test_anomalib_scores_on_its_own_map(tiny_features) -> None:
    extractor, features = tiny_features
    method = _tiny_method(extractor, score_size=0)
    scores, maps = method.predict_batch(next(features.batches(6)))
    assert torch.equal(scores, maps.amax(dim=(1, 2)))


def test_extra_metrics_after_predict(tiny_features) -> None:
    extractor, features = tiny_features
    method = _tiny_method(extractor)
    maps = torch.cat([m for _, m in method.predict(features, batch_size=4)]).numpy()
    masks = np.zeros((6, 64, 64), dtype=np.uint8)
    masks[3:, 20:40, 20:40] = 1
    values = method.extra_metrics(maps, masks)
    assert set(values) == {"nfa_log_threshold", "nfa_miou", "nfa_iou"}
    assert values["nfa_log_threshold"] == 0.0
    assert 0 <= values["nfa_miou"] <= 1 and 0 <= values["nfa_iou"] <= 1
    assert method.extra_metrics(maps, None) == {"nfa_log_threshold": 0.0}
    with pytest.raises(BenchError, match="masks"):
        method.extra_metrics(maps[:2], masks[:2])


def test_tree_nfa_needs_three_by_three_maps() -> None:
    layers = ["layer1", "layer2", "layer3"]
    shapes = {"layer1": (8, 8), "layer2": (4, 4), "layer3": (2, 2)}
    context = _context(dict(zip(layers, (64, 128, 256), strict=True)), shapes, (32, 32))
    with pytest.raises(BenchError, match="3x3"):
        UFlow(UFlow.default_settings("resnet18", "original"), context)
    off = dataclasses.replace(UFlow.default_settings("resnet18", "original"), nfa="off")
    assert UFlow(off, context).extra_metrics(None, np.zeros((1, 32, 32))) == {
        "nfa_log_threshold": 0.0
    }


# ---- the NFA -------------------------------------------------------------------------------


def _chernoff(x: float, channels: int) -> float:
    """log10 of the chi-square (C degrees of freedom) Chernoff bound at sum z^2 = C x."""
    return -(channels / 2) * (x - 1 - math.log(x)) / math.log(10)


def _latents_with_mean_square(values: np.ndarray, channels: int) -> Tensor:
    """(1, C, H, W) latents whose mean_c z^2 is ``values`` (every channel sqrt(value))."""
    z = torch.from_numpy(np.sqrt(values)).float()
    return z.expand(1, channels, *values.shape).clone()


def test_number_of_tests_by_hand() -> None:
    alpha, beta = 0.316915, 4.062570
    assert uflow_nfa.log_number_of_tests([1]) == pytest.approx(math.log10(alpha * beta), rel=1e-6)
    two = 2 * (alpha * beta + alpha * beta**2 / 2)
    three = 3 * (alpha * beta + alpha * beta**2 / 2 + alpha * beta**3 / 3)
    assert uflow_nfa.log_number_of_tests([2, 3]) == pytest.approx(math.log10(two + three), rel=1e-6)
    # large regions stay finite (beta^N overflows a float64 from N ~ 500)
    assert 7000 < uflow_nfa.log_number_of_tests([12544, 3136, 784]) < 8000


def test_tree_keeps_a_single_peak() -> None:
    """One bright pixel on a flat background: the chain (peak, whole image) keeps the peak."""
    values = np.ones((3, 3), dtype=np.float32)
    values[1, 1] = 9.0
    log_prob = uflow_nfa.tree_log_probability(values, 2 * values, 2)
    expected = np.full((3, 3), np.nan, dtype=np.float32)
    expected[1, 1] = _chernoff(9.0, 2)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-6)


@pytest.mark.parametrize("saddle", [4.0, 8.0])
def test_tree_merges_two_peaks_only_when_their_union_is_more_significant(saddle: float) -> None:
    values = np.ones((3, 5), dtype=np.float32)
    values[1, 1], values[1, 2], values[1, 3] = 9.0, saddle, 10.0
    log_prob = uflow_nfa.tree_log_probability(values, 2 * values, 2)
    union = 3 * _chernoff(saddle, 2)  # the three pixels at or above the saddle
    expected = np.full((3, 5), np.nan, dtype=np.float32)
    if saddle == 8.0:  # more significant than either peak: the union replaces them
        assert union <= _chernoff(10.0, 2)
        expected[1, 1:4] = union
    else:
        assert union > _chernoff(10.0, 2)
        expected[1, 1], expected[1, 3] = _chernoff(9.0, 2), _chernoff(10.0, 2)
    np.testing.assert_allclose(log_prob, expected, rtol=1e-6)


def test_tree_keeps_one_of_two_equally_significant_regions() -> None:
    """The reference keys its final regions by log probability: of two equal ones only the
    later in tree order survives."""
    values = np.ones((3, 5), dtype=np.float32)
    values[1, 1], values[1, 2], values[1, 3] = 9.0, 4.0, 9.0
    log_prob = uflow_nfa.tree_log_probability(values, 2 * values, 2)
    assert np.isnan(log_prob[1, 1]) != np.isnan(log_prob[1, 3])
    assert np.nanmin(log_prob) == pytest.approx(_chernoff(9.0, 2), rel=1e-6)
    assert np.isfinite(log_prob).sum() == 1


def test_tree_log_nfa_of_a_single_peak() -> None:
    values = np.ones((3, 3), dtype=np.float32)
    values[1, 1] = 9.0
    stats = uflow_nfa.statistics([_latents_with_mean_square(values, 2)], "tree")
    log_nfa = uflow_nfa.log_nfa(stats, "tree", (3, 3))[0]
    alpha, beta = 0.316915, 4.062570
    tests = math.log10(9 * sum(alpha * beta**r / r for r in range(1, 10)))
    expected = torch.full((3, 3), tests)
    expected[1, 1] += _chernoff(9.0, 2)
    torch.testing.assert_close(log_nfa, expected, rtol=1e-5, atol=1e-4)


def test_binomial_nfa_by_hand() -> None:
    """Channel 0 above the chi2_1 median everywhere, channel 1 below: half the window's
    values are candidates, and P(Bin(n, 1/2) > floor(n / 2)) = 1/2 for odd n."""
    tau = float(uflow_nfa.binomial_tau(0.5))
    assert tau == pytest.approx(0.454936, rel=1e-5)
    fine = torch.zeros(1, 2, 5, 5)
    fine[:, 0] = 10.0
    coarse = torch.zeros(1, 2, 3, 3)  # window 3 at the second scale (7 / 2, halved, >= 1)
    coarse[:, 0] = 10.0
    single = uflow_nfa.log_nfa(uflow_nfa.statistics([fine], "binomial"), "binomial", (5, 5))
    torch.testing.assert_close(single, torch.full((1, 5, 5), math.log10(25 / 2)))
    both = uflow_nfa.log_nfa(uflow_nfa.statistics([fine, coarse], "binomial"), "binomial", (5, 5))
    torch.testing.assert_close(both, torch.full((1, 5, 5), math.log10(34 / 4)))


def test_segmentation_iou_by_hand() -> None:
    log_nfa = torch.ones(2, 2, 3)
    log_nfa[0, 0, :2] = -1.0  # two detections on the first image, none on the second
    masks = torch.zeros(2, 2, 3, dtype=torch.uint8)
    masks[0, 0, 1:] = 1
    masks[0, 1, 2] = 1
    values = uflow_nfa.segmentation_iou(log_nfa, masks)
    assert values["nfa_iou"] == pytest.approx(1 / 4)  # one of four pixels in the union
    assert values["nfa_miou"] == pytest.approx((1 / 4 + 1) / 2)  # a clean image counts 1
    everything = uflow_nfa.segmentation_iou(log_nfa, masks, threshold=2.0)  # all detected
    assert everything["nfa_iou"] == pytest.approx(3 / 12)
    assert everything["nfa_miou"] == pytest.approx((3 / 6 + 0) / 2)


# ---- the MS-CaiT composite backbone ------------------------------------------------------


def test_mcait_is_a_composite_of_the_two_cait() -> None:
    spec = backbone_spec("mcait")
    assert spec.parts == ("cait_m48_448", "cait_s24_224") and spec.native_input == 448
    assert backbone_spec("cait_s24_224").native_input == 224


@pytest.fixture
def small_composite(monkeypatch: pytest.MonkeyPatch) -> str:
    """A composite of two small transformers at 224 fed a 256 image, each one resized."""
    load_plugins()
    specs = [
        BackboneSpec("deit_small_distilled_patch16_224", "vit", native_input=224, prefix_tokens=2),
        BackboneSpec("deit_tiny_distilled_patch16_224", "vit", native_input=224, prefix_tokens=2),
        BackboneSpec(
            "test-composite",
            "vit",
            native_input=256,
            parts=("deit_small_distilled_patch16_224", "deit_tiny_distilled_patch16_224"),
        ),
    ]
    for spec in specs:
        monkeypatch.setitem(BACKBONES._entries, spec.name, Entry(spec.name, spec, {"kind": "vit"}))
    return "test-composite"


def test_composite_runs_each_part_on_its_own_input_size(small_composite: str) -> None:
    layers = [
        "deit_small_distilled_patch16_224.blocks.1",
        "deit_tiny_distilled_patch16_224.blocks.2",
    ]
    composite = FeatureExtractor(small_composite, layers, "random", input_size=(256, 256))
    assert composite.channels == dict(zip(layers, (384, 192), strict=True))
    assert composite.shapes == dict(zip(layers, ((14, 14), (14, 14)), strict=True))
    assert composite.weights.source == "random(seed=0) + random(seed=0)"
    assert not any(p.requires_grad for p in composite.parameters())
    first = FeatureExtractor(
        "deit_small_distilled_patch16_224", ["blocks.1"], "random", input_size=(224, 224)
    )
    second = FeatureExtractor(
        "deit_tiny_distilled_patch16_224", ["blocks.2"], "random", input_size=(224, 224)
    )
    images = torch.randn(2, 3, 256, 256)
    small = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=True)
    out = composite(images)
    torch.testing.assert_close(out[layers[0]], first(small)["blocks.1"])
    torch.testing.assert_close(out[layers[1]], second(small)["blocks.2"])


def test_composite_refuses_bad_layers_and_checkpoints(small_composite: str, tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="<part>.blocks.K"):
        FeatureExtractor(small_composite, ["blocks.1"], "random", input_size=(256, 256))
    path = tmp_path / "weights.pt"
    torch.save({}, path)
    with pytest.raises(BenchError, match="checkpoint"):
        FeatureExtractor(
            small_composite,
            ["deit_small_distilled_patch16_224.blocks.1"],
            str(path),
            input_size=(256, 256),
        )


# ---- published numbers and the command line ----------------------------------------------


def test_paper_table_loads_with_the_per_category_configs() -> None:
    table = load_table("uflow-mvtec")
    assert [c.id for c in table.columns] == ["image", "pixel", "aupro"]
    assert table.backbones == ["mcait"]
    assert len(table.numbers) == 2 * (15 + 3)  # pixel and AUPRO per category and per mean row
    for (_, column), number in table.numbers.items():
        assert number.status in STATUSES and column in ("pixel", "aupro")
        for source in number.source.split("; "):
            assert source in table.sources
    for row in table.rows:
        if row.is_mean:  # the printed averages are the means of the printed values
            for column in ("pixel", "aupro"):
                values = [table.published(c, column).value for c in row.categories]
                assert np.mean(values) == pytest.approx(
                    table.published(row.id, column).value, abs=0.006
                )
    configs = grid_configs(table, {}, Path("unused"))
    assert len(configs) == 15
    (bottle,) = [c for c in configs if c.categories == ["bottle"]]
    (cell,) = expand_cells(bottle, ["bottle"])
    assert (cell.settings["lr"], cell.settings["batch_size"], cell.settings["epochs"]) == (
        pytest.approx(1.129e-4, rel=1e-3),
        23,
        201,
    )


def test_cli_runs_uflow_on_one_synthetic_category(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["run", "--methods", "uflow", "--categories", "brick", "--input-size", "64"]
    argv += ["--epochs", "1", "--weights", "random", "--threads", "1", "--workers", "0"]
    argv += ["--no-profile", "--data-root", str(tmp_path / "data"), "--out", str(out)]
    assert main(argv) == 0
    results = (out / "results.csv").read_text()
    assert "uflow" in results and "brick" in results
