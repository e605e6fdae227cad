"""Weight-ported parity with anomalib 2.7's CflowModel (docs/methods.md).

anomalib is never a dependency of the project: the reference runs in the interpreter named
by ``ANOMALIB_PYTHON``, writes its state dict, input and maps to a file, and this test loads
them into our extractor and decoders. ``CFLOW_PARITY_BACKBONES`` (comma-separated, default
resnet18) adds wide_resnet50_2.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.extractor import FeatureExtractor
from bench.methods.base import MethodContext
from bench.methods.cflow import CFlow

ANOMALIB_PYTHON = os.environ.get("ANOMALIB_PYTHON", "")
LAYERS = ["layer2", "layer3", "layer4"]
SIZE = 128
BATCH = 3  # layer4 then has 48 fibers: one partial chunk of the 64-fiber batch
# Relative to the reference's largest magnitude (``relative_difference``), for every
# backbone. The map is max(score) - score, a difference of sums of up to three
# probabilities near 1, so it keeps fewer digits relative to its own range than they do.
TOLERANCE = {"map": 1e-4, "score": 1e-4, "latent": 1e-4, "log_det": 1e-4}

REFERENCE_SCRIPT = r"""
import sys
import torch
from anomalib.models.image.cflow.torch_model import CflowModel
from anomalib.models.image.cflow.utils import positional_encoding_2d

backbone, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = CflowModel(backbone=backbone, layers=("layer2", "layer3", "layer4"), pre_trained=False)
gen = torch.Generator().manual_seed(1)
with torch.no_grad():  # move every decoder parameter away from its identity-like init
    for decoder in model.decoders:
        for name, p in decoder.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
images = torch.randn(int(sys.argv[3]), 3, int(sys.argv[4]), int(sys.argv[4]), generator=gen)
model.eval()
latents, log_dets = [], []
with torch.no_grad():
    result = model(images)
    features = model.encoder(images)
    for layer, decoder in zip(model.pool_layers, model.decoders):
        b, c, h, w = features[layer].shape
        fibers = features[layer].permute(0, 2, 3, 1).reshape(-1, c)
        conditions = positional_encoding_2d(model.condition_vector, h, w)
        conditions = conditions.permute(1, 2, 0).reshape(h * w, -1).repeat(b, 1)
        z, log_det = decoder(fibers, [conditions])
        latents.append(z)
        log_dets.append(log_det)
torch.save(
    {
        "state_dict": model.state_dict(),
        "images": images,
        "maps": result.anomaly_map,
        "scores": result.pred_score,
        "latents": latents,
        "log_dets": log_dets,
    },
    out,
)
"""

pytestmark = [
    pytest.mark.anomalib,
    pytest.mark.skipif(
        not (ANOMALIB_PYTHON and Path(ANOMALIB_PYTHON).exists()),
        reason="set ANOMALIB_PYTHON to a python with anomalib installed",
    ),
]


def run_reference(backbone: str, folder: Path) -> dict:
    script = folder / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    out = folder / "reference.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [ANOMALIB_PYTHON, str(script), backbone, str(out), str(BATCH), str(SIZE)],
        check=True,
        env=env,
        timeout=600,
        stdout=sys.stderr,
    )
    return torch.load(out, map_location="cpu", weights_only=True)


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest difference over the reference's largest magnitude: float32 kernels round
    differently from one CPU to another in proportion to the values, so one relative bound
    serves every backbone and machine where an absolute one cannot."""
    return float((ours - reference).abs().max() / reference.abs().max())


def ported(backbone: str, state: dict, eval_chunk: int) -> tuple[FeatureExtractor, CFlow]:
    """Our extractor and method holding anomalib's weights."""
    extractor = FeatureExtractor(backbone, LAYERS, weights="random", input_size=(SIZE, SIZE))
    prefix = "encoder.feature_extractor."
    encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    extractor.model.load_state_dict(encoder)
    settings = dataclasses.replace(
        CFlow.default_settings(backbone, "anomalib"), eval_chunk=eval_chunk
    )
    context = MethodContext(
        backbone=backbone,
        reference="anomalib",
        channels=extractor.channels,
        shapes=extractor.shapes,
        output_size=(SIZE, SIZE),
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )
    method = CFlow(settings, context)
    method.load_state_dict({k: v for k, v in state.items() if k.startswith("decoders.")})
    return extractor, method


@pytest.mark.parametrize(
    "backbone", os.environ.get("CFLOW_PARITY_BACKBONES", "resnet18").split(",")
)
def test_maps_match_anomalib(backbone: str, tmp_path: Path) -> None:
    reference = run_reference(backbone, tmp_path)
    expected = reference["maps"].squeeze(1)
    pairs: dict[str, list] = {"latent": [], "log_det": []}
    for eval_chunk in (0, 4096):  # anomalib's 64-fiber chunks, then our default
        extractor, method = ported(backbone, reference["state_dict"], eval_chunk)
        features = extractor(reference["images"])
        scores, maps = method.predict_batch(features)
        assert maps.shape == expected.shape
        pairs[f"map, eval_chunk={eval_chunk}"] = [(maps, expected)]
        pairs[f"score, eval_chunk={eval_chunk}"] = [(scores, reference["scores"])]
    with torch.no_grad():  # every fiber through the decoders as they train
        for layer, decoder, z, log_det in zip(
            LAYERS, method.model.decoders, reference["latents"], reference["log_dets"], strict=True
        ):
            b, c, h, w = features[layer].shape
            fibers = features[layer].permute(0, 2, 3, 1).reshape(-1, c)
            conditions = method._conditions.rows(h, w, method.device).repeat(b, 1)
            ours_z, ours_log_det = decoder(fibers, [conditions])
            pairs["latent"].append((ours_z, z))
            pairs["log_det"].append((ours_log_det, log_det))
    for name, pair in pairs.items():
        relative = max(relative_difference(a, b) for a, b in pair)
        absolute = max(float((a - b).abs().max()) for a, b in pair)
        scale = max(float(b.abs().max()) for _, b in pair)
        print(
            f"cflow {backbone} {name}: max |difference| {absolute:.3g}, "
            f"max |reference| {scale:.3g}, relative {relative:.3g}"
        )
        assert relative <= TOLERANCE[name.split(",")[0]], name
