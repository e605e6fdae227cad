"""Feature sources a method trains and predicts on.

``CachedFeatures`` runs the backbone once per image and serves epochs from memory (or from
a memory-mapped file when the features would not fit); ``StreamedFeatures`` runs the
backbone on every pass, for references that augment training images.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.extractor import FeatureExtractor

# Above this many bytes the train features go to a memory-mapped file instead of RAM.
DEFAULT_MEMORY_BUDGET = int(os.environ.get("FLOWAD_FEATURE_RAM_BYTES", 6 * 1024**3))
# Images per backbone call on the CPU: smaller activations stay in cache (wide_resnet50_2 at
# 256 on 2 cores: 0.075 s per image in batches of 24, 0.073 in 8, 0.083 in 2).
CPU_MICRO_BATCH = 8


def extract_in_parts(extractor: FeatureExtractor, images: Tensor) -> Iterator[dict[str, Tensor]]:
    """The backbone's features of ``images``, on the CPU ``CPU_MICRO_BATCH`` images at a time:
    each image's features do not depend on the others, and small parts keep the activations
    in cache (resnet18 at 256 on 2 cores: 26.5 ms an image in 32s, 23.5 in 8s)."""
    size = CPU_MICRO_BATCH if images.device.type == "cpu" else images.shape[0]
    for part in images.split(max(size, 1)):
        yield extractor(part)


class FeatureSource:
    """Batches of {layer: (B, C, H, W)} features, in a fixed order unless shuffled."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[dict[str, Tensor]]:
        raise NotImplementedError

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else math.ceil(n / batch_size)


def _order(n: int, shuffle: bool, generator: torch.Generator | None) -> Tensor:
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


class CachedFeatures(FeatureSource):
    """Features computed once and kept (RAM or memory-mapped disk) for every epoch."""

    def __init__(self, tensors: dict[str, Tensor], device: torch.device) -> None:
        self.tensors = tensors
        self.device = device

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def batches(self, batch_size, shuffle=False, generator=None, drop_last=False):
        order = _order(len(self), shuffle, generator)
        stop = self.num_batches(batch_size, drop_last) * batch_size
        for start in range(0, min(stop, len(order)), batch_size):
            index = order[start : start + batch_size]
            if not shuffle:
                sl = slice(int(index[0]), int(index[-1]) + 1)
                yield {k: v[sl].to(self.device) for k, v in self.tensors.items()}
            else:
                yield {k: v[index].to(self.device) for k, v in self.tensors.items()}

    @classmethod
    def extract(
        cls,
        extractor: FeatureExtractor,
        loader: torch.utils.data.DataLoader,
        device: torch.device,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        spill_dir: Path | None = None,
        desc: str = "features",
        progress: bool = True,
    ) -> CachedFeatures:
        n = len(loader.dataset)
        per_image = sum(c * math.prod(extractor.shapes[k]) for k, c in extractor.channels.items())
        on_disk = per_image * 4 * n > memory_budget
        tensors: dict[str, Tensor] = {}
        for layer, c in extractor.channels.items():
            h, w = extractor.shapes[layer]
            # Channels-last storage, as the extractor returns them: copying in is a plain
            # copy, and fiber-wise methods read (B*H*W, C) rows as a view.
            if on_disk:
                folder = Path(tempfile.mkdtemp(prefix="features-", dir=spill_dir))
                array = np.lib.format.open_memmap(
                    folder / f"{layer}.npy", mode="w+", dtype=np.float32, shape=(n, h, w, c)
                )
                tensors[layer] = torch.from_numpy(array).permute(0, 3, 1, 2)
            else:
                tensors[layer] = torch.empty(
                    (n, c, h, w), dtype=torch.float32, memory_format=torch.channels_last
                )
        start = 0
        for images in tqdm(loader, desc=desc, leave=False, unit="batch", disable=not progress):
            for feats in extract_in_parts(extractor, images.to(device)):
                stop = start + next(iter(feats.values())).shape[0]
                for layer, value in feats.items():
                    tensors[layer][start:stop] = value.float().cpu()
                start = stop
        return cls(tensors, device)


class StreamedFeatures(FeatureSource):
    """Runs the backbone on every batch; ``make_loader`` builds a (possibly augmenting) loader."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        make_loader: Callable[
            [int, bool, torch.Generator | None, bool], torch.utils.data.DataLoader
        ],
        size: int,
        device: torch.device,
    ) -> None:
        self.extractor = extractor
        self.make_loader = make_loader
        self.size = size
        self.device = device

    def __len__(self) -> int:
        return self.size

    def batches(self, batch_size, shuffle=False, generator=None, drop_last=False):
        for images in self.make_loader(batch_size, shuffle, generator, drop_last):
            parts = list(extract_in_parts(self.extractor, images.to(self.device)))
            if len(parts) == 1:
                yield parts[0]
            else:
                yield {layer: torch.cat([part[layer] for part in parts]) for layer in parts[0]}
