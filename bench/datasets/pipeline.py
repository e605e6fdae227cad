"""The one image pipeline every method shares: decode, resize, crop, normalise; masks at
model and at native resolution.

Dataset plugins only list samples; everything that turns a sample into pixels is here, so
the same cell gives every method identical input.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from bench.datasets import png
from bench.datasets.base import Sample
from bench.errors import BenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A random training transform; it draws only from the generator it is given, so a run's
# images do not depend on how many DataLoader workers produced them.
Augment = Callable[[Image.Image, torch.Generator], Image.Image]

_RESAMPLE = {
    "bilinear": Image.BILINEAR,
    "lanczos": Image.LANCZOS,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize to an explicit (H, W), optionally centre-crop, then ImageNet-normalise."""

    size: tuple[int, int]
    crop: tuple[int, int] | None = None
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop and (self.crop[0] > self.size[0] or self.crop[1] > self.size[1]):
            raise BenchError(
                f"centre crop {self.crop} is larger than the resized image {self.size}"
            )

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop or self.size

    def describe(self) -> str:
        h, w = self.size
        text = f"resize {h}x{w} ({self.resample})"
        if self.crop:
            text += f", centre crop {self.crop[0]}x{self.crop[1]}"
        return text


def _decode_file(path: Path) -> Image.Image:
    """The file's pixels, in the mode PIL opens it with (8-bit PNGs through libspng)."""
    data = Path(path).read_bytes()
    image = png.decode(data)
    if image is None:
        image = Image.open(io.BytesIO(data))
        image.load()
    return image


def read_image(source: Path | np.ndarray) -> Image.Image:
    """An RGB PIL image; grayscale files become three identical channels."""
    if isinstance(source, np.ndarray):
        return Image.fromarray(source).convert("RGB")
    try:
        image = _decode_file(source)
    except FileNotFoundError as exc:
        raise BenchError(f"{source}: image file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BenchError(f"{source}: unreadable image ({exc}); replace or remove the file") from exc
    return image if image.mode == "RGB" else image.convert("RGB")


def read_mask(path: Path, expected_size: tuple[int, int]) -> np.ndarray:
    """A binary (H, W) uint8 mask at native resolution; its size must match the image."""
    try:
        array = np.asarray(_decode_file(path).convert("L"))
    except FileNotFoundError as exc:
        raise BenchError(f"{path}: mask file not found") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise BenchError(f"{path}: unreadable mask ({exc})") from exc
    if array.shape != expected_size:
        raise BenchError(
            f"{path}: mask is {array.shape[1]}x{array.shape[0]} but its image is "
            f"{expected_size[1]}x{expected_size[0]}; masks must match their image's size"
        )
    return (array > 0).astype(np.uint8)


def _centre_box(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = size
    ch, cw = crop
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return left, top, left + cw, top + ch


def _native_crop(mask: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Crop a native-resolution mask by the same fraction the model input was cropped."""
    if pre.crop is None:
        return mask
    h, w = mask.shape
    ch = int(round(h * pre.crop[0] / pre.size[0]))
    cw = int(round(w * pre.crop[1] / pre.size[1]))
    left, top, right, bottom = _centre_box((h, w), (ch, cw))
    return mask[top:bottom, left:right]


def to_tensor(
    img: Image.Image,
    pre: Preprocess,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Resize, crop, optionally augment (drawing from ``generator``), and normalise one RGB
    image into (3, H, W)."""
    h, w = pre.size
    img = img.resize((w, h), _RESAMPLE[pre.resample])
    if pre.crop:
        img = img.crop(_centre_box(pre.size, pre.crop))
    if augment is not None:
        if generator is None:
            raise ValueError("to_tensor: an augmentation needs the generator it draws from")
        img = augment(img, generator)
    array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def mask_to_model(mask: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Nearest-neighbour resize (and crop) of a binary mask to the model's output size."""
    h, w = pre.size
    img = Image.fromarray(mask * 255).resize((w, h), Image.NEAREST)
    if pre.crop:
        img = img.crop(_centre_box(pre.size, pre.crop))
    return (np.asarray(img) > 127).astype(np.uint8)


class ImageSet(torch.utils.data.Dataset):
    """Samples -> normalised tensors (for DataLoader); masks are read separately.

    With ``augment``, image ``i`` is augmented from its own generator seeded by
    ``(seed, i)``: draw a new ``seed`` per pass for fresh augmentations.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        pre: Preprocess,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.pre = pre
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tensor:
        generator = None
        if self.augment is not None:
            generator = torch.Generator().manual_seed(hash((self.seed, index)) % 2**63)
        return to_tensor(read_image(self.samples[index].image), self.pre, self.augment, generator)


class NativeMasks(Sequence):
    """Native-resolution masks held as their defects' bounding boxes, rebuilt one at a time.

    A normal image keeps only its size and an anomalous one the box around its defect
    pixels, so a large test set (Real-IAD: thousands of masks of 1024 px or more) is never in
    memory whole; indexing returns the full uint8 mask, as a list of arrays would.
    """

    def __init__(self) -> None:
        self.shapes: list[tuple[int, int]] = []
        self._boxes: list[tuple[int, int, np.ndarray] | None] = []

    def append(self, mask: np.ndarray) -> None:
        self.shapes.append((int(mask.shape[0]), int(mask.shape[1])))
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            self._boxes.append(None)
            return
        top, left = int(rows[0]), int(cols[0])
        patch = mask[top : rows[-1] + 1, left : cols[-1] + 1].astype(np.uint8, copy=True)
        self._boxes.append((top, left, patch))

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        mask = np.zeros(self.shapes[index], dtype=np.uint8)
        box = self._boxes[index]
        if box is not None:
            top, left, patch = box
            mask[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
        return mask


@dataclass
class GroundTruth:
    """Labels and masks of a test split, at model and at native resolution."""

    labels: np.ndarray  # (N,) int
    masks: np.ndarray | None  # (N, H, W) uint8 at model output size, or None
    native_masks: NativeMasks | None  # per image, at the ground truth's resolution


def _image_size(source: Path | np.ndarray) -> tuple[int, int]:
    if isinstance(source, np.ndarray):
        return source.shape[0], source.shape[1]
    try:
        with Image.open(source) as img:
            return img.size[1], img.size[0]
    except FileNotFoundError as exc:
        raise BenchError(f"{source}: image file not found") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise BenchError(f"{source}: unreadable image ({exc}); replace or remove the file") from exc


def load_ground_truth(samples: Sequence[Sample], pre: Preprocess, has_masks: bool) -> GroundTruth:
    """Read every test mask once; normal images get an all-zero mask of their own size."""
    labels = np.array([s.label for s in samples], dtype=np.int64)
    if not has_masks:
        return GroundTruth(labels, None, None)
    out_h, out_w = pre.output_size
    model_masks = np.zeros((len(samples), out_h, out_w), dtype=np.uint8)
    native = NativeMasks()
    for i, sample in enumerate(samples):
        size = _image_size(sample.image)
        if sample.mask is None:
            if sample.label == 1:
                raise BenchError(f"{sample.image}: anomalous test image has no ground-truth mask")
            mask = np.zeros(size, dtype=np.uint8)
        else:
            mask = read_mask(sample.mask, size)
        model_masks[i] = mask_to_model(mask, pre)
        native.append(_native_crop(mask, pre))
    return GroundTruth(labels, model_masks, native)
