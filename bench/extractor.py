"""The shared, frozen feature extractor: timm CNN stages or ViT/CaiT tokens as 2D maps.

Every method asks for named layers ("layer1".."layer4" for CNNs, "blocks.K" for
transformers) and gets a dict of (B, C, H, W) tensors. A CNN layer may also be a module
path of the timm model (EfficientNet's "blocks.5"), and any CNN layer may carry a scale
suffix: "layer4@2" is layer4 computed on the input downscaled to H // 2 x W // 2. The
backbone is built once per (backbone, weights, input size, padding), frozen, and kept in
eval mode so BatchNorm uses its running statistics, as every reference does.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import timm
import torch
import torch.nn.functional as F  # noqa: N812
from huggingface_hub import try_to_load_from_cache
from timm.models import create_feature_extractor
from torch import Tensor, nn

from bench.errors import BenchError
from bench.kernels import weights_key
from bench.registry import BACKBONES

log = logging.getLogger(__name__)

# Where a reference took its ImageNet weights from (docs/methods.md). Methods name one
# of these per reference; the backbone spec turns it into an explicit timm tag.
PROVENANCES = ("torchvision", "timm-0.5.4", "timm")
WEIGHT_POLICIES = ("auto", "imagenet", "random")
# How the backbone's padded convolutions fill their border: timm's zeros, or the reflection
# of CFLOW-AD's own ResNet copy (docs/methods.md).
PADDINGS = ("zeros", "reflect")
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class BackboneSpec:
    """A timm model plus how its output becomes 2D feature maps."""

    name: str
    kind: str  # "cnn" or "vit"
    imagenet_tags: dict[str, str] = field(default_factory=dict)
    native_input: int | None = None  # transformers only accept their own input size
    prefix_tokens: int = 0  # tokens before the patch grid (cls, dist) in the ViT path
    # A composite: these registered transformers side by side, each fed the image resized
    # (bicubic, corners aligned) to its own input; layers are named "<part>.blocks.K".
    parts: tuple[str, ...] = ()

    def tag_for(self, provenance: str) -> str:
        if provenance in self.imagenet_tags:
            return self.imagenet_tags[provenance]
        cfg = timm.models.get_pretrained_cfg(self.name)
        if cfg is None or not cfg.tag:
            raise BenchError(f"timm has no pretrained weights for backbone '{self.name}'")
        return f"{self.name}.{cfg.tag}"


def _register(spec: BackboneSpec) -> None:
    BACKBONES.add(spec.name, spec, kind=spec.kind)


_register(
    BackboneSpec(
        "resnet18",
        "cnn",
        {
            "torchvision": "resnet18.tv_in1k",
            "timm-0.5.4": "resnet18.tv_in1k",
            "timm": "resnet18.a1_in1k",
        },
    )
)
_register(
    BackboneSpec(
        "wide_resnet50_2",
        "cnn",
        {
            "torchvision": "wide_resnet50_2.tv_in1k",
            "timm-0.5.4": "wide_resnet50_2.racm_in1k",
            "timm": "wide_resnet50_2.racm_in1k",
        },
    )
)
# CS-Flow's EfficientNet-B5: both references load the TensorFlow release of June 2019 as
# efficientnet_pytorch ported it (torchvision re-packages that port); timm's port of the
# same release is tf_efficientnet_b5.in1k.
_register(
    BackboneSpec(
        "tf_efficientnet_b5",
        "cnn",
        {p: "tf_efficientnet_b5.in1k" for p in PROVENANCES},
    )
)
_DEIT = "deit_base_distilled_patch16_384"
_CAIT = "cait_m48_448"
_register(
    BackboneSpec(
        _DEIT,
        "vit",
        {p: f"{_DEIT}.fb_in1k" for p in PROVENANCES},
        native_input=384,
        prefix_tokens=2,
    )
)
_register(
    BackboneSpec(
        _CAIT,
        "vit",
        {p: f"{_CAIT}.fb_dist_in1k" for p in PROVENANCES},
        native_input=448,
        prefix_tokens=0,
    )
)


_CAIT_S = "cait_s24_224"
_register(
    BackboneSpec(
        _CAIT_S,
        "vit",
        {p: f"{_CAIT_S}.fb_dist_in1k" for p in PROVENANCES},
        native_input=224,
        prefix_tokens=0,
    )
)
# U-Flow's MS-CaiT: CaiT-M48 on the 448 image and CaiT-S24 on it resized to 224.
_register(
    BackboneSpec(
        "mcait",
        "vit",
        {p: f"{_CAIT}.fb_dist_in1k+{_CAIT_S}.fb_dist_in1k" for p in PROVENANCES},
        native_input=448,
        parts=(_CAIT, _CAIT_S),
    )
)


def registered_backbones() -> list[BackboneSpec]:
    """Built-in and plugin backbones, by name."""
    return [BACKBONES.get(name) for name in BACKBONES.names()]


def backbone_spec(name: str) -> BackboneSpec:
    """Registered backbones first; any other timm CNN by name is accepted as a plain CNN."""
    if name in BACKBONES:
        return BACKBONES.get(name)
    if name in timm.list_models():
        return BackboneSpec(name, "cnn")
    known = ", ".join(BACKBONES.names())
    raise BenchError(
        f"unknown backbone '{name}'; registered: {known}; any timm CNN name also works "
        "(see timm.list_models())"
    )


@dataclass(frozen=True)
class WeightsInfo:
    """What the extractor actually loaded: recorded on every result row."""

    policy: str  # auto | imagenet | random | path
    source: str  # timm tag, "random(seed=0)", or the checkpoint path
    ident: str  # the tag, or the file's sha256 prefix
    pretrained: bool

    def describe(self) -> str:
        return self.source if self.policy != "path" else f"{self.source} (sha256 {self.ident})"


def _layer_index(layer: str) -> int:
    match = re.fullmatch(r"layer(\d+)", layer)
    if not match:
        raise BenchError(f"CNN layers are named layer0..layer4, got '{layer}'")
    return int(match.group(1))


def parse_layer(layer: str) -> tuple[str, int]:
    """``NAME@D`` -> (NAME, D); a plain name has D = 1.

    ``NAME@D`` is NAME computed on the input resized to (H // D, W // D) by nearest-neighbour
    interpolation (``F.interpolate``'s default), as CS-Flow's references build their
    smaller scales.
    """
    match = re.fullmatch(r"(.+?)(?:@(\d+))?", layer)
    name, divisor = match.group(1), int(match.group(2) or 1)
    if divisor < 1:
        raise BenchError(f"layer '{layer}': the scale divisor after @ must be at least 1")
    return name, divisor


def _block_index(layer: str) -> int:
    match = re.fullmatch(r"blocks\.(\d+)", layer)
    if not match:
        raise BenchError(f"transformer layers are named blocks.K, got '{layer}'")
    return int(match.group(1))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick check so offline machines fall back at once instead of retrying for a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(path.resolve(), stat.st_size, stat.st_mtime_ns)


@cache
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    """Hashed once per file version: a grid asks for the same checkpoint in every cell."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _cached_weights_file(tag: str) -> str | None:
    """The local Hugging Face copy of timm's weights ``tag``, if there is one."""
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None:
        raise BenchError(f"timm knows no weights named '{tag}'")
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(cached, str):
                return cached
    return None


def expected_weights_ident(backbone: str, layers: list[str], weights: str, provenance: str) -> str:
    """The ``WeightsInfo.ident`` that building this extractor would record now, found without
    building it. A run compares it with its finished rows, so a cell made before the ImageNet
    weights were cached (``auto`` fell back to random) or with a checkpoint file since
    replaced is not passed off as done."""
    spec = backbone_spec(backbone)
    if spec.parts:
        named = dict.fromkeys(layer.partition(".")[0] for layer in layers)
        parts = [part for part in spec.parts if part in named]
        return "+".join(expected_weights_ident(p, [], weights, provenance) for p in parts)
    if weights == "random":
        return "random"
    if weights in ("auto", "imagenet"):
        tag = spec.tag_for(provenance)
        if weights == "imagenet" or _cached_weights_file(tag) is not None or _hub_reachable():
            return tag
        return "random"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BenchError(
            f"--weights '{weights}': not one of {', '.join(WEIGHT_POLICIES)} and no such file"
        )
    return _sha256(path)


def load_checkpoint_tensors(path: Path) -> dict[str, Tensor]:
    """Read a state dict without unpickling arbitrary objects (safetensors or weights_only)."""
    if not path.is_file():
        raise BenchError(f"--weights {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BenchError(
            f"--weights {path}: not a plain tensor checkpoint ({type(exc).__name__}); save it with "
            "torch.save(model.state_dict(), path) or as .safetensors"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise BenchError(f"--weights {path}: expected a state dict of tensors")
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in obj.items()}


class FeatureExtractor(nn.Module):
    """Frozen backbone returning the requested layers as (B, C, H, W) maps."""

    def __init__(
        self,
        backbone: str,
        layers: list[str],
        weights: str = "auto",
        provenance: str = "timm",
        input_size: tuple[int, int] = (256, 256),
        padding: str = "zeros",
    ) -> None:
        super().__init__()
        self.spec = backbone_spec(backbone)
        self.layers = list(layers)
        self.input_size = tuple(input_size)
        if padding not in PADDINGS:
            raise BenchError(f"encoder padding '{padding}': expected one of {', '.join(PADDINGS)}")
        self.padding = padding
        self._scaled = [parse_layer(layer) for layer in self.layers]
        for layer, (_, divisor) in zip(self.layers, self._scaled, strict=True):
            if divisor > 1 and (self.spec.kind != "cnn" or min(self.input_size) < divisor):
                raise BenchError(
                    f"layer '{layer}': scale suffixes need a CNN backbone and an input of at "
                    f"least {divisor} pixels"
                )
        self._names = list(dict.fromkeys(name for name, _ in self._scaled))
        if self.spec.kind == "vit" and self.input_size != (self.spec.native_input,) * 2:
            n = self.spec.native_input
            raise BenchError(
                f"backbone {backbone} takes {n}x{n} input, got --input-size "
                f"{self.input_size[0]}x{self.input_size[1]}"
            )
        # Building consumes the global RNG (random init, and timm initialises before loading
        # weights); fork it so a cell draws the same numbers whether it builds its extractor
        # or reuses a cached one.
        with torch.random.fork_rng(devices=[]):
            self.model, self.weights = self._build(weights, provenance)
        _set_padding(self.model, padding)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._inference: tuple[tuple, nn.Module] | None = None
        with torch.no_grad():
            probe = self.forward(torch.zeros(1, 3, *self.input_size))
        self.channels = {k: v.shape[1] for k, v in probe.items()}
        self.shapes = {k: tuple(v.shape[2:]) for k, v in probe.items()}
        self.strides = {k: self.input_size[0] // v.shape[2] for k, v in probe.items()}

    @property
    def identity(self) -> tuple:
        """Everything that changes the features: two extractors with equal identities give
        the same maps, so a cache keyed by it never mixes, say, zero and reflect padding."""
        return (
            self.spec.name,
            tuple(self.layers),
            self.weights.ident,
            self.input_size,
            self.padding,
        )

    def _create(
        self, pretrained: bool, tag: str | None = None, overlay: dict | None = None
    ) -> nn.Module:
        name = tag or self.spec.name
        kwargs: dict = {"pretrained": pretrained}
        if overlay:
            kwargs["pretrained_cfg_overlay"] = overlay
        if self.spec.kind == "cnn":
            if all(re.fullmatch(r"layer\d+", layer) for layer in self._names):
                indices = [_layer_index(layer) for layer in self._names]
                return timm.create_model(name, features_only=True, out_indices=indices, **kwargs)
            return _module_outputs(timm.create_model(name, **kwargs), self._names)
        for layer in self.layers:
            _block_index(layer)
        return timm.create_model(name, **kwargs)

    def _create_pretrained(self, tag: str) -> nn.Module:
        """timm weights from the local Hugging Face cache, else the hub when it is reachable."""
        cached = _cached_weights_file(tag)
        if cached is not None:
            return self._create(True, tag, overlay={"file": cached})
        if not _hub_reachable():
            raise ConnectionError(f"no local copy of {tag} and the hub is unreachable")
        return self._create(True, tag)

    def _build(self, weights: str, provenance: str) -> tuple[nn.Module, WeightsInfo]:
        if self.spec.parts:
            return self._build_parts(weights, provenance)
        if weights == "random":
            torch.manual_seed(RANDOM_INIT_SEED)
            model = self._create(False)
            return model, WeightsInfo("random", f"random(seed={RANDOM_INIT_SEED})", "random", False)
        if weights in ("auto", "imagenet"):
            tag = self.spec.tag_for(provenance)
            try:
                model = self._create_pretrained(tag)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if weights == "imagenet":
                    raise BenchError(
                        f"--weights imagenet: could not load timm weights '{tag}' ({reason}); "
                        "put them in the Hugging Face cache (HF_HOME), or pass --weights PATH "
                        "to a local checkpoint"
                    ) from exc
                warnings.warn(
                    f"--weights auto: ImageNet weights '{tag}' unavailable ({reason}); "
                    "USING RANDOM INITIALISATION. Results are not comparable with the papers.",
                    stacklevel=2,
                )
                torch.manual_seed(RANDOM_INIT_SEED)
                model = self._create(False)
                return model, WeightsInfo(
                    "auto", f"random(seed={RANDOM_INIT_SEED})", "random", False
                )
            return model, WeightsInfo(weights, tag, tag, True)
        path = Path(weights).expanduser()
        if not path.exists():
            raise BenchError(
                f"--weights '{weights}': not one of {', '.join(WEIGHT_POLICIES)} and no such file"
            )
        model = self._create(False)
        state = load_checkpoint_tensors(path)
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(usable))
        if missing:
            raise BenchError(
                f"--weights {path}: checkpoint lacks {len(missing)} backbone tensors "
                f"(first: {missing[0]}); is it a {self.spec.name} state dict?"
            )
        bad = [k for k, v in usable.items() if v.shape != own[k].shape]
        if bad:
            raise BenchError(
                f"--weights {path}: tensor {bad[0]} has shape {tuple(usable[bad[0]].shape)}, "
                f"expected {tuple(own[bad[0]].shape)}"
            )
        model.load_state_dict(usable)
        return model, WeightsInfo("path", str(path), _sha256(path), True)

    def _build_parts(self, weights: str, provenance: str) -> tuple[nn.Module, WeightsInfo]:
        """A composite: one extractor per part that a layer names, their models in a
        ModuleList (state-dict keys ``0.*``, ``1.*`` in the order of ``spec.parts``)."""
        if weights not in WEIGHT_POLICIES:
            raise BenchError(
                f"--weights {weights}: the composite backbone {self.spec.name} takes "
                f"{', '.join(WEIGHT_POLICIES)}, not a checkpoint file"
            )
        wanted: dict[str, list[str]] = {}
        for layer in self.layers:
            part, _, block = layer.partition(".")
            if part not in self.spec.parts:
                raise BenchError(
                    f"{self.spec.name} layers are named <part>.blocks.K with a part in "
                    f"{', '.join(self.spec.parts)}; got '{layer}'"
                )
            wanted.setdefault(part, []).append(block)
        self._parts = tuple(
            FeatureExtractor(
                part, wanted[part], weights, provenance, (backbone_spec(part).native_input,) * 2
            )
            for part in self.spec.parts
            if part in wanted
        )
        infos = [part.weights for part in self._parts]
        return nn.ModuleList(part.model for part in self._parts), WeightsInfo(
            weights,
            " + ".join(info.source for info in infos),
            "+".join(info.ident for info in infos),
            all(info.pretrained for info in infos),
        )

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stays in eval mode whatever the caller asks: the backbone is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if self.spec.parts:
            return self._parts_forward(images)
        if self.spec.kind != "cnn":
            self.model.eval()
            return self._vit_forward(images)
        model = self._cnn_for_inference()  # an eval-mode copy whatever self.model's mode
        height, width = images.shape[-2:]
        out: dict[str, Tensor] = {}
        for divisor in sorted({divisor for _, divisor in self._scaled}):
            x = images
            if divisor > 1:
                x = F.interpolate(images, size=(height // divisor, width // divisor))
            maps = model(x.contiguous(memory_format=torch.channels_last))
            by_name = maps if isinstance(maps, dict) else dict(zip(self._names, maps, strict=True))
            for layer, (name, scale) in zip(self.layers, self._scaled, strict=True):
                if scale == divisor:
                    out[layer] = by_name[name]
        return {layer: out[layer] for layer in self.layers}

    def _cnn_for_inference(self) -> nn.Module:
        """A copy of ``self.model`` with BatchNorm folded into the convolutions, in NHWC.

        Both make oneDNN's convolutions faster (wide_resnet50_2 at 256 on 2 CPU cores:
        0.107 s per image as loaded, 0.081 in NHWC, 0.075 folded) and change values by
        about 1e-6. ``self.model`` keeps the loadable state dict; the copy is rebuilt when a
        weight changes (load_state_dict, a move to another device).
        """
        key = weights_key(self.model)
        if self._inference is None or self._inference[0] != key:
            self._inference = (key, _fold_batchnorm(self.model))
        return self._inference[1]

    def _parts_forward(self, images: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for part in self._parts:
            x = images
            if part.input_size != self.input_size:
                x = F.interpolate(images, size=part.input_size, mode="bicubic", align_corners=True)
            out.update({f"{part.spec.name}.{k}": v for k, v in part(x).items()})
        return {layer: out[layer] for layer in self.layers}

    def _vit_forward(self, images: Tensor) -> dict[str, Tensor]:
        """Patch tokens after block K and the model's own final norm, as a 2D grid."""
        model = self.model
        x = model.patch_embed(images)
        if self.spec.prefix_tokens == 2:
            cls = model.cls_token.expand(x.shape[0], -1, -1)
            dist = model.dist_token.expand(x.shape[0], -1, -1)
            x = torch.cat((cls, dist, x), dim=1)
        x = model.pos_drop(x + model.pos_embed)
        wanted = {_block_index(layer): layer for layer in self.layers}
        grid_h, grid_w = (s // 16 for s in self.input_size)
        out: dict[str, Tensor] = {}
        for index, block in enumerate(model.blocks):
            x = block(x)
            if index in wanted:
                tokens = model.norm(x)[:, self.spec.prefix_tokens :]
                out[wanted[index]] = tokens.transpose(1, 2).reshape(x.shape[0], -1, grid_h, grid_w)
            if len(out) == len(wanted):
                break
        return out


def _set_padding(model: nn.Module, padding: str) -> None:
    """Every convolution that pads (the 7x7 stem and each 3x3) pads with ``padding``; 1x1
    convolutions and the max-pool do not pad with values, so they are unchanged. BatchNorm
    folding copies each convolution whole, ``padding_mode`` included."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.padding not in ("valid", (0, 0)):
            module.padding_mode = padding


def _module_outputs(model: nn.Module, names: list[str]) -> nn.Module:
    """``model`` traced to return the named outputs as a dict: ``layerN`` is timm's feature
    level N, any other name a module path (EfficientNet-B5's 304-channel stage is
    ``blocks.5``, which no feature level returns)."""
    modules = dict(model.named_modules())
    nodes = {}
    for name in names:
        if re.fullmatch(r"layer\d+", name):
            nodes[model.feature_info[_layer_index(name)]["module"]] = name
        elif name in modules:
            nodes[name] = name
        else:
            raise BenchError(
                f"backbone {type(model).__name__} has no layer '{name}'; CNN layers are "
                "layer0..layer4 or a module path such as blocks.5"
            )
    return create_feature_extractor(model, return_nodes=nodes)


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each Conv2d -> BatchNorm2d pair fused, in channels_last.

    torch.fx must trace the model; one that does not trace is copied unfused, and so is a
    traced module-path extractor, which retracing would pin to training-mode BatchNorm.
    """
    from torch.fx.experimental.optimization import fuse

    if isinstance(model, torch.fx.GraphModule):
        folded = _fold_graph_batchnorm(copy.deepcopy(model).eval())
        return folded.to(memory_format=torch.channels_last)
    try:
        folded = fuse(model)
    except Exception as exc:  # noqa: BLE001 - tracing fails in many ways; folding is optional
        log.debug("BatchNorm folding skipped for %s: %s", type(model).__name__, exc)
        folded = copy.deepcopy(model)
    return folded.eval().to(memory_format=torch.channels_last)


def _fold_graph_batchnorm(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fold each eval-mode BatchNorm that alone reads a plain convolution's output into it,
    in place, keeping the graph: timm's traced extractors (EfficientNet's ``BatchNormAct2d``
    keeps its dropout and activation after the fold). Convolutions that transform their
    weights in ``forward`` (weight standardisation) are left alone.
    """
    from timm.layers import BatchNormAct2d, Conv2dSame
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph_module.graph.nodes:
        norm = modules.get(node.target) if node.op == "call_module" else None
        if type(norm) not in (nn.BatchNorm2d, BatchNormAct2d) or norm.running_mean is None:
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv = modules[source.target]
        if type(conv) not in (nn.Conv2d, Conv2dSame) or len(source.users) != 1:
            continue
        if calls[source.target] != 1 or calls[node.target] != 1:  # a module used twice
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
        )
        rest = nn.Sequential(norm.drop, norm.act) if isinstance(norm, BatchNormAct2d) else None
        graph_module.set_submodule(node.target, rest or nn.Identity())
    return graph_module
