"""Real-IAD in its released layout, listed from the per-category JSON split files.

``<root>/realiad_jsons/<category>.json`` (also found one level down, as
``realiad_jsons/realiad_jsons/<category>.json``, where the JSON archive was extracted into
its own folder) holds ``meta`` (``prefix``, ``normal_class``) and the ``train`` and
``test`` lists; each entry names ``image_path``, ``mask_path`` (or null), ``anomaly_class``
and ``category``. Images and masks live under ``<root>/realiad_1024/<prefix>/``, the
1024-pixel release the authors train on.

Labels follow the authors' loader: every training entry is normal; a test entry is normal
when its ``anomaly_class`` is ``meta.normal_class`` or it has no mask (null or empty).
anomalib instead labels by ``anomaly_class`` alone and ignores ``meta``: the two differ
only on a test entry with a defect class and no mask, which anomalib counts as anomalous
(with an empty mask) and the authors, and this loader, as normal. When ``meta`` lacks
``prefix`` or ``normal_class``, the category name and ``OK`` are used (anomalib's paths).

Every camera view (C1-C5) is its own image; sample-level scores that pool the five views
are not computed here. A category has thousands of 1024-pixel images, so nothing is
decoded while listing: the JSON is parsed once per instance into a list of paths, and
images are read when the pipeline asks for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.datasets.base import Dataset, Sample, require_dir
from bench.datasets.split_file import ExistingFiles, inside
from bench.errors import BenchError
from bench.registry import DATASETS

REALIAD_CATEGORIES = (
    "audiojack",
    "bottle_cap",
    "button_battery",
    "end_cap",
    "eraser",
    "fire_hood",
    "mint",
    "mounts",
    "pcb",
    "phone_battery",
    "plastic_nut",
    "plastic_plug",
    "porcelain_doll",
    "regulator",
    "rolled_strip_base",
    "sim_card_set",
    "switch",
    "tape",
    "terminalblock",
    "toothbrush",
    "toy",
    "toy_brick",
    "transistor1",
    "u_block",
    "usb",
    "usb_adaptor",
    "vcpill",
    "wooden_beads",
    "woodstick",
    "zipper",
)
IMAGE_DIR = "realiad_1024"
JSON_DIRS = ("realiad_jsons", "realiad_jsons/realiad_jsons")
DEFAULT_NORMAL_CLASS = "OK"

Splits = tuple[list[Sample], list[Sample]]


@DATASETS.register("realiad")
class RealIAD(Dataset):
    """Real-IAD: 30 objects, five camera views each, 1024-pixel images."""

    name = "realiad"
    categories = REALIAD_CATEGORIES

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise BenchError(
                "dataset 'realiad' needs its files: pass --data-root with the Real-IAD folder "
                f"holding {IMAGE_DIR}/ and realiad_jsons/"
            )
        super().__init__(Path(root))
        self._splits: dict[str, Splits] = {}

    def _json_dir(self) -> Path:
        assert self.root is not None
        root = require_dir(
            self.root, f"--data-root of dataset 'realiad': the folder holding {IMAGE_DIR}/"
        )
        for candidate in JSON_DIRS:
            if any((root / candidate).glob("*.json")):
                return root / candidate
        raise BenchError(
            f"{root}: no Real-IAD split files; expected {JSON_DIRS[0]}/<category>.json "
            f"(or {JSON_DIRS[1]}/<category>.json) from the released realiad_jsons archive"
        )

    def available_categories(self) -> tuple[str, ...]:
        """Categories with a split file: official ones in official order, then any others."""
        present = {p.stem for p in self._json_dir().glob("*.json")}
        official = [c for c in self.categories if c in present]
        return tuple(official + sorted(present - set(official)))

    def _split(self, category: str) -> Splits:
        """Both splits of a category, from one parse of its JSON file."""
        if category not in self._splits:
            self.check_category(category)
            assert self.root is not None
            path = self._json_dir() / f"{category}.json"
            self._splits[category] = _read_split_file(self.root, path, category)
        return self._splits[category]

    def train(self, category: str) -> list[Sample]:
        return self._split(category)[0]

    def test(self, category: str) -> list[Sample]:
        return self._split(category)[1]


def _read_split_file(root: Path, path: Path, category: str) -> Splits:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path}: unreadable Real-IAD split file ({exc})") from exc
    if not isinstance(document, dict) or not all(
        isinstance(document.get(k), list) for k in ("train", "test")
    ):
        raise BenchError(
            f"{path}: not a Real-IAD split file; expected an object with 'meta', 'train' and "
            "'test', the last two lists of entries"
        )
    meta = document.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    prefix = meta.get("prefix", category)
    normal_class = meta.get("normal_class", DEFAULT_NORMAL_CLASS)
    images = require_dir(root / IMAGE_DIR, "the 1024-pixel Real-IAD images")
    # the authors join prefix and entry path, so an empty prefix means no folder
    base = inside(images, prefix, f"{path} meta", "prefix") if prefix != "" else images
    require_dir(base, f"the images of Real-IAD category '{category}' ({path} meta.prefix)")
    existing = ExistingFiles()
    splits = []
    for split in ("train", "test"):
        samples = [
            _sample(base, entry, f"{path} {split}[{i}]", split == "train", normal_class, existing)
            for i, entry in enumerate(document[split])
        ]
        if not samples:
            raise BenchError(f"{path}: the '{split}' list is empty")
        splits.append(samples)
    return splits[0], splits[1]


def _sample(
    base: Path, entry: Any, where: str, train: bool, normal_class: str, existing: ExistingFiles
) -> Sample:
    if not isinstance(entry, dict) or not isinstance(entry.get("anomaly_class"), str):
        raise BenchError(f"{where}: expected an entry with image_path, mask_path, anomaly_class")
    image = inside(base, entry.get("image_path"), where, "image_path")
    if image not in existing:
        raise BenchError(f"{image}: image listed in {where} not found; restore it from the archive")
    name = os.path.splitext(entry["image_path"])[0]
    mask_value = entry.get("mask_path")
    if train or not mask_value or entry["anomaly_class"] == normal_class:
        return Sample(image, 0, None, "good", name)
    mask = inside(base, mask_value, where, "mask_path")
    if mask not in existing:
        raise BenchError(f"{mask}: mask listed in {where} not found; restore it from the archive")
    return Sample(image, 1, mask, entry["anomaly_class"], name)
