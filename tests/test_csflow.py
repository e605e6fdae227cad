"""CS-Flow: coupling maths, scores and maps, settings, parameter counts, fit and predict
(tiny sizes; parity with anomalib is tests/test_parity_csflow_anomalib.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.features import CachedFeatures
from bench.methods.base import MethodContext
from bench.methods.csflow import (
    CsFlow,
    CsFlowModel,
    CsFlowSettings,
    anomaly_maps,
    block_permutations,
    count_trainable,
    csflow_loss,
    image_scores,
)

LAYERS = ["layer4", "layer4@2", "layer4@4"]
CHANNELS = 6
SHAPES = [(8, 8), (4, 4), (2, 2)]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_settings(reference: str = "original", **changes) -> CsFlowSettings:
    small = dict(hidden_channels=8, coupling_blocks=2, batch_size=4, epochs=2)
    return dataclasses.replace(
        CsFlow.default_settings("resnet18", reference), **{**small, **changes}
    )


def context(reference: str = "original", seed: int = 0, shapes=SHAPES) -> MethodContext:
    return MethodContext(
        backbone="resnet18",
        reference=reference,
        channels=dict.fromkeys(LAYERS, CHANNELS),
        shapes=dict(zip(LAYERS, shapes, strict=True)),
        output_size=(32, 32),
        device=torch.device("cpu"),
        seed=seed,
        progress=False,
    )


def random_features(n: int, seed: int = 1, shift: float = 0.0) -> CachedFeatures:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        layer: torch.randn(n, CHANNELS, *shape, generator=gen) + shift
        for layer, shape in zip(LAYERS, SHAPES, strict=True)
    }
    return CachedFeatures(tensors, torch.device("cpu"))


def perturbed_flow(channels: int = CHANNELS, dtype=torch.float64, **changes) -> CsFlowModel:
    """A flow whose gammas are away from 0 (at 0 every block is the identity)."""
    settings = CsFlowSettings(hidden_channels=8, coupling_blocks=2, **changes)
    torch.manual_seed(0)
    model = CsFlowModel(channels, settings).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def inputs(batch: int, channels: int = CHANNELS, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(batch, channels, *s, generator=gen).to(dtype) for s in SHAPES]


@pytest.mark.parametrize("channels", [6, 7])
def test_flow_is_invertible(channels: int) -> None:
    model = perturbed_flow(channels)
    x = inputs(2, channels)
    with torch.no_grad():
        z, _ = model(x)
        back = model.inverse(z)
    assert max((a - b).abs().max().item() for a, b in zip(z, x, strict=True)) > 0.1
    for a, b in zip(back, x, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_log_det_matches_brute_force_jacobian() -> None:
    model = perturbed_flow()
    x = inputs(1)
    sizes = [v.numel() for v in x]

    def flat(values: torch.Tensor) -> torch.Tensor:
        parts = torch.split(values, sizes)
        z, _ = model([p.reshape(v.shape) for p, v in zip(parts, x, strict=True)])
        return torch.cat([v.reshape(-1) for v in z])

    jacobian = torch.autograd.functional.jacobian(flat, torch.cat([v.reshape(-1) for v in x]))
    sign, expected = torch.linalg.slogdet(jacobian)
    _, log_det = model(x)
    assert sign.item() == 1.0
    torch.testing.assert_close(log_det, expected.reshape(1), rtol=1e-9, atol=1e-9)


def test_soft_clamp_bounds_the_log_scale() -> None:
    model = perturbed_flow(clamp=0.5)
    with torch.no_grad():
        model.blocks[0].net1.gamma.fill_(1e3)
        z, log_det = model(inputs(1))
    dims = sum(v.numel() for v in inputs(1))
    # |log e(s)| <= clamp * 0.636 * pi / 2 per transformed value
    assert log_det.abs().item() <= 2 * dims * 0.5 * 0.636 * np.pi / 2


def test_score_map_and_loss_on_a_hand_case() -> None:
    z0 = torch.tensor([1.0, 3.0]).reshape(1, 2, 1, 1).expand(1, 2, 2, 2)  # z^2 = 1, 9
    z1 = torch.full((1, 2, 1, 1), 2.0)  # z^2 = 4
    z2 = torch.zeros(1, 2, 1, 1)
    # mean of z^2 / 2 over 8 + 2 + 2 values: (4 * (1 + 9) + 2 * 4 + 0) / 2 / 12 = 2
    torch.testing.assert_close(image_scores([z0, z1, z2]), torch.tensor([2.0]))
    largest = anomaly_maps([z0, z1, z2], (4, 4), "largest-scale")
    torch.testing.assert_close(largest, torch.full((1, 4, 4), 5.0))  # channel mean of 1, 9
    product = anomaly_maps([z0, z1 / 2, z1], (4, 4), "product")
    torch.testing.assert_close(product, torch.full((1, 4, 4), 5.0 * 1.0 * 4.0))
    log_det = torch.tensor([6.0])
    # (0.5 * 48 - 6) / 12; batch-sum equals per-image for one image
    for how in ("per-image", "batch-sum"):
        loss = csflow_loss([z0, z1, z2], log_det, how)
        torch.testing.assert_close(loss, torch.tensor(1.5))


def test_batch_sum_subtracts_the_whole_batchs_log_det() -> None:
    z = [torch.zeros(2, 1, 1, 1)]
    log_det = torch.tensor([1.0, 3.0])
    assert csflow_loss(z, log_det, "per-image").item() == -2.0
    assert csflow_loss(z, log_det, "batch-sum").item() == -4.0


def test_largest_scale_map_is_upsampled_bilinearly() -> None:
    z = torch.zeros(1, 1, 2, 2)
    z[0, 0, 0, 0] = 2.0  # channel mean of z^2: 4 in one corner cell
    maps = anomaly_maps([z, z[..., :1, :1], z[..., :1, :1]], (4, 4), "largest-scale")
    expected = torch.nn.functional.interpolate(
        (z**2), size=(4, 4), mode="bilinear", align_corners=False
    )[:, 0]
    torch.testing.assert_close(maps, expected)
    assert maps[0, 0, 0].item() == 4.0 and maps[0, 3, 3].item() == 0.0


def test_permutations_per_reference() -> None:
    per_scale = block_permutations(2, 10, "per-scale")
    np.random.seed(2)
    expected = [np.random.permutation(10) for _ in range(3)]
    assert [p.tolist() for p in per_scale] == [e.tolist() for e in expected]
    assert per_scale[0].tolist() != per_scale[1].tolist()
    shared = block_permutations(2, 10, "shared")
    order = np.random.default_rng(2).permutation(10).tolist()
    assert all(p.tolist() == order for p in shared)
    with pytest.raises(BenchError, match="csflow.permutations=random"):
        block_permutations(0, 10, "random")


def test_reference_defaults_and_declarations() -> None:
    original = CsFlow.default_settings("tf_efficientnet_b5", "original")
    assert (original.input_size, original.layer, original.batch_size, original.epochs) == (
        768,
        "blocks.5",
        16,
        240,
    )
    assert (original.coupling_blocks, original.clamp, original.hidden_channels) == (4, 3.0, 1024)
    assert (original.kernel_size, original.last_kernel_size) == (3, 5)
    assert (original.lr, original.eps, original.weight_decay, original.max_grad_norm) == (
        2e-4,
        1e-4,
        1e-5,
        1.0,
    )
    assert original.betas == (0.9, 0.999)
    assert (original.permutations, original.log_det, original.anomaly_map) == (
        "per-scale",
        "per-image",
        "largest-scale",
    )
    anomalib = CsFlow.default_settings("tf_efficientnet_b5", "anomalib")
    assert (anomalib.input_size, anomalib.batch_size, anomalib.betas) == (256, 32, (0.5, 0.9))
    assert (anomalib.permutations, anomalib.log_det, anomalib.anomaly_map) == (
        "shared",
        "batch-sum",
        "product",
    )
    assert CsFlow.default_settings("resnet18", "anomalib").layer == "layer4"
    assert CsFlow.needs("tf_efficientnet_b5", original) == [
        "blocks.5",
        "blocks.5@2",
        "blocks.5@4",
    ]
    pre = CsFlow.preprocess("tf_efficientnet_b5", "original", original)
    assert pre.output_size == (768, 768) and pre.crop is None and pre.resample == "bilinear"
    with pytest.raises(BenchError, match="unknown reference"):
        CsFlow.default_settings("resnet18", "paper")
    with pytest.raises(BenchError, match="CNN backbone"):
        CsFlow.needs("cait_m48_448", original)


def _per_coupling(c_in: int, c_out: int, hidden: int, k: int) -> int:
    """One cross-scale subnet: 3 gammas; per scale an entry conv (c_in -> hidden) and an
    exit conv (hidden -> c_out); 2 upsampling and 2 strided convs (hidden -> c_out); all
    with biases: 3 + 3 (c_in k^2 h + h) + 7 (h k^2 c_out + c_out)."""
    return 3 + 3 * (c_in * k * k * hidden + hidden) + 7 * (hidden * k * k * c_out + c_out)


def _by_hand(channels: int, hidden: int, kernels: list[int]) -> int:
    """Per block, the subnet of each half: (c2 -> 2 c1) and (c1 -> 2 c2), c1 = C // 2."""
    c1, c2 = channels // 2, channels - channels // 2
    return sum(
        _per_coupling(c2, 2 * c1, hidden, k) + _per_coupling(c1, 2 * c2, hidden, k) for k in kernels
    )


