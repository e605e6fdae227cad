"""Parity with the authors' CS-Flow code (reference ``original``), without porting weights.

The authors' repository is never part of the project: ``CSFLOW_REFERENCE_DIR`` names a
checkout of it (model.py, freia_funcs.py, utils.py), which this test imports with a
small configuration of its own (256 px, 32 hidden channels) and a stub for the
efficientnet_pytorch backbone, which the flow does not use. Built under the same torch
seed, both flows draw the same weights in the same order and the same numpy permutations,
so latents, loss, scores and maps are compared directly. Skipped when the variable is
unset.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from bench.methods.base import MethodContext
from bench.methods.csflow import CsFlow, csflow_loss

REFERENCE_DIR = os.environ.get("CSFLOW_REFERENCE_DIR", "")
LAYERS = ["blocks.5", "blocks.5@2", "blocks.5@4"]
SIZE, HIDDEN = 256, 32
CONFIG = f"""
device = "cpu"
img_size = ({SIZE}, {SIZE})
n_scales = 3
clamp = 3
n_coupling_blocks = 4
fc_internal = {HIDDEN}
use_gamma = True
n_feat = 304
map_size = (img_size[0] // 32, img_size[1] // 32)
kernel_sizes = [3] * (n_coupling_blocks - 1) + [5]
pre_extracted = True
class_name = "unused"
"""

pytestmark = pytest.mark.skipif(
    not (REFERENCE_DIR and (Path(REFERENCE_DIR) / "freia_funcs.py").is_file()),
    reason="set CSFLOW_REFERENCE_DIR to a checkout of the authors' CS-Flow code",
)


@pytest.fixture
def authors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    (tmp_path / "config.py").write_text(CONFIG)
    monkeypatch.syspath_prepend(REFERENCE_DIR)
    monkeypatch.syspath_prepend(str(tmp_path))  # our config.py before theirs
    monkeypatch.setitem(
        sys.modules, "efficientnet_pytorch", types.SimpleNamespace(EfficientNet=None)
    )
    for name in ("config", "freia_funcs", "utils", "model"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return types.SimpleNamespace(
        model=importlib.import_module("model"), utils=importlib.import_module("utils")
    )


def test_original_reference_matches_the_authors_flow(authors: types.SimpleNamespace) -> None:
    torch.manual_seed(0)
    theirs = authors.model.get_cs_flow_model().eval()
    settings = dataclasses.replace(
        CsFlow.default_settings("tf_efficientnet_b5", "original"),
        input_size=SIZE,
        hidden_channels=HIDDEN,
    )
    context = MethodContext(
        backbone="tf_efficientnet_b5",
        reference="original",
        channels=dict.fromkeys(LAYERS, 304),
        shapes=dict(zip(LAYERS, [(8, 8), (4, 4), (2, 2)], strict=True)),
        output_size=(SIZE, SIZE),
        device=torch.device("cpu"),
        seed=0,
        progress=False,
    )
    ours = CsFlow(settings, context)  # seeds torch with context.seed = 0, as above
    weights = [(n, p) for n, p in theirs.named_parameters() if "gamma" not in n]
    own = [(n, p) for n, p in ours.model.named_parameters() if not n.endswith("gamma")]
    assert len(weights) == len(own)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(weights, own, strict=True))

    gen = torch.Generator().manual_seed(5)
    gammas = [p for n, p in theirs.named_parameters() if "gamma" in n]
    values = 0.5 * torch.randn(len(gammas), generator=gen)
    features = [torch.randn(3, 304, s, s, generator=gen) for s in (8, 4, 2)]
    with torch.no_grad():
        for p, value in zip(gammas, values, strict=True):
            p.fill_(value)
        # their s1 then s2 per block are our net2 then net1
        nets = [net for block in ours.model.blocks for net in (block.net2, block.net1)]
        for index, net in enumerate(nets):
            net.gamma.copy_(values[3 * index : 3 * index + 3])
        latents_ref = theirs(features)
        log_det_ref = sum(theirs.jacobian(run_forward=False))
        loss_ref = authors.utils.get_loss(latents_ref, theirs.jacobian(run_forward=False))
        score_ref = (authors.utils.concat_maps(latents_ref) ** 2 / 2).mean(dim=(1, 2))
        # evaluate.py: channel mean of z^2 at the largest scale, bilinearly upsampled
        map_ref = F.interpolate(
            torch.mean(latents_ref[0] ** 2, dim=1, keepdim=True),
            size=(SIZE, SIZE),
            mode="bilinear",
            align_corners=False,
        )[:, 0]
        latents, log_det = ours.model(features)
        loss = csflow_loss(latents, log_det, settings.log_det)
    scores, maps = ours.predict_batch(dict(zip(LAYERS, features, strict=True)))
    for a, b in zip(latents, latents_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    torch.testing.assert_close(log_det, log_det_ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(scores, score_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps, map_ref, rtol=1e-5, atol=1e-5 * map_ref.abs().max().item())
