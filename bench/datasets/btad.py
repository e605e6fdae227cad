"""BTAD (beanTech Anomaly Detection) in its original layout.

``<root>/<cls>/train/ok``, ``<root>/<cls>/test/ok``, ``<root>/<cls>/test/ko`` and
``<root>/<cls>/ground_truth/ko``. File types differ between classes (BMP images with PNG
masks, PNG with PNG, BMP with BMP), so masks are matched to images by file stem.
Class 03 is 800x600, not square: nothing here depends on the image size.
"""

from __future__ import annotations

from pathlib import Path

from bench.datasets.base import Dataset, Sample, list_images, require_dir
from bench.errors import BenchError
from bench.registry import DATASETS

NORMAL = "good"
ANOMALOUS = "ko"


def _mask_key(path: Path) -> str:
    """The image stem a mask belongs to: ``0001.png`` and ``0001_mask.bmp`` both give 0001."""
    return path.stem.removesuffix("_mask")


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    masks: dict[str, Path] = {}
    for path in list_images(folder):
        key = _mask_key(path)
        if key in masks:
            raise BenchError(
                f"{folder}: two masks for image stem '{key}' ({masks[key].name}, {path.name}); "
                "keep one"
            )
        masks[key] = path
    return masks


@DATASETS.register("btad")
class BTAD(Dataset):
    """BTAD: three industrial products, pixel masks for every anomalous ('ko') test image."""

    name = "btad"
    categories = ("01", "02", "03")

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise BenchError(
                "dataset 'btad' needs its files: pass --data-root with the BTAD folder "
                "holding 01/, 02/ and 03/"
            )
        super().__init__(Path(root))

    def _class_dir(self, category: str) -> Path:
        self.check_category(category)
        assert self.root is not None
        root = require_dir(
            self.root, "--data-root of dataset 'btad': the folder holding 01/, 02/, 03/"
        )
        return require_dir(root / category, f"BTAD class '{category}'")

    @staticmethod
    def _images(folder: Path, what: str) -> list[Path]:
        images = list_images(require_dir(folder, what))
        if not images:
            raise BenchError(f"{folder}: no {what} (expected .bmp or .png files)")
        return images

    def train(self, category: str) -> list[Sample]:
        folder = self._class_dir(category) / "train" / "ok"
        return [
            Sample(p, 0, None, NORMAL, f"ok/{p.stem}")
            for p in self._images(folder, "normal training images")
        ]

    def test(self, category: str) -> list[Sample]:
        base = self._class_dir(category)
        samples = [
            Sample(p, 0, None, NORMAL, f"ok/{p.stem}")
            for p in self._images(base / "test" / "ok", "normal test images")
        ]
        mask_dir = require_dir(
            base / "ground_truth" / ANOMALOUS, "masks of the anomalous test images"
        )
        masks = _masks_by_stem(mask_dir)
        for image in self._images(base / "test" / ANOMALOUS, "anomalous test images"):
            mask = masks.get(image.stem)
            if mask is None:
                raise BenchError(
                    f"{image}: no ground-truth mask found in {mask_dir} "
                    f"(looked for {image.stem}.png/.bmp or {image.stem}_mask.*)"
                )
            samples.append(Sample(image, 1, mask, ANOMALOUS, f"{ANOMALOUS}/{image.stem}"))
        return samples
