"""The dataset contract: a dataset plugin lists samples (paths or in-memory arrays, labels,
mask paths) of a category's splits in its released layout; it never decodes images.

Decoding, resizing, cropping and normalising live in ``bench.datasets.pipeline``, so every
method sees identical pixels for the same cell.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from bench.errors import BenchError

CACHE_ENV = "FLOWAD_CACHE"


def cache_dir() -> Path:
    """Where flowad-bench keeps what it makes between runs (generated data, the listing of
    plugins, the machine's measured peak): ``$FLOWAD_CACHE`` or ~/.cache/flowad-bench."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "flowad-bench")


IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image of a split. ``image`` is a file, or an (H, W, 3) uint8 array (CIFAR-10)."""

    image: Path | np.ndarray
    label: int  # 0 normal, 1 anomalous
    mask: Path | None  # ground truth; None for normal images and mask-less datasets
    defect: str  # "good" for normal images
    name: str  # stable identifier inside the split, e.g. "broken_large/000"


class Dataset(ABC):
    """A benchmark dataset in its original on-disk layout."""

    name: ClassVar[str]
    categories: ClassVar[tuple[str, ...]]
    has_masks: ClassVar[bool] = True

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def available_categories(self) -> tuple[str, ...]:
        """Categories a run with ``--categories all`` uses."""
        return self.categories

    def check_category(self, category: str) -> None:
        if category not in self.available_categories():
            known = ", ".join(self.available_categories())
            raise BenchError(f"unknown {self.name} category '{category}'; known: {known}")

    @abstractmethod
    def train(self, category: str) -> list[Sample]:
        """Normal training images only."""

    @abstractmethod
    def test(self, category: str) -> list[Sample]:
        """Normal and anomalous test images, with masks where the dataset has them."""


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder in a stable order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise BenchError(f"{path}: missing folder ({what})")
    return path
