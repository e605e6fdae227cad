"""MSFlow: the flows against FrEIA, invertibility, the authors' scoring on hand-made maps,
settings, parameter counts, training, determinism and (optionally) the authors' own code."""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from test_datasets import make_mvtec
from torch import nn

from bench.cli import main
from bench.errors import BenchError
from bench.features import CachedFeatures
from bench.methods.base import MethodContext, apply_overrides
from bench.methods.msflow import (
    ConditionedSubnet,
    FrozenMSFlow,
    FusionFlow,
    MSFlow,
    MSFlowModel,
    MSFlowSettings,
    anomaly_maps,
    build_parallel_flow,
    log_likelihoods,
    lr_schedulers,
    msflow_loss,
    pool,
    port_reference_state,
    top_k_count,
    top_k_score,
)
from bench.paper.published import STATUSES, load_table
from bench.registry import DATASETS

CPU = torch.device("cpu")
CHANNELS = {"layer1": 8, "layer2": 12, "layer3": 16}
SHAPES = {"layer1": (16, 16), "layer2": (8, 8), "layer3": (4, 4)}
NHWC = torch.channels_last

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(module: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move trainable tensors off their init so global affines, offsets and norms matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _model(channels=(4, 6, 8), conds=(4, 4, 4), blocks=(2, 1, 2), seed=0) -> MSFlowModel:
    torch.manual_seed(seed)
    model = MSFlowModel(list(channels), conds, blocks, 1.9, torch.Generator().manual_seed(seed))
    _perturb(model, seed, 0.2)
    return model


# ---- the flows ---------------------------------------------------------------------------


def test_parallel_flow_equals_freia_all_in_one_block() -> None:
    """MS-REF's parallel flow: SequenceINN(C, 1, 1) of conditional AllInOneBlocks."""
    torch.manual_seed(0)
    np.random.seed(0)
    reference = SequenceINN(6, 1, 1)
    for _ in range(3):
        reference.append(
            AllInOneBlock,
            cond=0,
            cond_shape=(4, 1, 1),
            subnet_constructor=ConditionedSubnet,
            affine_clamping=1.9,
            global_affine_type="SOFTPLUS",
        )
    _perturb(reference)
    ours = build_parallel_flow(6, 4, 3, 1.9, torch.Generator().manual_seed(3))
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    x, cond = torch.randn(2, 6, 5, 5), torch.randn(2, 4, 5, 5)
    z_ref, j_ref = reference(x, [cond])
    z, j = ours(x, cond)
    assert torch.equal(z, z_ref) and torch.equal(j, j_ref)
    x_ref, _ = reference(z_ref, [cond], rev=True)
    x_back, j_back = ours.inverse(z, cond)
    torch.testing.assert_close(x_back, x_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(j_back, -j, rtol=1e-6, atol=1e-4)


def test_parallel_flow_is_invertible_with_exact_log_det() -> None:
    torch.manual_seed(0)
    flow = build_parallel_flow(5, 4, 3, 1.9, torch.Generator().manual_seed(0)).double()
    _perturb(flow, scale=0.3)
    x = torch.randn(1, 5, 3, 3, dtype=torch.float64)
    cond = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    z, log_det = flow(x, cond)
    x_back, log_det_inv = flow.inverse(z, cond)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det_inv, -log_det, rtol=0, atol=1e-10)
    jac = torch.autograd.functional.jacobian(
        lambda v: flow(v.view_as(x), cond)[0].flatten(), x.flatten()
    )
    _, expected = torch.linalg.slogdet(jac)
    torch.testing.assert_close(log_det[0], expected, rtol=0, atol=1e-9)


def _scales(batch: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 4, 4), (6, 2, 2), (8, 1, 1)]
    return [torch.randn(batch, *s, generator=gen, dtype=dtype) for s in shapes]


