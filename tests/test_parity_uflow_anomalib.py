"""Weight-ported parity with anomalib 2.7's UflowModel (resnet18 backbone).

anomalib is never a dependency of the project: the reference runs in the interpreter named
by ``ANOMALIB_PYTHON``, saves its weights, input and outputs, and this test ports the
weights into our extractor and U-Flow and compares. anomalib's Uflow always asks timm for
ImageNet weights; the reference script makes timm initialise them randomly instead (no
download), which the ported state dict then carries over. Skipped when the variable is
unset.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.extractor import FeatureExtractor
from bench.methods import uflow_nfa
from bench.methods.base import MethodContext
from bench.methods.uflow import UFlow, port_reference_state

ANOMALIB_PYTHON = os.environ.get("ANOMALIB_PYTHON", "")
BACKBONE = "resnet18"
SIZE = 128
BATCH = 3
TOLERANCE = 1e-5
BACKBONE_PREFIX = "feature_extractor.feature_extractor."

pytestmark = [
    pytest.mark.anomalib,
    pytest.mark.skipif(
        not (ANOMALIB_PYTHON and Path(ANOMALIB_PYTHON).exists()),
        reason="set ANOMALIB_PYTHON to a python with anomalib installed",
    ),
]

# Runs in the anomalib interpreter. Every trainable tensor (LayerNorm affines, global
# scales and offsets, subnets) is moved off its initial value before the comparison.
REFERENCE_SCRIPT = textwrap.dedent(
    """
    import sys
    import timm
    import torch

    create_model = timm.create_model
    timm.create_model = lambda *a, **k: create_model(*a, **{**k, "pretrained": False})
    from anomalib.models.image.uflow.torch_model import UflowModel

    backbone, size, batch, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    model = UflowModel(input_size=(size, size), backbone=backbone)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    images = torch.randn(batch, 3, size, size, generator=gen)
    model.eval()
    with torch.no_grad():
        result = model(images)
        latents, log_det = model.encode(model.feature_extractor(images))
        mask = model.anomaly_map_generator.compute_anomaly_mask(latents)
    torch.save(
        {
            "state": model.state_dict(),
            "images": images,
            "maps": result.anomaly_map,
            "scores": result.pred_score,
            "latents": latents,
            "log_det": log_det,
            "nfa_mask": mask,
        },
        out,
    )
    """
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("uflow-parity")
    script = folder / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    out = folder / "reference.pt"
    subprocess.run(
        [ANOMALIB_PYTHON, str(script), BACKBONE, str(SIZE), str(BATCH), str(out)],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        timeout=600,
        stdout=sys.stderr,
    )
    return torch.load(out, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ported(reference: dict) -> tuple[FeatureExtractor, UFlow]:
    """Our extractor and U-Flow holding anomalib's weights."""
    settings = dataclasses.replace(UFlow.default_settings(BACKBONE, "anomalib"), input_size=SIZE)
    extractor = FeatureExtractor(
        BACKBONE, UFlow.needs(BACKBONE, settings), weights="random", input_size=(SIZE, SIZE)
    )
    state = reference["state"]
    extractor.model.load_state_dict(
        {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    )
    context = MethodContext(
        backbone=BACKBONE,
        reference="anomalib",
        channels=extractor.channels,
        shapes=extractor.shapes,
        output_size=(SIZE, SIZE),
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )
    method = UFlow(settings, context)
    method.load_state_dict(port_reference_state(state))
    return extractor, method


def test_maps_and_scores_match_anomalib(reference: dict, ported: tuple) -> None:
    extractor, method = ported
    scores, maps = method.predict_batch(extractor(reference["images"]))
    expected = reference["maps"].squeeze(1)
    assert maps.shape == expected.shape
    difference = (maps - expected).abs().max().item()
    print(f"uflow parity {BACKBONE}: max abs map difference {difference:.3e}")
    assert difference <= TOLERANCE
    assert (scores - reference["scores"].reshape(-1)).abs().max().item() <= TOLERANCE


def test_latents_and_log_det_match_anomalib(reference: dict, ported: tuple) -> None:
    extractor, method = ported
    features = extractor(reference["images"])
    with torch.no_grad():
        latents, log_det = method.model([features[k] for k in method.layers])
    for ours, theirs in zip(latents, reference["latents"], strict=True):
        assert ours.shape == theirs.shape
        relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        print(f"uflow parity latents {tuple(theirs.shape)}: max relative difference {relative:.3e}")
        assert relative <= TOLERANCE
    expected = reference["log_det"]
    assert ((log_det - expected).abs().max() / expected.abs().max()).item() <= TOLERANCE


def test_binomial_nfa_is_the_complement_of_anomalibs_mask(reference: dict) -> None:
    """anomalib's compute_anomaly_mask marks log NFA > 0; we segment log NFA < 0."""
    stats = uflow_nfa.statistics(reference["latents"], "binomial")
    log_nfa = uflow_nfa.log_nfa(stats, "binomial", (SIZE, SIZE))
    theirs = reference["nfa_mask"].squeeze(1)
    assert torch.equal(log_nfa > 0, theirs)
    assert torch.equal(log_nfa < 0, ~theirs)  # no pixel sits exactly at 0