@pytest.mark.parametrize(
    ("channels", "settings", "expected"),
    [
        # the paper: EfficientNet-B5's 304 channels (halves of 152), 1024 hidden, kernels
        # 3, 3, 3, 5: a subnet has 3 + 3 * 1024 * 1369 + 7 * 304 * 9217 = 23,819,347 with
        # k = 3 and 3 + 3 * 1024 * 3801 + 7 * 304 * 25601 = 66,155,603 with k = 5, two per
        # block: 2 * (3 * 23,819,347 + 66,155,603)
        (304, CsFlowSettings(), 275_227_288),
        # odd channels (halves of 3 and 4), kernels 3 and 5:
        # (3 + 3 * 296 + 7 * 438) + (3 + 3 * 224 + 7 * 584) = 8,720 with k = 3,
        # (3 + 3 * 808 + 7 * 1206) + (3 + 3 * 608 + 7 * 1608) = 23,952 with k = 5
        (7, CsFlowSettings(hidden_channels=8, coupling_blocks=2), 32_672),
    ],
)
def test_trainable_parameter_counts(channels: int, settings: CsFlowSettings, expected: int) -> None:
    kernels = [settings.kernel_size] * (settings.coupling_blocks - 1) + [settings.last_kernel_size]
    assert _by_hand(channels, settings.hidden_channels, kernels) == expected
    assert count_trainable(channels, settings) == expected


