"""PaDiM against its specification: subset, Gaussian fit, Mahalanobis, blur, layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis

from bench.errors import BenchError
from bench.features import CachedFeatures
from bench.methods.base import MethodContext, apply_overrides
from bench.methods.padim import Padim, channel_subset, gaussian_blur
from bench.profiling import method_size


def _context(channels=(4, 6, 8), grid=(8, 8), output=(32, 32), backbone="tiny"):
    layers = ("layer1", "layer2", "layer3")
    shapes = {layer: (grid[0] // 2**i, grid[1] // 2**i) for i, layer in enumerate(layers)}
    return MethodContext(
        backbone=backbone,
        reference="original",
        channels=dict(zip(layers, channels, strict=True)),
        shapes=shapes,
        output_size=output,
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )


def _features(context: MethodContext, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        layer: torch.randn(n, c, *context.shapes[layer], generator=g)
        for layer, c in context.channels.items()
    }


def test_original_subset_matches_reference_seed_1024():
    assert channel_subset(448, 100, "python-random-1024")[:10] == [
        408,
        9,
        247,
        435,
        199,
        165,
        424,
        405,
        266,
        51,
    ]
    assert channel_subset(1792, 550, "python-random-1024")[:10] == [
        1632,
        39,
        990,
        1740,
        797,
        661,
        1698,
        1623,
        1782,
        1064,
    ]


def test_subset_rejects_bad_size():
    with pytest.raises(BenchError, match="n_features"):
        channel_subset(448, 500, "python-random-1024")


def test_reference_defaults_differ_as_specified():
    original = Padim.default_settings("resnet18", "original")
    anomalib = Padim.default_settings("resnet18", "anomalib")
    pre_o = Padim.preprocess("resnet18", "original", original)
    pre_a = Padim.preprocess("resnet18", "anomalib", anomalib)
    assert pre_o.size == (256, 256) and pre_o.crop == (224, 224) and pre_o.resample == "lanczos"
    assert pre_a.crop is None and pre_a.resample == "bilinear"
    assert anomalib.extra_regularisation == 1e-5 and anomalib.subset == "torch-randperm"
    assert Padim.weights_provenance("resnet18", "original") == "torchvision"


def test_original_crop_scales_with_input_size():
    smaller = dataclasses.replace(Padim.default_settings("resnet18", "original"), input_size=128)
    pre = Padim.preprocess("resnet18", "original", smaller)
    assert pre.size == (128, 128) and pre.crop == (112, 112)
    with pytest.raises(BenchError, match="crop_fraction"):
        Padim.preprocess("resnet18", "original", dataclasses.replace(smaller, crop_fraction=1.5))


@pytest.mark.parametrize("border,mode", [("symmetric", "reflect"), ("mirror", "mirror")])
def test_blur_matches_scipy(border, mode):
    maps = torch.rand(2, 70, 50, dtype=torch.float32)
    ours = gaussian_blur(maps, 4.0, border).numpy()
    for i in range(2):
        ref = gaussian_filter(maps[i].numpy().astype(np.float64), sigma=4.0, mode=mode)
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)


def test_embedding_equals_full_upsample_then_select():
    context = _context()
    settings = dataclasses.replace(Padim.default_settings("tiny", "original"), n_features=10)
    padim = Padim(settings, context)
    feats = _features(context, 3)
    full = torch.cat(
        [
            F.interpolate(feats[k], size=(8, 8), mode="nearest")
            for k in ("layer1", "layer2", "layer3")
        ],
        dim=1,
    )
    expected = full.index_select(1, padim.model.index).flatten(2)
    torch.testing.assert_close(padim.model.embed(feats), expected)


def test_fit_and_distances_match_numpy_and_scipy():
    context = _context()
    settings = dataclasses.replace(
        Padim.default_settings("tiny", "original"), n_features=12, blur_sigma=0.0
    )
    padim = Padim(settings, context)
    train = _features(context, 30, seed=1)
    padim.fit(CachedFeatures(train, torch.device("cpu")))
    test = _features(context, 2, seed=2)
    distances = padim.model.distances(padim.model.embed(test)).numpy()
    train_emb = padim.model.embed(train).numpy().astype(np.float64)
    test_emb = padim.model.embed(test).numpy().astype(np.float64)
    for pos in (0, 17, 63):
        x = train_emb[:, :, pos]
        mean = x.mean(0)
        cov = np.cov(x, rowvar=False) + 0.01 * np.eye(x.shape[1])
        np.testing.assert_allclose(padim.model.mean[:, pos].numpy(), mean, rtol=1e-5, atol=1e-6)
        inv = np.linalg.inv(cov)
        for b in range(2):
            ref = mahalanobis(test_emb[b, :, pos], mean, inv)
            row, col = divmod(pos, 8)
            assert distances[b, row, col] == pytest.approx(ref, rel=1e-4)


def test_predict_shapes_and_score_is_map_max():
    context = _context(output=(40, 40))
    settings = apply_overrides(
        Padim.default_settings("tiny", "anomalib"), {"n_features": "8", "blur_sigma": "2"}, "padim"
    )
    padim = Padim(settings, context)
    padim.fit(CachedFeatures(_features(context, 10), torch.device("cpu")))
    scores, maps = padim.predict_batch(_features(context, 4, seed=3))
    assert maps.shape == (4, 40, 40) and scores.shape == (4,)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    assert padim.trainable_parameters() == 0


def test_state_dict_round_trip_gives_identical_maps():
    context = _context()
    settings = dataclasses.replace(Padim.default_settings("tiny", "original"), n_features=8)
    first = Padim(settings, context)
    first.fit(CachedFeatures(_features(context, 10), torch.device("cpu")))
    second = Padim(settings, context)
    second.load_state_dict(first.state_dict())
    feats = _features(context, 2, seed=5)
    torch.testing.assert_close(first.predict_batch(feats)[1], second.predict_batch(feats)[1])


def test_needs_two_training_images():
    context = _context()
    padim = Padim(
        dataclasses.replace(Padim.default_settings("t", "original"), n_features=4), context
    )
    with pytest.raises(BenchError, match="two training images"):
        padim.fit(CachedFeatures(_features(context, 1), torch.device("cpu")))


@pytest.mark.parametrize(
    ("grid", "size", "gigabytes"),
    [((56, 56), 224, 3.79), ((64, 64), 256, 4.96)],  # the original's 224 crop, anomalib's 256
)
def test_model_bytes_are_the_stored_gaussians(grid, size, gigabytes):
    """WR50-Rd550: HW x 550^2 float32 inverse covariances and 550 x HW means."""
    context = dataclasses.replace(
        _context(channels=(256, 512, 1024), grid=grid, output=(size, size)),
        backbone="wide_resnet50_2",
        device=torch.device("meta"),
    )
    with torch.device("meta"):  # shapes only: 3.8 GB is never allocated
        method = Padim(Padim.default_settings("wide_resnet50_2", "original"), context)
    positions = grid[0] * grid[1]
    inverse_covariances = positions * 550 * 550 * 4
    assert round(inverse_covariances / 1e9, 2) == gigabytes
    assert method.model_bytes() == inverse_covariances + 550 * positions * 4
    assert method_size(method) == {
        "params_head": 0,
        "params_additional": 0,
        "model_bytes": method.model_bytes(),
    }
