"""Weight-ported parity with anomalib 2.7's CsFlowModel.

anomalib is never a dependency of the project: the reference runs in the interpreter named
by ``ANOMALIB_PYTHON``, writes its flow's state dict, the multi-scale features its
backbone produced, its latents, loss, scores and maps, and this test loads the flow's
weights into ours and compares on the same features. anomalib's backbone (torchvision's
EfficientNet-B5) downloads ImageNet weights when built; the script builds it without
weights, so nothing is downloaded. Skipped when ``ANOMALIB_PYTHON`` is unset.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.methods.base import MethodContext
from bench.methods.csflow import CsFlow, csflow_loss, port_anomalib_state

ANOMALIB_PYTHON = os.environ.get("ANOMALIB_PYTHON", "")
BACKBONE = "tf_efficientnet_b5"
SIZE = 256  # maps of 8, 4 and 2
HIDDEN = 32  # anomalib's cross_conv_hidden_channels, small to keep the test quick
BATCH = 3
TOLERANCE = 1e-5

REFERENCE_SCRIPT = r"""
import sys
import torch
import torchvision
import anomalib.models.image.csflow.torch_model as torch_model
from anomalib.models.image.csflow.loss import CsFlowLoss

size, hidden, batch, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch_model.efficientnet_b5 = lambda weights=None: torchvision.models.efficientnet_b5(weights=None)
torch.manual_seed(0)
model = torch_model.CsFlowModel(input_size=(size, size), cross_conv_hidden_channels=hidden)
gen = torch.Generator().manual_seed(1)
with torch.no_grad():  # gammas start at 0 (an identity flow): move every flow weight
    for name, p in model.graph.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("gamma"):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        else:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
images = torch.randn(batch, 3, size, size, generator=gen)
model.eval()
with torch.no_grad():
    features = model.feature_extractor(images)
    latents, jacobian = model.graph(features)
    loss = CsFlowLoss()(latents, jacobian)
    result = model(images)
torch.save(
    {
        "state_dict": {k: v for k, v in model.state_dict().items() if k.startswith("graph.")},
        "features": features,
        "latents": latents,
        "jacobian": jacobian,
        "loss": loss,
        "maps": result.anomaly_map,
        "scores": result.pred_score,
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("csflow-anomalib")
    script = folder / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    out = folder / "reference.pt"
    subprocess.run(
        [ANOMALIB_PYTHON, str(script), str(SIZE), str(HIDDEN), str(BATCH), str(out)],
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        timeout=900,
        stdout=sys.stderr,
    )
    return torch.load(out, map_location="cpu", weights_only=True)


def ported(reference: dict) -> tuple[CsFlow, dict]:
    """Our method holding anomalib's flow weights, and the features it was given."""
    settings = dataclasses.replace(
        CsFlow.default_settings(BACKBONE, "anomalib"), input_size=SIZE, hidden_channels=HIDDEN
    )
    layers = CsFlow.needs(BACKBONE, settings)
    features = dict(zip(layers, reference["features"], strict=True))
    context = MethodContext(
        backbone=BACKBONE,
        reference="anomalib",
        channels={k: v.shape[1] for k, v in features.items()},
        shapes={k: tuple(v.shape[2:]) for k, v in features.items()},
        output_size=(SIZE, SIZE),
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )
    method = CsFlow(settings, context)
    method.load_state_dict(port_anomalib_state(reference["state_dict"]))
    return method, features


def test_maps_scores_latents_and_loss_match_anomalib(reference: dict) -> None:
    method, features = ported(reference)
    scores, maps = method.predict_batch(features)
    expected = reference["maps"].squeeze(1)
    assert maps.shape == expected.shape
    map_difference = (maps - expected).abs().max().item()
    score_difference = (scores - reference["scores"]).abs().max().item()
    with torch.no_grad():
        latents, log_det = method.model(list(features.values()))
        loss = csflow_loss(latents, log_det, method.settings.log_det)
    print(
        f"csflow parity: max abs map difference {map_difference:.3e} "
        f"(maps up to {expected.abs().max().item():.3g}), score {score_difference:.3e}"
    )
    assert map_difference <= TOLERANCE * min(1.0, expected.abs().max().item())
    assert score_difference <= TOLERANCE * min(1.0, reference["scores"].abs().max().item())
    for ours, theirs in zip(latents, reference["latents"], strict=True):
        scale = theirs.abs().max().item()
        assert (ours - theirs).abs().max().item() <= TOLERANCE * scale
    # FrEIA gives every image of the batch the log-determinant summed over the whole batch.
    total = reference["jacobian"]
    assert total.shape == (BATCH,) and torch.all(total == total[0])
    assert abs(log_det.sum().item() - total[0].item()) <= TOLERANCE * abs(total[0].item())
    assert abs(loss.item() - reference["loss"].item()) <= TOLERANCE * abs(reference["loss"].item())


def test_every_anomalib_flow_tensor_is_ported(reference: dict) -> None:
    method, _ = ported(reference)
    state = port_anomalib_state(reference["state_dict"])
    assert set(state) == set(method.model.state_dict())
    ours = sum(p.numel() for p in method.model.parameters())
    assert ours == sum(v.numel() for v in reference["state_dict"].values())
