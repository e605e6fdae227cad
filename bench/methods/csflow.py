"""CS-Flow (Rudolph et al., WACV 2022): one fully convolutional flow over three scales.

The same backbone layer is read at three input scales (the image, and the image resized
by nearest neighbour to 1/2 and 1/4; extractor layers ``L``, ``L@2``, ``L@4``). Each
coupling block first permutes the channels of every scale, then updates the first half
of the channels from the second and the second from the updated first, with affine
couplings whose scales and shifts come from cross-scale convolutions: per scale
conv -> LeakyReLU(0.1) -> conv, plus a strided convolution from the scale above and a
convolution of the bilinearly upsampled scale below, each scale's output multiplied by
a learned gamma that starts at 0 (so the flow starts as the identity). The affine scale
is exp(clamp * 0.636 * atan(s / clamp)); outputs are clamped to +-1e6.

Scoring is the same for both references: image score = mean over every latent value of
every scale of z^2 / 2. Anomaly maps differ (below).

``original`` is the authors' code (config.py, model.py, train.py, evaluate.py):
EfficientNet-B5 after block 35 of 39 (the end of stage 6: 304 channels, stride 32) at
768 px (images resized with bilinear interpolation, no crop), 4 coupling blocks, clamp 3,
1024 hidden channels, kernels 3, 3, 3, 5; Adam lr 2e-4, eps 1e-4, weight decay 1e-5,
betas (0.9, 0.999), gradient norm clipped to 1, batch 16, 4 meta-epochs of 60 epochs =
240 passes (no schedule, so ``epochs`` counts passes); permutations from
``np.random.seed(k)`` for block k, a different one per scale; loss
mean over images of (|z|^2 / 2 - log det) divided by the number of latent dimensions;
anomaly map = mean over channels of z^2 at the largest scale, bilinearly upsampled
(align_corners=False) to the input size, as its evaluate.py draws maps.

``anomalib`` is anomalib 2.7's ``Csflow``: input 256 (its default pre-processor),
batch 32 (its MVTecAD default), Adam betas (0.5, 0.9), one permutation per block shared
by the three scales (``np.random.default_rng(k)``), the loss's log-determinant summed
over the whole batch instead of averaged per image, and the anomaly map the product over
scales of the upsampled channel-mean of z^2. 240 epochs as its last shipped CS-Flow
configuration; its early stopping on the test set's pixel AUROC is not reproduced.

Differences from the references, accepted:
- Backbone: the authors use efficientnet_pytorch's EfficientNet-B5 and anomalib
  torchvision's; both carry the same TensorFlow weights, which bench loads through timm
  (``tf_efficientnet_b5``, layer ``blocks.5`` = their block 35 / ``features.6.8``).
  efficientnet_pytorch pads its stride-2 convolutions as planned for a 456 px input
  whatever the input size and torchvision pads symmetrically; timm's TF port pads "same"
  for the actual size. Features therefore differ slightly at the borders.
- Maps are upsampled to the model input (the harness scores pixels there and upsamples
  to the masks' size for AUPRO); the authors' evaluate.py upsamples the same map straight
  to each image's original size for display. The paper writes the map as the squared
  norm of z per position; the code takes the channel mean (a factor 1 / C), as bench does.
- anomalib resizes image tensors (bilinear, antialiased); bench resizes with PIL's
  bilinear filter, as the authors' torchvision transform on PIL images does.
- The authors report the best of 4 test-set evaluations (one per meta-epoch) and anomalib
  stops early on the test set; bench trains all epochs and reports the last.
- The references' reverse pass takes the second shift from the wrong subnet output
  (never used in training or scoring); ``CrossScaleCoupling.inverse`` is exact.
- Other CNN backbones read ``layer4`` (stride 32, the paper's feature stride) unless
  ``csflow.layer`` says otherwise; the input must make the three maps halve exactly.

Speed: training and scoring run the same forward pass in the default (NCHW) layout, which
measured about 10% faster than channels-last for the backward pass. A scoring copy with
channels-last weights and each gamma folded into its convolutions was 35-40% slower at
256 px on an Intel Xeon and within 3% at 768 px, so there is none (``docs/cpu_speed.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.datasets.pipeline import Preprocess
from bench.errors import BenchError
from bench.extractor import backbone_spec
from bench.features import FeatureSource
from bench.kernels import backward_in_parts
from bench.methods.base import REFERENCES, Method, MethodContext, register_method

SCALES = 3
ATAN_FACTOR = 0.636  # the references' approximation of 2 / pi in the soft clamp
OUTPUT_LIMIT = 1e6
PERMUTATIONS = ("per-scale", "shared")
ANOMALY_MAPS = ("largest-scale", "product")
LOG_DETS = ("per-image", "batch-sum")
# Timm EfficientNet-B0..B7 stage whose output the paper uses (B5: 304 channels, stride 32).
_EFFICIENTNET = re.compile(r"(tf_)?efficientnet_b\d")
_EFFICIENTNET_LAYER = "blocks.5"


@dataclass(frozen=True)
class CsFlowSettings:
    """CS-Flow hyper-parameters; the defaults are the authors' (reference ``original``)."""

    input_size: int = 768
    layer: str = "layer4"  # default_settings: blocks.5 for EfficientNet-B backbones
    coupling_blocks: int = 4
    clamp: float = 3.0
    hidden_channels: int = 1024
    kernel_size: int = 3
    last_kernel_size: int = 5  # the last coupling block's kernels
    epochs: int = 240
    batch_size: int = 16
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-4
    weight_decay: float = 1e-5
    max_grad_norm: float = 1.0
    permutations: str = "per-scale"
    log_det: str = "per-image"
    anomaly_map: str = "largest-scale"


