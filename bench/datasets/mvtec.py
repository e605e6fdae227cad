"""MVTec AD in its original layout; also reads any folder laid out the same way.

``<root>/<category>/train/good/*.png``, ``<root>/<category>/test/<defect>/*.png`` and
``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``. The synthetic dataset, MPDD,
MVTec AD 2 (whose test and ground-truth folders are named differently) and custom data in
this layout are read by this loader too.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

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


def _plain_name(name: str) -> bool:
    """A single visible folder name: never a path that leaves --data-root."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name


def _subdirs(folder: Path) -> list[Path]:
    """Visible subfolders in a stable order (hidden ones are editor or OS clutter)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@DATASETS.register("mvtec")
class MVTec(Dataset):
    """MVTec AD: 15 categories, pixel masks for every anomalous test image."""

    name = "mvtec"
    categories = MVTEC_CATEGORIES
    # Folders inside a category folder; subclasses rename them for their release.
    train_dir: ClassVar[str] = f"train/{NORMAL}"
    test_dir: ClassVar[str] = "test"
    ground_truth_dir: ClassVar[str] = "ground_truth"

    def __init__(self, root: Path | None) -> None:
        if root is None:
            first, second = self.categories[:2]
            raise BenchError(
                f"dataset '{self.name}' needs its files: pass --data-root with the folder "
                f"holding the category folders ({first}/, {second}/, ...)"
            )
        super().__init__(Path(root))

    def _missing_part(self, folder: Path) -> str | None:
        """The first layout folder a category folder lacks, or None when it has them all."""
        for part in (self.train_dir, self.test_dir):
            if not (folder / part).is_dir():
                return part
        return None

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
        extra = [
            p.name
            for p in _subdirs(root)
            if p.name not in self.categories and self._missing_part(p) is None
        ]
        if not official and not extra:
            raise BenchError(
                f"{root}: no {self.name} category folders found (expected e.g. "
                f"{root / self.categories[0] / self.train_dir}); pass the folder that holds "
                "the categories as --data-root"
            )
        return tuple(official + extra)

    def check_category(self, category: str) -> None:
        """A category folder that exists but lacks a layout folder is reported as such."""
        folder = self.folder() / category
        if _plain_name(category) and folder.is_dir():
            missing = self._missing_part(folder)
            if missing is not None:
                raise BenchError(
                    f"{category}: no {missing} folder under {folder} (the {self.name} layout "
                    f"has {self.train_dir}/ and {self.test_dir}/ in every category folder)"
                )
            return
        if category in self.categories:
            raise BenchError(
                f"{folder}: missing folder for {self.name} category "
                f"'{category}'; present: {', '.join(self.available_categories())}"
            )
        super().check_category(category)

    def _category_dir(self, category: str) -> Path:
        self.check_category(category)
        return self.folder() / category

    def train(self, category: str) -> list[Sample]:
        return self._normal_images(self._category_dir(category) / self.train_dir, "training")

    def _normal_images(self, folder: Path, what: str) -> list[Sample]:
        images = list_images(require_dir(folder, f"normal {what} images"))
        if not images:
            raise BenchError(f"{folder}: no {what} images (expected *.png files)")
        return [Sample(p, 0, None, NORMAL, f"{NORMAL}/{p.stem}") for p in images]

    def test(self, category: str) -> list[Sample]:
        base = self._category_dir(category)
        test_dir = require_dir(base / self.test_dir, "test images, one subfolder per defect type")
        ground_truth = base / self.ground_truth_dir
        samples: list[Sample] = []
        for defect_dir in _subdirs(test_dir):
            if defect_dir == ground_truth:  # MVTec AD 2 keeps its masks inside the test folder
                continue
            defect = defect_dir.name
            for image in list_images(defect_dir):
                name = f"{defect}/{image.stem}"
                if defect == NORMAL:
                    samples.append(Sample(image, 0, None, NORMAL, name))
                    continue
                mask = ground_truth / defect / f"{image.stem}_mask.png"
                if not mask.is_file():
                    raise BenchError(
                        f"{mask}: missing ground-truth mask for anomalous test image {image}; "
                        "restore it from the original archive"
                    )
                samples.append(Sample(image, 1, mask, defect, name))
        if not samples:
            raise BenchError(f"{test_dir}: no test images (expected <defect>/*.png subfolders)")
        return samples