def test_fusion_flow_is_invertible_with_exact_log_det() -> None:
    torch.manual_seed(0)
    flow = FusionFlow([4, 6, 8], 1.9, torch.Generator().manual_seed(0)).double()
    _perturb(flow, scale=0.3)
    xs = _scales(1, 1)
    ys, log_det = flow(xs)
    xs_back, log_det_inv = flow.inverse(ys)
    for x, back in zip(xs, xs_back, strict=True):
        torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det_inv, -log_det, rtol=0, atol=1e-10)
    sizes = [x.numel() for x in xs]

    def flat(v: torch.Tensor) -> torch.Tensor:
        parts = [p.view_as(x) for p, x in zip(v.split(sizes), xs, strict=True)]
        return torch.cat([y.flatten() for y in flow(parts)[0]])

    jac = torch.autograd.functional.jacobian(flat, torch.cat([x.flatten() for x in xs]))
    _, expected = torch.linalg.slogdet(jac)
    torch.testing.assert_close(log_det[0], expected, rtol=0, atol=1e-9)


def test_fusion_scale_is_the_soft_atan_clamp() -> None:
    """e(s) = exp(1.9 * 0.636 * atan(s / 1.9)), bounded by exp(+-1.9 * 0.636 * pi / 2)."""
    flow = FusionFlow([4, 4, 4], 1.9)
    for subnet in (flow.coupling.subnet_1, flow.coupling.subnet_2):
        for conv in (*subnet.conv_s, *subnet.conv_t):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        for conv in subnet.conv_s:
            nn.init.constant_(conv.bias, 1e4)  # s huge everywhere: the clamp saturates
    xs = [torch.ones(1, 4, 2, 2), torch.ones(1, 4, 1, 1), torch.ones(1, 4, 1, 1)]
    with torch.no_grad():
        _, log_det = flow(xs)
    bound = 1.9 * 0.636 * np.arctan(1e4 / 1.9)
    elements = sum(x.numel() for x in xs)  # each element is scaled once, by s1 or s2
    assert float(log_det) == pytest.approx(bound * elements, rel=1e-6)