def test_small_model_counts_what_it_trains() -> None:
    method = CsFlow(tiny_settings(), context())
    assert method.trainable_parameters() == count_trainable(CHANNELS, tiny_settings())
    assert set(method.state_dict()) == {
        k for k, _ in method.model.named_parameters()
    }  # permutations are fixed, not state


@pytest.mark.parametrize("reference", ["original", "anomalib"])
def test_fit_and_predict(reference: str) -> None:
    method = CsFlow(tiny_settings(reference, epochs=3), context(reference))
    method.fit(random_features(8))
    assert len(method.history) == 3 and all(np.isfinite(method.history))
    assert method.history[-1] < method.history[0]
    normal = random_features(4, seed=5)
    shifted = random_features(4, seed=5, shift=3.0)
    scores, maps = next(method.predict(normal, batch_size=4))
    far, _ = next(method.predict(shifted, batch_size=4))
    assert scores.shape == (4,) and maps.shape == (4, 32, 32)
    assert torch.isfinite(maps).all() and bool((maps >= 0).all())
    assert far.min() > scores.max()


def test_scoring_is_the_training_forward_pass_bit_for_bit() -> None:
    """predict_batch scores with the flow's own forward pass (no separate scoring copy)."""
    method = CsFlow(tiny_settings(), context())
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    features = next(random_features(3).batches(3))
    scores, maps = method.predict_batch(features)
    with torch.no_grad():
        latents, _ = method.model([features[k].contiguous() for k in method.layers])
    assert torch.equal(scores, image_scores(latents))
    expected = anomaly_maps(latents, method.context.output_size, method.settings.anomaly_map)
    assert torch.equal(maps, expected)


def test_scores_follow_weight_changes() -> None:
    method = CsFlow(tiny_settings(), context())
    features = next(random_features(2).batches(2))
    before, _ = method.predict_batch(features)
    state = {k: v + 0.1 if k.endswith("gamma") else v for k, v in method.state_dict().items()}
    method.load_state_dict(state)
    after, _ = method.predict_batch(features)
    assert not torch.allclose(before, after)


def test_same_seed_same_maps_other_seed_other_maps() -> None:
    def run(seed: int) -> torch.Tensor:
        method = CsFlow(tiny_settings(), context(seed=seed))
        method.fit(random_features(8))
        return next(method.predict(random_features(3, seed=9), batch_size=3))[1]

    first = run(0)
    torch.testing.assert_close(run(0), first, rtol=0, atol=0)
    assert not torch.allclose(run(1), first)


def test_scales_must_halve_exactly() -> None:
    with pytest.raises(BenchError, match="exactly half"):
        CsFlow(tiny_settings(), context(shapes=[(8, 8), (4, 4), (1, 1)]))


@pytest.mark.parametrize(
    ("name", "value"),
    [("permutations", "none"), ("log_det", "mean"), ("anomaly_map", "sum"), ("kernel_size", 4)],
)
def test_bad_settings_are_named(name: str, value) -> None:
    with pytest.raises(BenchError, match=f"csflow.{name}"):
        CsFlow(tiny_settings(**{name: value}), context())
