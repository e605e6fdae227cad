"""A few test images per cell with their masks and anomaly maps, kept for the gallery.

The cell picks them deterministically (by sample name, so every method of a category
shows the same images), shrinks them, and hands them back inside its result row under
``EXAMPLES_KEY``; the driver moves them into ``<run>/examples/<cell key>.npz`` before the
row is stored, so a remote worker never writes into the run folder.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from bench.datasets.base import Sample

if TYPE_CHECKING:  # the gallery reads saved examples without torch
    from bench.datasets.pipeline import Preprocess

EXAMPLES_KEY = "examples"
FOLDER = "examples"
N_ANOMALOUS = 3
N_NORMAL = 1
MAX_SIDE = 128
FLOAT16_LIMIT = 6e4  # larger raw scores are kept as float32


def pick(samples: Sequence[Sample]) -> list[int]:
    """Anomalous images spread evenly over the name order (so over defect types), then
    the first normal image by name."""
    anomalous = sorted((s.name, i) for i, s in enumerate(samples) if s.label == 1)
    normal = sorted((s.name, i) for i, s in enumerate(samples) if s.label == 0)
    chosen = []
    if anomalous:
        count = min(N_ANOMALOUS, len(anomalous))
        spots = np.linspace(0, len(anomalous) - 1, count).round().astype(int)
        chosen += [anomalous[k][1] for k in dict.fromkeys(spots.tolist())]
    chosen += [i for _, i in normal[:N_NORMAL]]
    return chosen


def _shrunk_size(h: int, w: int) -> tuple[int, int]:
    scale = min(1.0, MAX_SIDE / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _display_image(sample: Sample, pre: Preprocess) -> np.ndarray:
    """The model's view of the image (resized, cropped) as uint8 RGB."""
    import torch

    from bench.datasets.pipeline import IMAGENET_MEAN, IMAGENET_STD, read_image, to_tensor

    tensor = to_tensor(read_image(sample.image), pre)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return (rgb * 255).round().astype(np.uint8)


def collect(
    samples: Sequence[Sample], pre: Preprocess, masks: np.ndarray, maps: np.ndarray
) -> dict[str, np.ndarray]:
    """Images, masks (model resolution) and raw maps of the picked samples, shrunk."""
    index = pick(samples)
    h, w = _shrunk_size(*maps.shape[1:])
    images, small_masks, small_maps = [], [], []
    for i in index:
        image = Image.fromarray(_display_image(samples[i], pre))
        images.append(np.asarray(image.resize((w, h), Image.BILINEAR)))
        mask = Image.fromarray(masks[i] * 255).resize((w, h), Image.NEAREST)
        small_masks.append((np.asarray(mask) > 127).astype(np.uint8))
        score = Image.fromarray(maps[i].astype(np.float32), mode="F").resize((w, h), Image.BOX)
        small_maps.append(np.asarray(score, dtype=np.float32))
    stacked = np.stack(small_maps) if small_maps else np.zeros((0, h, w), np.float32)
    small = stacked.size and np.isfinite(stacked).all() and np.abs(stacked).max() < FLOAT16_LIMIT
    return {
        "field": np.array(pre.output_size[0] / pre.size[0], dtype=np.float32),
        "names": np.array([samples[i].name for i in index], dtype=str),
        "labels": np.array([samples[i].label for i in index], dtype=np.uint8),
        "images": np.stack(images) if images else np.zeros((0, h, w, 3), np.uint8),
        "masks": np.stack(small_masks) if small_masks else np.zeros((0, h, w), np.uint8),
        "maps": stacked.astype(np.float16) if small else stacked,
    }


def save(folder: Path, cell_keys: list[str], examples: dict[str, np.ndarray] | None) -> None:
    """Compress once; every cell the computation answers for gets its own file."""
    if examples is None:
        return
    target = Path(folder) / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **examples)
    for key in cell_keys:
        tmp = target / f"{key}.tmp.npz"
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(target / f"{key}.npz")


def load(folder: Path, cell_key: str) -> dict[str, np.ndarray] | None:
    path = Path(folder) / FOLDER / f"{cell_key}.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
