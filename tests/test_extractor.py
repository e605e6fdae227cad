"""The shared extractor: stages, strides, freezing, and every weights policy."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch

from bench.errors import BenchError
from bench.extractor import FeatureExtractor, backbone_spec


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_resnet18_channels_strides_and_frozen():
    ex = FeatureExtractor("resnet18", ["layer1", "layer2", "layer3"], "random", input_size=(64, 64))
    assert ex.channels == {"layer1": 64, "layer2": 128, "layer3": 256}
    assert ex.strides == {"layer1": 4, "layer2": 8, "layer3": 16}
    assert ex.shapes["layer3"] == (4, 4)
    assert not any(p.requires_grad for p in ex.parameters())
    ex.train()
    assert not ex.model.training
    assert ex.weights.source == "random(seed=0)" and not ex.weights.pretrained


def test_wide_resnet50_2_stages_for_cflow():
    ex = FeatureExtractor(
        "wide_resnet50_2", ["layer2", "layer3", "layer4"], "random", input_size=(64, 64)
    )
    assert ex.channels == {"layer2": 512, "layer3": 1024, "layer4": 2048}
    assert ex.strides == {"layer2": 8, "layer3": 16, "layer4": 32}


def test_folded_batchnorm_gives_the_loaded_models_features():
    ex = FeatureExtractor("resnet18", ["layer1", "layer2", "layer3"], "random", input_size=(64, 64))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = ex.model(images)
    features = ex(images)
    for layer, value in zip(ex.layers, expected, strict=True):
        torch.testing.assert_close(features[layer], value, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ex._cnn_for_inference().modules())


def test_new_backbone_weights_reach_the_folded_copy():
    ex = FeatureExtractor("resnet18", ["layer2"], "random", input_size=(32, 32))
    images = torch.randn(2, 3, 32, 32)
    before = ex(images)["layer2"]
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in ex.model.state_dict().items()}
    ex.model.load_state_dict(state)
    after = ex(images)["layer2"]
    with torch.no_grad():
        torch.testing.assert_close(after, ex.model(images)[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, after)


def test_random_init_is_deterministic():
    a = FeatureExtractor("resnet18", ["layer2"], "random", input_size=(32, 32))
    b = FeatureExtractor("resnet18", ["layer2"], "random", input_size=(32, 32))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(a(x)["layer2"], b(x)["layer2"])


def test_the_weights_a_build_would_record_are_known_without_building(tmp_path, monkeypatch):
    from bench.extractor import expected_weights_ident

    path = tmp_path / "r18.pt"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    for weights in ("random", str(path)):
        built = FeatureExtractor("resnet18", ["layer1"], weights, input_size=(32, 32))
        assert (
            expected_weights_ident("resnet18", ["layer1"], weights, "timm") == built.weights.ident
        )
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)  # new draw
    assert expected_weights_ident("resnet18", ["layer1"], str(path), "timm") != built.weights.ident
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("bench.extractor._cached_weights_file", lambda tag: None)
    assert expected_weights_ident("resnet18", ["layer1"], "auto", "torchvision") == "random"
    assert expected_weights_ident("resnet18", [], "imagenet", "torchvision") == "resnet18.tv_in1k"
    monkeypatch.setattr("bench.extractor._cached_weights_file", lambda tag: "/cache/model.bin")
    assert (
        expected_weights_ident("resnet18", ["layer1"], "auto", "torchvision") == "resnet18.tv_in1k"
    )
    with pytest.raises(BenchError, match="no such file"):
        expected_weights_ident("resnet18", ["layer1"], str(tmp_path / "gone.pt"), "timm")


def test_local_checkpoint_loads_and_is_recorded(tmp_path):
    torch.manual_seed(123)
    full = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": full.state_dict()}, path)
    ex = FeatureExtractor("resnet18", ["layer1", "layer3"], str(path), input_size=(64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        l1 = full.layer1(h)
        l3 = full.layer3(full.layer2(l1))
    out = ex(x)
    torch.testing.assert_close(out["layer1"], l1)
    torch.testing.assert_close(out["layer3"], l3)
    assert ex.weights.policy == "path" and ex.weights.pretrained
    assert len(ex.weights.ident) == 16 and ex.weights.ident in ex.weights.describe()


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    full = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, path)
    ex = FeatureExtractor("resnet18", ["layer1"], str(path), input_size=(32, 32))
    torch.testing.assert_close(
        ex.model.state_dict()["conv1.weight"], full.state_dict()["conv1.weight"]
    )


class _Exploit:
    def __reduce__(self):
        return (
            exec,
            ("open('PWNED_PATH', 'w').write('x')".replace("PWNED_PATH", _Exploit.target),),
        )


def test_checkpoint_with_code_is_refused(tmp_path):
    _Exploit.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    with path.open("wb") as fh:
        pickle.dump({"conv1.weight": _Exploit()}, fh)
    with pytest.raises(BenchError, match="not a plain tensor checkpoint"):
        FeatureExtractor("resnet18", ["layer1"], str(path), input_size=(32, 32))
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_of_wrong_model_is_explained(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    with pytest.raises(BenchError, match="lacks|shape"):
        FeatureExtractor("wide_resnet50_2", ["layer1"], str(path), input_size=(32, 32))


def test_imagenet_never_falls_back(offline):
    with pytest.raises(BenchError, match="resnet18.tv_in1k"):
        FeatureExtractor("resnet18", ["layer1"], "imagenet", "torchvision", input_size=(32, 32))


def test_auto_falls_back_loudly_and_records_it(offline):
    with pytest.warns(UserWarning, match="RANDOM INITIALISATION"):
        ex = FeatureExtractor("resnet18", ["layer1"], "auto", "timm", input_size=(32, 32))
    assert ex.weights.policy == "auto" and not ex.weights.pretrained


def test_explicit_tags_per_provenance():
    spec = backbone_spec("wide_resnet50_2")
    assert spec.tag_for("torchvision") == "wide_resnet50_2.tv_in1k"
    assert spec.tag_for("timm-0.5.4") == "wide_resnet50_2.racm_in1k"
    assert backbone_spec("resnet18").tag_for("timm") == "resnet18.a1_in1k"
    assert backbone_spec("resnet34").kind == "cnn"  # any timm CNN by name


def test_unknown_backbone_lists_known():
    with pytest.raises(BenchError, match="resnet18"):
        backbone_spec("not_a_backbone")


def test_missing_checkpoint_or_policy():
    with pytest.raises(BenchError, match="no such file"):
        FeatureExtractor("resnet18", ["layer1"], "imagenet-ish", input_size=(32, 32))


def test_cached_features_keep_image_order_across_micro_batches(tmp_path):
    from bench.features import CPU_MICRO_BATCH, CachedFeatures

    ex = FeatureExtractor("resnet18", ["layer1", "layer3"], "random", input_size=(32, 32))
    images = torch.randn(2 * CPU_MICRO_BATCH + 3, 3, 32, 32)
    loader = torch.utils.data.DataLoader(images, batch_size=len(images) - 1)
    cpu = torch.device("cpu")
    for budget in (10**12, 0):  # in memory, then memory-mapped on disk
        cached = CachedFeatures.extract(
            ex, loader, cpu, memory_budget=budget, spill_dir=tmp_path, progress=False
        )
        for layer, value in ex(images).items():
            torch.testing.assert_close(cached.tensors[layer], value, rtol=1e-4, atol=1e-5)
        (batch,) = cached.batches(len(images))
        assert batch["layer3"].shape == (len(images), 256, *ex.shapes["layer3"])


def _active_resnet18(padding: str, size: int) -> FeatureExtractor:
    """resnet18 with random weights whose residual branches are switched on (timm zeroes
    the last BatchNorm scale of each block, which hides everything but the stem)."""
    ex = FeatureExtractor(
        "resnet18", ["layer1"], "random", input_size=(size, size), padding=padding
    )
    state = ex.model.state_dict()
    ex.model.load_state_dict(
        {k: torch.ones_like(v) if k.endswith("bn2.weight") else v for k, v in state.items()}
    )
    return ex


def test_reflect_and_zero_padding_differ_at_the_border_only():
    zeros, reflect = _active_resnet18("zeros", 96), _active_resnet18("reflect", 96)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    a, b = zeros(images)["layer1"], reflect(images)["layer1"]
    # The stem pads 2 rows of layer1 (stride 4), each of layer1's four 3x3 convolutions one
    # more: positions 6 or more from the edge never see a padded value.
    torch.testing.assert_close(a[..., 6:-6, 6:-6], b[..., 6:-6, 6:-6], rtol=1e-5, atol=1e-5)
    for edge in (a[..., 0, :] - b[..., 0, :], a[..., -1, :] - b[..., -1, :]):
        assert float(edge.abs().max()) > 1e-2
    for ex, mode in ((zeros, "zeros"), (reflect, "reflect")):
        convs = [m for m in ex.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert {m.padding_mode for m in convs} == {mode}


def _reflect_index(i: int, n: int) -> int:
    """Reflection without repeating the edge sample: -1 -> 1, n -> n - 2."""
    return -i if i < 0 else 2 * (n - 1) - i if i >= n else i


def test_reflect_stem_matches_a_hand_computation():
    ex = FeatureExtractor("resnet18", ["layer1"], "random", input_size=(32, 32), padding="reflect")
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stem = ex.model.conv1.double()
    weight = stem.weight.detach()  # (64, 3, 7, 7), stride 2, padding 3
    with torch.no_grad():
        out = stem(x)
    n = x.shape[-1]
    for row, col in ((0, 0), (0, 4), (2, 1), (4, 4)):
        expected = torch.zeros(64, dtype=torch.float64)
        for i in range(7):
            for j in range(7):
                y = _reflect_index(2 * row + i - 3, n)
                z = _reflect_index(2 * col + j - 3, n)
                expected += weight[:, :, i, j] @ x[0, :, y, z]
        torch.testing.assert_close(out[0, :, row, col], expected)


def test_folded_copy_keeps_reflect_padding():
    ex = _active_resnet18("reflect", 64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ex.model(images)[0]
    torch.testing.assert_close(ex(images)["layer1"], expected, rtol=1e-4, atol=1e-5)
    folded = ex._cnn_for_inference()
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert all(m.padding_mode == "reflect" for m in convs if m.padding != (0, 0))
    assert sum(m.padding_mode == "reflect" for m in convs) == 5  # the stem and four 3x3
    downsample = FeatureExtractor(
        "resnet18", ["layer2"], "random", input_size=(32, 32), padding="reflect"
    )
    one_by_one = [m for m in downsample.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {m.kernel_size for m in one_by_one if m.padding_mode == "zeros"} == {(1, 1)}


def test_identity_tells_paddings_apart():
    zeros = FeatureExtractor("resnet18", ["layer2"], "random", input_size=(32, 32))
    again = FeatureExtractor("resnet18", ["layer2"], "random", input_size=(32, 32))
    reflect = FeatureExtractor(
        "resnet18", ["layer2"], "random", input_size=(32, 32), padding="reflect"
    )
    assert zeros.identity == again.identity
    assert zeros.identity != reflect.identity
    with pytest.raises(BenchError, match="encoder padding 'circular'"):
        FeatureExtractor("resnet18", ["layer2"], "random", input_size=(32, 32), padding="circular")


@pytest.mark.parametrize(
    "backbone", ["resnet18", pytest.param("wide_resnet50_2", marks=pytest.mark.slow)]
)
def test_reflect_extractor_equals_cflow_ads_resnet(backbone):
    """CFLOW-AD's encoder is torchvision's ResNet with ``padding_mode='reflect'`` on the 7x7
    stem and on every 3x3 convolution; ours must give its features from the same weights."""
    import torchvision

    torch.manual_seed(0)
    theirs = getattr(torchvision.models, backbone)(weights=None).eval()
    for module in theirs.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size in ((7, 7), (3, 3)):
            module.padding_mode = "reflect"
    with torch.no_grad():  # running statistics away from their init, as trained weights are
        for module in theirs.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    layers = ["layer2", "layer3", "layer4"]
    ours = FeatureExtractor(backbone, layers, "random", input_size=(64, 64), padding="reflect")
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    ours.model.load_state_dict(state)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(images))))
        expected = {}
        for name in ["layer1", *layers]:
            x = getattr(theirs, name)(x)
            expected[name] = x
        loaded = dict(zip(layers, ours.model(images), strict=True))
    features = ours(images)  # BatchNorm folded: rounding grows with depth, so relative
    for layer in layers:
        torch.testing.assert_close(loaded[layer], expected[layer])
        scale = expected[layer].abs().max()
        assert float((features[layer] - expected[layer]).abs().max() / scale) < 1e-5


def test_scale_suffix_reads_the_layer_on_the_downscaled_input():
    ex = FeatureExtractor(
        "resnet18", ["layer3", "layer3@2", "layer3@4"], "random", input_size=(64, 64)
    )
    assert ex.shapes == {"layer3": (4, 4), "layer3@2": (2, 2), "layer3@4": (1, 1)}
    assert ex.strides == {"layer3": 16, "layer3@2": 32, "layer3@4": 64}
    images = torch.randn(2, 3, 64, 64)
    out = ex(images)
    with torch.no_grad():
        for layer, size in (("layer3", 64), ("layer3@2", 32), ("layer3@4", 16)):
            # nearest-neighbour resizing, F.interpolate's default, as CS-Flow's references
            x = torch.nn.functional.interpolate(images, size=(size, size), mode="nearest")
            torch.testing.assert_close(out[layer], ex.model(x)[0], rtol=1e-4, atol=1e-5)


def test_module_path_layers_reach_stages_without_a_feature_level():
    ex = FeatureExtractor(
        "efficientnet_b0", ["blocks.5", "blocks.5@2"], "random", input_size=(64, 64)
    )
    assert ex.channels == {"blocks.5": 192, "blocks.5@2": 192}
    assert ex.shapes == {"blocks.5": (2, 2), "blocks.5@2": (1, 1)}
    images = torch.randn(2, 3, 64, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the extractor's random initialisation
        full = timm.create_model("efficientnet_b0", pretrained=False).eval()
    with torch.no_grad():
        (expected,) = full.forward_intermediates(
            images, indices=[6], intermediates_only=True, extra_blocks=True
        )
    torch.testing.assert_close(ex(images)["blocks.5"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "tf_efficientnet_b5"])
def test_traced_extractor_folds_batchnorm_and_keeps_the_activation(backbone):
    # timm's EfficientNets are traced module-path extractors with BatchNormAct2d (the TF
    # port with padding-"same" convolutions): the fold must keep each norm's activation
    ex = FeatureExtractor(backbone, ["blocks.5"], "random", input_size=(64, 64))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # statistics away from (0, 1) so that a wrong fold shows
        for m in ex.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(1 + 0.1 * torch.randn(m.num_features, generator=gen))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        (expected,) = ex.model(images).values()
    folded = ex._cnn_for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.SiLU) for m in folded.modules())
    scale = expected.abs().max()
    torch.testing.assert_close(ex(images)["blocks.5"] / scale, expected / scale, rtol=0, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in ex.model.modules())  # untouched


def test_bad_layer_specs_are_explained():
    with pytest.raises(BenchError, match="no layer 'blocks.99'"):
        FeatureExtractor("resnet18", ["blocks.99"], "random", input_size=(32, 32))
    with pytest.raises(BenchError, match="at least 64 pixels"):
        FeatureExtractor("resnet18", ["layer1@64"], "random", input_size=(32, 32))


def test_paper_efficientnet_b5_weights_are_the_tensorflow_port():
    spec = backbone_spec("tf_efficientnet_b5")
    assert {spec.tag_for(p) for p in ("torchvision", "timm-0.5.4", "timm")} == {
        "tf_efficientnet_b5.in1k"
    }