def soft_log_scale(s: Tensor, clamp: float) -> Tensor:
    """log of the affine scale: clamp * 0.636 * atan(s / clamp), bounded by about +-clamp."""
    return torch.atan(s / clamp) * (clamp * ATAN_FACTOR)


class CrossScaleSubnet(nn.Module):
    """Scales and shifts for one half of the channels, from the other half at all scales.

    Per scale s: h_s = LeakyReLU(conv(x_s)); out_s = conv(h_s) + up(h_{s+1}) + down(h_{s-1}),
    where ``up`` convolves the bilinearly doubled h_{s+1} and ``down`` is a stride-2
    convolution of h_{s-1}; out_s is multiplied by gamma_s.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int, kernel: int) -> None:
        super().__init__()
        pad = kernel // 2

        def conv(i: int, o: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(i, o, kernel, stride=stride, padding=pad)

        # Created in the references' order, so a seeded model draws the same weights.
        self.gamma = nn.Parameter(torch.zeros(SCALES))
        self.entry = nn.ModuleList(conv(c_in, hidden) for _ in range(SCALES))
        self.exit = nn.ModuleList(conv(hidden, c_out) for _ in range(SCALES))
        self.up = nn.ModuleList(conv(hidden, c_out) for _ in range(SCALES - 1))
        self.down = nn.ModuleList(conv(hidden, c_out, 2) for _ in range(SCALES - 1))

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        h = [F.leaky_relu(conv(v), 0.1) for conv, v in zip(self.entry, x, strict=True)]
        out = [conv(v) for conv, v in zip(self.exit, h, strict=True)]
        for s in range(SCALES - 1):  # out0 + up0, (out1 + down0) + up1, out2 + down1
            out[s + 1] = out[s + 1] + self.down[s](h[s])
            out[s] = out[s] + self.up[s](_double(h[s + 1]))
        return [value * self.gamma[s] for s, value in enumerate(out)]


def _double(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class CrossScaleCoupling(nn.Module):
    """One block: a fixed channel permutation per scale, then two affine couplings.

    With x = (x1, x2) after the permutation: (s, t) = net1(x2); y1 = e(s) x1 + t;
    (s', t') = net2(y1); y2 = e(s') x2 + t'; e = exp(soft_log_scale).
    """

    def __init__(
        self, channels: int, hidden: int, kernel: int, clamp: float, permutations: list[Tensor]
    ) -> None:
        super().__init__()
        c1 = channels // 2
        self.split = (c1, channels - c1)
        self.clamp = clamp
        # The references create the second half's subnet first.
        self.net2 = CrossScaleSubnet(c1, 2 * self.split[1], hidden, kernel)
        self.net1 = CrossScaleSubnet(self.split[1], 2 * c1, hidden, kernel)
        self.register_buffer("perm", torch.stack(permutations), persistent=False)
        self.register_buffer("perm_inv", torch.argsort(self.perm, dim=1), persistent=False)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Latents per scale and the log-determinant per image (all scales)."""
        c1, c2 = self.split
        x = [v.index_select(1, p) for v, p in zip(x, self.perm, strict=True)]
        x1 = [v[:, :c1] for v in x]
        x2 = [v[:, c1:] for v in x]
        r1 = self.net1(x2)
        log1 = [soft_log_scale(r[:, :c1], self.clamp) for r in r1]
        y1 = [torch.exp(ls) * v + r[:, c1:] for ls, v, r in zip(log1, x1, r1, strict=True)]
        r2 = self.net2(y1)
        log2 = [soft_log_scale(r[:, :c2], self.clamp) for r in r2]
        y2 = [torch.exp(ls) * v + r[:, c2:] for ls, v, r in zip(log2, x2, r2, strict=True)]
        out = [
            torch.cat((a, b), 1).clamp(-OUTPUT_LIMIT, OUTPUT_LIMIT)
            for a, b in zip(y1, y2, strict=True)
        ]
        log_det = sum(
            torch.sum(b, dim=(1, 2, 3)) + torch.sum(a, dim=(1, 2, 3))
            for a, b in zip(log1, log2, strict=True)
        )
        return out, log_det

    def inverse(self, y: list[Tensor]) -> list[Tensor]:
        """The exact inverse of ``forward`` (the output clamp aside)."""
        c1, c2 = self.split
        y1 = [v[:, :c1] for v in y]
        r2 = self.net2(y1)
        x2 = [
            (v[:, c1:] - r[:, c2:]) * torch.exp(-soft_log_scale(r[:, :c2], self.clamp))
            for v, r in zip(y, r2, strict=True)
        ]
        r1 = self.net1(x2)
        x1 = [
            (v - r[:, c1:]) * torch.exp(-soft_log_scale(r[:, :c1], self.clamp))
            for v, r in zip(y1, r1, strict=True)
        ]
        return [
            torch.cat((a, b), 1).index_select(1, p)
            for a, b, p in zip(x1, x2, self.perm_inv, strict=True)
        ]


def block_permutations(block: int, channels: int, how: str) -> list[Tensor]:
    """The fixed channel orders before block ``block``, one per scale.

    ``per-scale``: ``np.random.seed(block)`` then one permutation per scale (the authors');
    ``shared``: ``np.random.default_rng(block).permutation`` for every scale (anomalib).
    Neither depends on the run's seed, as in both references.
    """
    if how == "per-scale":
        legacy = np.random.RandomState(block)
        orders = [legacy.permutation(channels) for _ in range(SCALES)]
    elif how == "shared":
        orders = [np.random.default_rng(block).permutation(channels) for _ in range(SCALES)]
    else:
        raise BenchError(f"csflow.permutations={how}: expected one of {', '.join(PERMUTATIONS)}")
    return [torch.from_numpy(order).long() for order in orders]


class CsFlowModel(nn.Module):
    """The cross-scale flow: ``coupling_blocks`` blocks, no backbone, no training loop."""

    def __init__(self, channels: int, settings: CsFlowSettings) -> None:
        super().__init__()
        blocks = settings.coupling_blocks
        self.blocks = nn.ModuleList(
            CrossScaleCoupling(
                channels,
                settings.hidden_channels,
                settings.last_kernel_size if k == blocks - 1 else settings.kernel_size,
                settings.clamp,
                block_permutations(k, channels, settings.permutations),
            )
            for k in range(blocks)
        )

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Latents per scale and the log-determinant per image."""
        log_det: Tensor | int = 0
        for block in self.blocks:
            features, j = block(features)
            log_det = log_det + j
        return features, log_det

    def inverse(self, latents: list[Tensor]) -> list[Tensor]:
        for block in reversed(self.blocks):
            latents = block.inverse(latents)
        return latents


def csflow_loss(
    latents: list[Tensor], log_det: Tensor, how: str = "per-image", batch_size: int | None = None
) -> Tensor:
    """mean over images of (|z|^2 / 2 - log det), divided by the latent dimensions.

    ``batch-sum`` (anomalib) subtracts the log-determinant summed over the whole batch.
    With ``batch_size``, these images' share of the loss of a batch of that many.
    """
    z = torch.cat([v.reshape(v.shape[0], -1) for v in latents], dim=1)
    energy = 0.5 * torch.sum(z**2, dim=1)
    if batch_size is None:
        jac = log_det.sum() if how == "batch-sum" else log_det
        return torch.mean(energy - jac) / z.shape[1]
    if how == "batch-sum":
        return (energy.sum() / batch_size - log_det.sum()) / z.shape[1]
    return torch.sum(energy - log_det) / batch_size / z.shape[1]


def image_scores(latents: list[Tensor]) -> Tensor:
    """Mean of z^2 / 2 over every latent value of every scale, per image."""
    z = torch.cat([v.reshape(v.shape[0], -1) for v in latents], dim=1)
    return torch.mean(z**2 / 2, dim=1)


def anomaly_maps(latents: list[Tensor], output_size: tuple[int, int], how: str) -> Tensor:
    """(B, H, W): the channel mean of z^2 at the largest scale, or its product over scales,
    bilinearly upsampled (align_corners=False)."""

    def up(z: Tensor) -> Tensor:
        mean = (z**2).mean(dim=1, keepdim=True)
        return F.interpolate(mean, size=output_size, mode="bilinear", align_corners=False)

    if how == "largest-scale":
        return up(latents[0])[:, 0]
    total = torch.ones(latents[0].shape[0], 1, *output_size, device=latents[0].device)
    for z in latents:
        total *= up(z)
    return total[:, 0]


@register_method("csflow")
class CsFlow(Method):
    """CS-Flow with the authors' (``original``) or anomalib's (``anomalib``) behaviour."""

    Settings = CsFlowSettings

    def __init__(self, settings: CsFlowSettings, context: MethodContext) -> None:
        super().__init__(settings, context)
        _validate(settings)
        self.layers = self.needs(context.backbone, settings)
        missing = [layer for layer in self.layers if layer not in context.channels]
        if missing:
            raise BenchError(f"csflow needs extractor layers {missing}, which the context lacks")
        shapes = [context.shapes[layer] for layer in self.layers]
        for big, small in zip(shapes, shapes[1:], strict=False):
            if big != (2 * small[0], 2 * small[1]):
                raise BenchError(
                    f"csflow: the feature maps of {self.layers} are {shapes}; each scale must "
                    "be exactly half the one above; use an input size that is a multiple of "
                    f"4 x the backbone stride (--input-size, now {settings.input_size})"
                )
        channels = context.channels[self.layers[0]]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            self._model = CsFlowModel(channels, settings).to(self.device)
        self.history: list[float] = []

    # ---- what the runner asks before building anything -------------------------------
    @classmethod
    def default_settings(cls, backbone: str, reference: str) -> CsFlowSettings:
        if reference not in REFERENCES:
            raise BenchError(f"unknown reference '{reference}'; known: {', '.join(REFERENCES)}")
        layer = _EFFICIENTNET_LAYER if _EFFICIENTNET.fullmatch(backbone) else "layer4"
        if reference == "original":
            return CsFlowSettings(layer=layer)
        return CsFlowSettings(
            input_size=256,
            layer=layer,
            batch_size=32,
            betas=(0.5, 0.9),
            permutations="shared",
            log_det="batch-sum",
            anomaly_map="product",
        )

    @classmethod
    def needs(cls, backbone: str, settings: CsFlowSettings) -> list[str]:
        if backbone_spec(backbone).kind != "cnn":
            raise BenchError(f"csflow needs a CNN backbone; '{backbone}' is a transformer")
        return [settings.layer] + [f"{settings.layer}@{2**s}" for s in range(1, SCALES)]

    @classmethod
    def preprocess(cls, backbone: str, reference: str, settings: CsFlowSettings) -> Preprocess:
        return Preprocess((settings.input_size, settings.input_size), None, "bilinear")

    @classmethod
    def weights_provenance(cls, backbone: str, reference: str) -> str:
        return "timm"

    # ---- estimator contract ---------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    def _features(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """The batch's maps as NCHW float32 (the cache holds them channels-last)."""
        return [
            batch[layer].to(self.device, torch.float32, memory_format=torch.contiguous_format)
            for layer in self.layers
        ]

    def fit(self, train: FeatureSource) -> None:
        """Adam on the loss, gradient norm clipped, one host read per epoch."""
        s = self.settings
        model = self._model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(
            params,
            lr=s.lr,
            betas=s.betas,
            eps=s.eps,
            weight_decay=s.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        generator = torch.Generator().manual_seed(self.context.seed)
        bar = tqdm(range(s.epochs), desc="csflow", unit="epoch", disable=not self.context.progress)
        for epoch in bar:
            total = torch.zeros((), device=self.device)
            count = 0
            for batch in train.batches(s.batch_size, shuffle=True, generator=generator):
                features = self._features(batch)
                optimizer.zero_grad(set_to_none=True)
                loss = backward_in_parts(
                    lambda part, size: csflow_loss(*model(part), s.log_det, batch_size=size),
                    params,
                    features,
                )
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                n = features[0].shape[0]
                total += loss * n
                count += n
            self.history.append(float(total) / max(count, 1))
            bar.set_postfix(loss=f"{self.history[-1]:.4g}")
            self.epoch_done(epoch + 1)
        model.eval()

    @torch.no_grad()
    def predict_batch(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        latents, _ = self._model(self._features(features))
        maps = anomaly_maps(latents, self.context.output_size, self.settings.anomaly_map)
        return image_scores(latents), maps


def _validate(settings: CsFlowSettings) -> None:
    checks = {
        "permutations": (settings.permutations, PERMUTATIONS),
        "log_det": (settings.log_det, LOG_DETS),
        "anomaly_map": (settings.anomaly_map, ANOMALY_MAPS),
    }
    for name, (value, allowed) in checks.items():
        if value not in allowed:
            raise BenchError(f"csflow.{name}={value}: expected one of {', '.join(allowed)}")
    for name in ("coupling_blocks", "hidden_channels", "batch_size", "epochs"):
        if getattr(settings, name) < 1:
            raise BenchError(f"csflow.{name} must be positive, got {getattr(settings, name)}")
    for name in ("kernel_size", "last_kernel_size"):
        if getattr(settings, name) % 2 == 0:
            raise BenchError(f"csflow.{name} must be odd, got {getattr(settings, name)}")


def count_trainable(channels: int, settings: CsFlowSettings) -> int:
    """Trainable parameters of the flow for ``channels`` input channels (meta device)."""
    with torch.device("meta"):
        model = CsFlowModel(channels, settings)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def port_anomalib_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """anomalib's ``CsFlowModel`` state dict -> ``CsFlowModel``'s (the backbone is dropped).

    anomalib keeps FrEIA's module list, where a coupling node follows each permutation
    node; its ``cross_convolution1`` is our ``net2`` and ``cross_convolution2`` our ``net1``.
    """
    names = {
        "conv_scale{s}_0": "entry.{s}",
        "conv_scale{s}_1": "exit.{s}",
    }
    convs = {old.format(s=s): new.format(s=s) for s in range(SCALES) for old, new in names.items()}
    convs.update({"up_conv10": "up.0", "up_conv21": "up.1"})
    convs.update({"down_conv01": "down.0", "down_conv12": "down.1"})
    nets = {"cross_convolution1": "net2", "cross_convolution2": "net1"}
    pattern = re.compile(r"graph\.graph\.module_list\.(\d+)\.(cross_convolution[12])\.(\w+)\.(.+)")
    gamma = re.compile(r"graph\.graph\.module_list\.(\d+)\.(cross_convolution[12])\.gamma(\d)")
    nodes = sorted({int(m.group(1)) for k in state if (m := pattern.match(k) or gamma.match(k))})
    block_of = {node: index for index, node in enumerate(nodes)}
    ported: dict[str, Tensor] = {}
    gammas: dict[tuple[int, str], dict[int, Tensor]] = {}
    for key, value in state.items():
        if m := gamma.match(key):
            gammas.setdefault((block_of[int(m.group(1))], nets[m.group(2)]), {})[
                int(m.group(3))
            ] = value
        elif m := pattern.match(key):
            block, net = block_of[int(m.group(1))], nets[m.group(2)]
            ported[f"blocks.{block}.{net}.{convs[m.group(3)]}.{m.group(4)}"] = value
    for (block, net), values in gammas.items():
        ported[f"blocks.{block}.{net}.gamma"] = torch.cat([values[s] for s in range(SCALES)])
    return ported
