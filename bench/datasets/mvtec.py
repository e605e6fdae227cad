"""MVTec AD in its original layout; also reads any folder laid out the same way.

``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect>/*.png`` and
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``. The synthetic dataset and
custom data in this layout are read by this loader too.
"""

from __future__ import annotations

from pathlib import Path

from bench.datasets.base import Dataset, Sample, list_images, require_dir
from bench.errors import BenchError
from bench.registry import DATASETS

MVTEC_CATEGORIES = (
    "carpet",
    "grid",
    "leather",
    "tile",
    "wood",
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
)

NORMAL = "good"


def _has_layout(folder: Path) -> bool:
    return (folder / "train" / NORMAL).is_dir() and (folder / "test").is_dir()


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders in a stable order (hidden ones are editor or OS clutter)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@DATASETS.register("mvtec")
class MVTec(Dataset):
    """MVTec AD: 15 categories, pixel masks for every anomalous test image."""

    name = "mvtec"
    categories = MVTEC_CATEGORIES

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise BenchError(
                f"dataset '{self.name}' needs its files: pass --data-root with the folder "
                "holding the category folders (e.g. mvtec_anomaly_detection/ with bottle/, cable/, ...)"
            )
        super().__init__(Path(root))

    def folder(self) -> Path:
        """The checked top folder (the synthetic dataset generates it here first)."""
        assert self.root is not None
        return require_dir(
            self.root,
            f"--data-root of dataset '{self.name}': the folder holding the category folders",
        )

    def available_categories(self) -> tuple[str, ...]:
        """Official categories present on disk (official order), then extra MVTec-layout folders."""
        root = self.folder()
        official = [c for c in self.categories if (root / c).is_dir()]
        extra = [p.name for p in _subdirs(root) if p.name not in self.categories and _has_layout(p)]
        if not official and not extra:
            raise BenchError(
                f"{root}: no {self.name} category folders found (expected e.g. "
                f"{root / self.categories[0] / 'train' / NORMAL}); pass the folder that holds "
                "the categories as --data-root"
            )
        return tuple(official + extra)

    def check_category(self, category: str) -> None:
        if category in self.categories and not (self.folder() / category).is_dir():
            raise BenchError(
                f"{self.folder() / category}: missing folder for {self.name} category "
                f"'{category}'; present: {', '.join(self.available_categories())}"
            )
        super().check_category(category)

    def _category_dir(self, category: str) -> Path:
        self.check_category(category)
        return self.folder() / category

    def train(self, category: str) -> list[Sample]:
        folder = require_dir(
            self._category_dir(category) / "train" / NORMAL, "normal training images"
        )
        images = list_images(folder)
        if not images:
            raise BenchError(f"{folder}: no training images (expected *.png files)")
        return [Sample(p, 0, None, NORMAL, f"{NORMAL}/{p.stem}") for p in images]

    def test(self, category: str) -> list[Sample]:
        base = self._category_dir(category)
        test_dir = require_dir(base / "test", "test images, one subfolder per defect type")
        samples: list[Sample] = []
        for defect_dir in _subdirs(test_dir):
            defect = defect_dir.name
            for image in list_images(defect_dir):
                name = f"{defect}/{image.stem}"
                if defect == NORMAL:
                    samples.append(Sample(image, 0, None, NORMAL, name))
                    continue
                mask = base / "ground_truth" / defect / f"{image.stem}_mask.png"
                if not mask.is_file():
                    raise BenchError(
                        f"{mask}: missing ground-truth mask for anomalous test image {image}; "
                        "restore it from the original archive"
                    )
                samples.append(Sample(image, 1, mask, defect, name))
        if not samples:
            raise BenchError(f"{test_dir}: no test images (expected <defect>/*.png subfolders)")
        return samples