def test_full_model_log_det_and_loss() -> None:
    model = _model().double()
    xs = _scales(2, 2)
    latents, log_det = model(xs)
    expected = torch.stack([0.5 * sum((z[b] ** 2).sum() for z in latents) for b in range(2)])
    loss = msflow_loss(latents, log_det).detach()
    assert float(loss) == pytest.approx(float((expected - log_det).mean().detach()), rel=1e-12)
    sizes = [x.numel() // 2 for x in xs]

    def flat(v: torch.Tensor) -> torch.Tensor:
        parts = [p.view(1, *x.shape[1:]) for p, x in zip(v.split(sizes), xs, strict=True)]
        return torch.cat([z.flatten() for z in model(parts)[0]])

    first = torch.cat([x[:1].flatten() for x in xs])
    _, expected_log_det = torch.linalg.slogdet(torch.autograd.functional.jacobian(flat, first))
    torch.testing.assert_close(log_det[0], expected_log_det, rtol=0, atol=1e-9)


def test_permutations_are_not_trainable() -> None:
    model = MSFlowModel([4, 6, 8], (4, 4, 4), (2, 1, 1), 1.9)
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == sorted(
        f"parallel_flows.{s}.module_list.{k}.{name}"
        for s, blocks in enumerate((2, 1, 1))
        for k in range(blocks)
        for name in ("w_perm", "w_perm_inv")
    )
    buffers = {n for n, _ in model.named_buffers() if n.startswith("fusion_flow")}
    assert buffers == {
        f"fusion_flow.permutations.{i}.{b}" for i in range(3) for b in ("perm", "perm_inv")
    }


def test_average_pooling_counts_the_zero_padding() -> None:
    """MS-REF's nn.AvgPool2d(3, 2, 1): a corner averages 4 values over 9."""
    x = torch.ones(1, 1, 4, 4)
    pooled = pool(x, "avg")
    assert pooled.shape == (1, 1, 2, 2)
    assert float(pooled[0, 0, 0, 0]) == pytest.approx(4 / 9)
    assert float(pool(x, "max")[0, 0, 0, 0]) == 1.0
    assert pool(x, "none") is x


# ---- scoring -----------------------------------------------------------------------------


def test_aggregation_on_hand_made_maps() -> None:
    """Two scales already at the output size (no interpolation): the add and mul maps by hand."""
    a = torch.tensor([[[0.0, -1.0], [-2.0, -3.0]]])
    b = torch.tensor([[[-0.5, 0.0], [0.0, -4.0]]])
    add, mul = anomaly_maps([a, b], (2, 2))
    prob = torch.exp(a - 0.0) + torch.exp(b - 0.0)
    torch.testing.assert_close(add, prob.max() - prob)
    total = a + b
    expected_mul = 1.0 - torch.exp(total - total.max())
    torch.testing.assert_close(mul, expected_mul)
    assert float(add[0, 0, 0]) == 0.0  # the most likely pixel
    assert float(add[0, 0, 1]) == pytest.approx(np.exp(-0.5) - np.exp(-1.0))
    assert float(mul[0, 0, 1]) == pytest.approx(1 - np.exp(-1.0 - (-0.5)))
    assert float(mul[0, 0, 0]) == 0.0


def test_aggregation_upsamples_with_aligned_corners_per_image_maxima() -> None:
    """A 2x2 map to 3x3: corners kept, edge midpoints and centre averaged."""
    low = torch.tensor([[[0.0, -2.0], [-4.0, -6.0]], [[-10.0, -10.0], [-10.0, -10.0]]])
    add, mul = anomaly_maps([low], (3, 3))
    up = torch.tensor([[0.0, -1.0, -2.0], [-2.0, -3.0, -4.0], [-4.0, -5.0, -6.0]])
    torch.testing.assert_close(mul[0], 1.0 - torch.exp(up))
    corners = torch.exp(torch.tensor([[0.0, -2.0], [-4.0, -6.0]]))
    prob_up = torch.empty(3, 3)
    prob_up[0::2, 0::2] = corners
    prob_up[0, 1], prob_up[2, 1] = corners[0].mean(), corners[1].mean()
    prob_up[1, 0], prob_up[1, 2] = corners[:, 0].mean(), corners[:, 1].mean()
    prob_up[1, 1] = corners.mean()
    torch.testing.assert_close(add[0], 1.0 - prob_up)
    # The second image is flat: normalised by its own maximum, its maps are all zero.
    assert torch.equal(add[1], torch.zeros(3, 3)) and torch.equal(mul[1], torch.zeros(3, 3))


def test_top_k_score_is_the_mean_of_the_top_three_percent() -> None:
    assert top_k_count((512, 512), 0.03) == 7864
    assert top_k_count((256, 256), 0.03) == 1966
    assert top_k_count((10, 10), 0.03) == 3
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    maps[1, 9, 9] = 9.0
    scores = top_k_score(maps, top_k_count((10, 10), 0.03))
    torch.testing.assert_close(scores, torch.tensor([4.0, 3.0]))


def test_frozen_scoring_path_equals_the_modules() -> None:
    model = _model(channels=(8, 12, 16), conds=(8, 8, 8), blocks=(2, 3, 2), seed=1)
    _perturb(model, 2, 0.05)
    model = model.to(memory_format=NHWC).eval()
    gen = torch.Generator().manual_seed(0)
    # odd grids: the fusion net pools 5 -> 2 and 3 -> 2 (uneven windows) and upsamples back
    features = [
        torch.randn(3, c, s, s, generator=gen) for c, s in zip((8, 12, 16), (5, 3, 2), strict=True)
    ]
    features = [f.contiguous(memory_format=NHWC) for f in features]
    with torch.no_grad():
        expected = log_likelihoods(model(features)[0])
    frozen = FrozenMSFlow(model)
    for _ in range(2):  # the second call reuses the cached condition maps
        for got, want in zip(frozen(features), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- settings and parameter counts --------------------------------------------------------


def test_default_settings_follow_the_authors_code() -> None:
    s = MSFlow.default_settings("wide_resnet50_2", "original")
    assert (s.input_size, s.c_conds, s.parallel_blocks, s.clamp_alpha, s.pool_type) == (
        512,
        (64, 64, 64),
        (2, 5, 8),
        1.9,
        "avg",
    )
    assert (s.epochs, s.sub_epochs, s.batch_size, s.lr, s.grad_clip) == (25, 4, 8, 1e-4, 2.0)
    assert (s.lr_warmup_epochs, s.lr_warmup_from) == (3, 0.1)
    assert (s.lr_decay_milestones, s.lr_decay_gamma) == ((70, 90), 0.33)
    assert (s.top_k, s.map_aggregation) == (0.03, "add")
    assert MSFlow.needs("resnet18", s) == ["layer1", "layer2", "layer3"]
    assert MSFlow.weights_provenance("wide_resnet50_2", "original") == "torchvision"
    pre = MSFlow.preprocess("wide_resnet50_2", "original", s)
    assert (pre.size, pre.crop, pre.resample) == ((512, 512), None, "lanczos")
    changed = apply_overrides(s, {"parallel_blocks": "1,2,3", "map_aggregation": "mul"}, "msflow")
    assert changed.parallel_blocks == (1, 2, 3) and changed.map_aggregation == "mul"


def test_refusals_are_one_line_errors() -> None:
    with pytest.raises(BenchError, match="--reference anomalib: msflow has only"):
        MSFlow.default_settings("resnet18", "anomalib")
    with pytest.raises(BenchError, match="needs a CNN backbone"):
        MSFlow.needs("deit_base_distilled_patch16_384", MSFlowSettings())
    bad = {
        "pool_type": "mean",
        "map_aggregation": "max",
        "c_conds": (8, 8),
        "parallel_blocks": (2, 0, 1),
        "top_k": 0.0,
        "batch_size": 0,
    }
    for name, value in bad.items():
        with pytest.raises(BenchError, match=f"msflow.{name}"):
            MSFlow(_tiny_settings(**{name: value}), _context())
    with pytest.raises(BenchError, match="multiples of 4"):
        MSFlow(_tiny_settings(c_conds=(8, 6, 8)), _context())
    with pytest.raises(BenchError, match=r"odd count at layer2 \(13\)"):
        MSFlow(_tiny_settings(), _context(channels={**CHANNELS, "layer2": 13}))
    with pytest.raises(BenchError, match="selects no pixel"):
        MSFlow(_tiny_settings(top_k=0.001), _context(output_size=(16, 16)))


def expected_trainable(channels: list[int], conds: list[int], blocks: list[int]) -> int:
    """By hand from MS-REF's architecture (convs 3x3 with bias, LayerNorms with affine)."""
    total = 0
    for c, p, n in zip(channels, conds, blocks, strict=True):
        half, rest = c // 2, c - c // 2
        width = rest + p  # subnet input and hidden width: x1 and the position code
        conv1 = 9 * width * width + width
        norm = 2 * width
        conv2 = 9 * width * 2 * half + 2 * half
        total += n * (conv1 + norm + conv2 + 2 * c)  # + global scale and offset
    for split in ([c // 2 for c in channels], [c - c // 2 for c in channels]):
        width = sum(split)
        hidden = width // 4
        fusion = 9 * width * hidden + hidden + 2 * hidden + 9 * hidden * width + width
        total += fusion + sum(2 * (9 * c * c + c) for c in split)  # + conv_s and conv_t
    return total


@pytest.mark.parametrize(
    ("backbone", "channels", "count"),
    [("wide_resnet50_2", [256, 512, 1024], 99_556_224), ("resnet18", [64, 128, 256], 9_187_152)],
)
def test_trainable_parameters_equal_the_hand_count(backbone, channels, count) -> None:
    s = MSFlow.default_settings(backbone, "original")
    assert expected_trainable(channels, list(s.c_conds), list(s.parallel_blocks)) == count
    context = _context(
        backbone=backbone, channels=dict(zip(("layer1", "layer2", "layer3"), channels, strict=True))
    )
    with torch.device("meta"):
        method = MSFlow(s, dataclasses.replace(context, device=torch.device("meta")))
    assert method.trainable_parameters() == count


def test_learning_rate_follows_the_authors_log() -> None:
    """lr per pass: MS-REF's log prints 1.00e-05, 1.75e-05, ... 1.00e-04, then 3.30e-05 from
    pass 70 (epoch 17.2) and 1.09e-05 from pass 90 (epoch 22.2)."""
    s = MSFlowSettings()
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=s.lr)
    schedules = lr_schedulers(optimizer, s)
    rates = []
    for _ in range(s.epochs * s.sub_epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for scheduler in schedules:
            scheduler.step()
    assert rates[0] == pytest.approx(1e-5) and rates[1] == pytest.approx(1.75e-5)
    assert rates[11] == pytest.approx(9.25e-5) and rates[12] == pytest.approx(1e-4)
    assert rates[69] == pytest.approx(1e-4) and rates[70] == pytest.approx(3.3e-5)
    assert rates[89] == pytest.approx(3.3e-5) and rates[90] == pytest.approx(1.089e-5)
    assert rates[99] == pytest.approx(1.089e-5)


# ---- fit and predict ---------------------------------------------------------------------


def _context(**kwargs) -> MethodContext:
    base = {
        "backbone": "resnet18",
        "reference": "original",
        "channels": CHANNELS,
        "shapes": SHAPES,
        "output_size": (32, 32),
        "device": CPU,
        "seed": 0,
        "progress": False,
    }
    base.update(kwargs)
    return MethodContext(**base)


def _tiny_settings(**kwargs) -> MSFlowSettings:
    base = {
        "input_size": 32,
        "c_conds": (8, 8, 8),
        "parallel_blocks": (1, 2, 1),
        "epochs": 3,
        "sub_epochs": 2,
        "batch_size": 4,
        "lr": 2e-3,
        "lr_warmup_epochs": 1,
        "lr_decay_milestones": (4,),
    }
    base.update(kwargs)
    return MSFlowSettings(**base)


def _features(n: int, seed: int = 0) -> CachedFeatures:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        k: torch.randn(n, c, *SHAPES[k], generator=gen).contiguous(memory_format=NHWC)
        for k, c in CHANNELS.items()
    }
    return CachedFeatures(tensors, CPU)


def test_fit_reduces_loss_and_predicts_the_authors_maps() -> None:
    method = MSFlow(_tiny_settings(), _context())
    method.fit(_features(10))
    assert len(method.history) == 3 and method.history[-1] < method.history[0]
    features = next(_features(5, seed=1).batches(5))
    scores, maps = method.predict_batch(features)
    assert scores.shape == (5,) and maps.shape == (5, 32, 32)
    pooled = [pool(features[k], "avg") for k in ("layer1", "layer2", "layer3")]
    with torch.no_grad():
        add, mul = anomaly_maps(log_likelihoods(method.model(pooled)[0]), (32, 32))
    torch.testing.assert_close(maps, add, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, top_k_score(mul, 30), rtol=1e-5, atol=1e-5)
    method_mul = MSFlow(_tiny_settings(map_aggregation="mul"), _context())
    method_mul.load_state_dict(method.state_dict())
    scores_mul, maps_mul = method_mul.predict_batch(features)
    torch.testing.assert_close(maps_mul, mul, rtol=1e-5, atol=1e-5)
    assert torch.equal(scores_mul, scores)


def test_seeded_fit_is_reproducible() -> None:
    features = next(_features(3, seed=2).batches(3))
    runs = []
    for seed in (0, 0, 1):
        method = MSFlow(_tiny_settings(epochs=2), _context(seed=seed))
        method.fit(_features(6))
        runs.append((method.history, method.predict_batch(features)[1]))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0] and not torch.equal(runs[0][1], runs[2][1])


def test_state_dict_round_trip_refreshes_the_scoring_snapshot(tmp_path: Path) -> None:
    trained = MSFlow(_tiny_settings(epochs=1), _context())
    trained.fit(_features(6))
    path = tmp_path / "msflow.pt"
    torch.save(trained.state_dict(), path)
    fresh = MSFlow(_tiny_settings(epochs=1), _context(seed=7))
    features = next(_features(3, seed=2).batches(3))
    _, before = fresh.predict_batch(features)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    _, expected = trained.predict_batch(features)
    _, maps = fresh.predict_batch(features)
    assert not torch.equal(before, expected)
    assert torch.equal(maps, expected)


# ---- the published table and the command line --------------------------------------------


def test_paper_table_loads_with_sources_and_means() -> None:
    table = load_table("msflow-mvtec")
    assert table.dataset == "mvtec" and [c.metric for c in table.columns] == [
        "image_auroc",
        "pixel_auroc",
        "aupro",
    ]
    categories = DATASETS.get("mvtec").categories
    assert len(table.numbers) == 3 * (len(categories) + 1)
    for number in table.numbers.values():
        assert number.status in STATUSES
        assert all(source in table.sources for source in number.source.split("; "))
    for column, stated in (("image", 99.7), ("pixel", 98.8), ("pro", 97.1)):
        values = [table.numbers[(c, column)].value for c in categories]
        assert table.numbers[("mean", column)].value == stated
        assert round(sum(values) / len(values), 1) == stated
    assert table.numbers[("screw", "image")].text == "97.8"
    assert table.grids[0]["methods"] == ["msflow"]


def test_bench_run_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_mvtec(root, "bottle", train=4, test={"good": 2, "crack": 2})
    out = tmp_path / "run"
    argv = ["run", "--methods", "msflow", "--dataset", "mvtec", "--data-root", str(root)]
    argv += ["--categories", "bottle", "--input-size", "64", "--weights", "random"]
    argv += ["--workers", "0", "--epochs", "1", "--no-profile", "--out", str(out)]
    argv += ["--set", "msflow.sub_epochs=1", "--set", "msflow.parallel_blocks=1,1,1"]
    assert main(argv) == 0
    with (out / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["method"] == "msflow"
    assert 0.0 <= float(rows[0]["image_auroc"]) <= 1.0
    assert 0.0 <= float(rows[0]["pixel_auroc"]) <= 1.0


# ---- the authors' code, when a checkout is given ------------------------------------------


@pytest.fixture
def reference_code(monkeypatch: pytest.MonkeyPatch):
    """MS-REF's modules from the checkout MSFLOW_REFERENCE names (never part of this repo)."""
    folder = os.environ.get("MSFLOW_REFERENCE")
    if not folder:
        pytest.skip("set MSFLOW_REFERENCE to a checkout of the authors' MSFlow code")
    names = ("models", "models.flow_models", "models.freia_utils", "utils", "post_process")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    monkeypatch.syspath_prepend(folder)
    from models.flow_models import build_msflow_model  # noqa: PLC0415
    from post_process import post_process  # noqa: PLC0415
    from utils import positionalencoding2d  # noqa: PLC0415

    yield SimpleNamespace(build=build_msflow_model, post=post_process, code=positionalencoding2d)
    for name in [n for n in sys.modules if n.split(".")[0] in ("models", "utils", "post_process")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_matches_the_authors_code(reference_code, capsys: pytest.CaptureFixture[str]) -> None:
    """Their flows on their FrEIA graphs and their post_process against ours, same weights."""
    torch.manual_seed(0)
    np.random.seed(0)
    channels, conds, blocks = [8, 12, 16], [8, 8, 8], [2, 3, 2]
    c = SimpleNamespace(
        c_conds=conds, parallel_blocks=blocks, clamp_alpha=1.9, input_size=(64, 64), top_k=0.03
    )
    parallel, fusion = reference_code.build(c, channels)
    for module in (*parallel, fusion):
        _perturb(module, 3)
    context = _context(output_size=(64, 64), channels=dict(zip(CHANNELS, channels, strict=True)))
    method = MSFlow(_tiny_settings(c_conds=tuple(conds), parallel_blocks=tuple(blocks)), context)
    method.load_state_dict(
        port_reference_state([f.state_dict() for f in parallel], fusion.state_dict())
    )
    gen = torch.Generator().manual_seed(5)
    raw = [
        torch.randn(3, ch, s, s, generator=gen) for ch, s in zip(channels, (16, 8, 4), strict=True)
    ]
    with torch.no_grad():
        latents, log_det = [], 0
        for h, flow, p in zip(raw, parallel, conds, strict=True):
            y = nn.AvgPool2d(3, 2, 1)(h)
            cond = reference_code.code(p, *y.shape[-2:]).unsqueeze(0).repeat(len(y), 1, 1, 1)
            z, j = flow(y, [cond])
            latents.append(z)
            log_det = log_det + j
        latents, fuse = fusion(latents)
        log_det = fuse + log_det
        outputs = [[-0.5 * torch.mean(z**2, 1)] for z in latents]
        sizes = [list(z.shape[-2:]) for z in latents]
        score, map_add, map_mul = reference_code.post(c, sizes, outputs)
        ours_z, ours_log_det = method.model([pool(h, "avg") for h in raw])
    capsys.readouterr()
    for got, want in zip(ours_z, latents, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_log_det, log_det, rtol=1e-6, atol=1e-4)
    features = {k: h.contiguous(memory_format=NHWC) for k, h in zip(CHANNELS, raw, strict=True)}
    scores, maps = method.predict_batch(features)
    np.testing.assert_allclose(maps.numpy(), map_add, rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), score, rtol=0, atol=1e-5)
    mul_method = MSFlow(dataclasses.replace(method.settings, map_aggregation="mul"), context)
    mul_method.load_state_dict(method.state_dict())
    np.testing.assert_allclose(mul_method.predict_batch(features)[1].numpy(), map_mul, atol=1e-5)
