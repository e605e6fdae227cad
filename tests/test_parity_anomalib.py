"""Weight-ported parity with anomalib's FastflowModel (docs/methods.md).

anomalib is never a dependency of the project: the reference runs in the interpreter named
by ``ANOMALIB_PYTHON`` (a separate environment), saves its weights, input and outputs, and
this test ports the weights and compares. Skipped when the variable is unset.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from bench.extractor import FeatureExtractor
from bench.methods.base import MethodContext
from bench.methods.fastflow import FastFlow, FastFlowSettings, port_reference_state

ANOMALIB_PYTHON = os.environ.get("ANOMALIB_PYTHON")
# Relative to the reference's largest magnitude (``relative_difference``), for every
# backbone. Latents and log-determinants pass through every flow step and sum over
# thousands of positions, so they keep fewer digits than the maps.
TOLERANCE = {"map": 1e-5, "score": 1e-5, "latent": 1e-4, "log_det": 1e-4}

pytestmark = [
    pytest.mark.anomalib,
    pytest.mark.skipif(not ANOMALIB_PYTHON, reason="set ANOMALIB_PYTHON to a python with anomalib"),
]

# Runs in the anomalib interpreter. Trainable tensors are moved off their init so that the
# LayerNorm affines, global scales and offsets all take part in the comparison.
REFERENCE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from anomalib.models.image.fastflow.torch_model import FastflowModel

    backbone, size, conv3x3_only, out = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    torch.manual_seed(0)
    model = FastflowModel(
        input_size=(size, size), backbone=backbone, pre_trained=False, conv3x3_only=conv3x3_only
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    images = torch.randn(2, 3, size, size, generator=gen)
    model.eval()
    with torch.no_grad():
        maps = model(images).anomaly_map
        model.train()
        latents, log_dets = model(images)
    torch.save(
        {
            "state": model.state_dict(),
            "images": images,
            "maps": maps,
            "latents": latents,
            "log_dets": log_dets,
        },
        out,
    )
    """
)


def _reference(backbone: str, size: int, conv3x3_only: bool, folder: Path) -> dict:
    script = folder / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    out = folder / "reference.pt"
    args = [backbone, str(size), "1" if conv3x3_only else "0", str(out)]
    subprocess.run([ANOMALIB_PYTHON, str(script), *args], check=True, timeout=600)
    return torch.load(out, weights_only=True)


def _max_differences(backbone: str, size: int, conv3x3_only: bool, folder: Path) -> dict:
    ref = _reference(backbone, size, conv3x3_only, folder)
    settings = FastFlowSettings(input_size=size, conv3x3_only=conv3x3_only)
    layers = FastFlow.needs(backbone, settings)
    extractor = FeatureExtractor(backbone, layers, weights="random", input_size=(size, size))
    prefix = "feature_extractor."
    extractor.model.load_state_dict(
        {k[len(prefix) :]: v for k, v in ref["state"].items() if k.startswith(prefix)}
    )
    context = MethodContext(
        backbone=backbone,
        reference="anomalib",
        channels=dict(extractor.channels),
        shapes=dict(extractor.shapes),
        output_size=(size, size),
        device=torch.device("cpu"),
        seed=5,
        progress=False,
    )
    method = FastFlow(settings, context)
    method.load_state_dict(port_reference_state(ref["state"]))
    features = extractor(ref["images"])
    scores, maps = method.predict_batch(features)
    with torch.no_grad():
        latents, log_dets = method.model([features[k] for k in layers])
    # The comparison means something only if the maps vary (random weights can saturate them).
    assert float(maps.std()) > 1e-3
    pairs = {
        "map": [(maps, ref["maps"][:, 0])],
        "score": [(scores, ref["maps"].amax(dim=(1, 2, 3)))],
        "latent": list(zip(latents, ref["latents"], strict=True)),
        "log_det": list(zip(log_dets, ref["log_dets"], strict=True)),
    }
    for name, pair in pairs.items():
        absolute = max(float((a - b).abs().max()) for a, b in pair)
        scale = max(float(b.abs().max()) for _, b in pair)
        print(f"{backbone} {name}: max |difference| {absolute:.3g}, max |reference| {scale:.3g}")
    return {name: max(relative_difference(a, b) for a, b in pair) for name, pair in pairs.items()}


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest difference over the reference's largest magnitude.

    Float32 kernels round differently from one CPU to another (AVX2 or AVX-512 paths), and
    the flows carry those differences through every step in proportion to the values:
    wide_resnet50_2's latents are far larger than resnet18's. A bound relative to each
    quantity's scale serves every backbone and machine where an absolute one cannot.
    """
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.mark.parametrize("conv3x3_only", [False, True], ids=["alternating", "conv3x3_only"])
def test_resnet18_maps_match_anomalib(conv3x3_only: bool, tmp_path: Path) -> None:
    diff = _max_differences("resnet18", 64, conv3x3_only, tmp_path)
    print(f"resnet18 conv3x3_only={conv3x3_only}, relative: {diff}")
    assert all(diff[name] <= bound for name, bound in TOLERANCE.items()), diff


@pytest.mark.slow
def test_wide_resnet50_maps_match_anomalib(tmp_path: Path) -> None:
    diff = _max_differences("wide_resnet50_2", 64, False, tmp_path)
    print(f"wide_resnet50_2 alternating, relative: {diff}")
    assert all(diff[name] <= bound for name, bound in TOLERANCE.items()), diff
