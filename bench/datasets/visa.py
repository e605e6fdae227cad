"""VisA (Visual Anomaly) in its released layout, split by the official 1-class split file.

The archive holds ``<root>/<category>/Data/Images/{Normal,Anomaly}/*.JPG``,
``<root>/<category>/Data/Masks/Anomaly/*.png``, ``<root>/<category>/image_anno.csv`` and
``<root>/split_csv/1cls.csv``. The split file has the columns ``object,split,label,image,mask``
(split ``train``/``test``, label ``normal``/``anomaly``, paths relative to the root); it is
read as released, not converted into an MVTec-style copy first. Masks are binarised at > 0,
so both released conventions (0/255 and 0/1) read the same. ``image_anno.csv`` (defect names)
is not needed: the defect of every anomalous image is recorded as ``anomaly``.
"""

from __future__ import annotations

import csv
import posixpath
from dataclasses import dataclass
from pathlib import Path

from bench.datasets.base import Dataset, Sample, require_dir
from bench.datasets.split_file import ExistingFiles, inside
from bench.errors import BenchError
from bench.registry import DATASETS

VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
SPLIT_FILE = "split_csv/1cls.csv"
COLUMNS = ["object", "split", "label", "image", "mask"]
NORMAL, ANOMALY = "normal", "anomaly"


@dataclass(frozen=True)
class _Row:
    """One checked line of the split file."""

    split: str  # "train" or "test"
    key: str  # the image path as the file writes it: the sort key
    sample: Sample


class _SplitFile:
    """The split file's lines; a category's lines are parsed only when it is used.

    The released file lists all twelve categories (10,821 lines): parsing only the used
    category's lines keeps listing about as cheap per image as walking a folder tree.
    """

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise BenchError(
                f"{path}: missing VisA split file; --data-root must be the extracted VisA "
                f"archive, which holds {SPLIT_FILE} (columns {','.join(COLUMNS)}) beside the "
                "category folders"
            )
        self.path = path
        self.lines = path.read_text(encoding="utf-8-sig").splitlines()
        header = next(csv.reader(self.lines[:1]), None)
        if header != COLUMNS:
            raise BenchError(
                f"{path}: header is {','.join(header or [])!r}, expected {','.join(COLUMNS)!r} "
                "(the released 1-class split file)"
            )

    def categories(self) -> set[str]:
        return {line.split(",", 1)[0] for line in self.lines[1:] if line}

    def rows(self, category: str) -> list[tuple[str, list[str]]]:
        """(where, fields) of the category's lines; ``where`` names file and line for errors."""
        prefix = f"{category},"
        return [
            (f"{self.path} line {n}", next(csv.reader([line])))
            for n, line in enumerate(self.lines, 1)
            if line.startswith(prefix)
        ]


@DATASETS.register("visa")
class VisA(Dataset):
    """VisA: twelve objects (four PCBs, multi-instance and single-instance objects)."""

    name = "visa"
    categories = VISA_CATEGORIES

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise BenchError(
                "dataset 'visa' needs its files: pass --data-root with the extracted VisA "
                f"archive (the folder holding candle/, capsules/, ... and {SPLIT_FILE})"
            )
        super().__init__(Path(root))
        self._file: _SplitFile | None = None
        self._rows: dict[str, list[_Row]] = {}

    def _split_file(self) -> _SplitFile:
        """The split file, read once per instance."""
        if self._file is None:
            assert self.root is not None
            root = require_dir(self.root, "--data-root of dataset 'visa': the extracted archive")
            self._file = _SplitFile(root / SPLIT_FILE)
        return self._file

    def available_categories(self) -> tuple[str, ...]:
        """The split file's categories: official ones in official order, then any others."""
        present = self._split_file().categories()
        official = [c for c in self.categories if c in present]
        return tuple(official + sorted(present - set(official)))

    def check_category(self, category: str) -> None:
        super().check_category(category)
        assert self.root is not None
        folder = self.root / category
        if not folder.is_dir():
            raise BenchError(
                f"{folder}: missing folder for visa category '{category}', which "
                f"{self._split_file().path} lists; restore it from the archive"
            )

    def _category_rows(self, category: str) -> list[_Row]:
        """A category's rows, checked (values, paths, files) once, in image-path order."""
        if category not in self._rows:
            self.check_category(category)
            assert self.root is not None
            existing = ExistingFiles()
            rows = [
                _parse_row(self.root, values, where, existing)
                for where, values in self._split_file().rows(category)
            ]
            self._rows[category] = sorted(rows, key=lambda r: r.key)
        return self._rows[category]

    def _samples(self, category: str, split: str) -> list[Sample]:
        samples = [r.sample for r in self._category_rows(category) if r.split == split]
        if not samples:
            raise BenchError(
                f"{self._split_file().path}: no {split} rows for category '{category}'"
            )
        return samples

    def train(self, category: str) -> list[Sample]:
        return self._samples(category, "train")

    def test(self, category: str) -> list[Sample]:
        return self._samples(category, "test")


def _parse_row(root: Path, values: list[str], where: str, existing: ExistingFiles) -> _Row:
    if len(values) != len(COLUMNS):
        raise BenchError(
            f"{where}: {len(values)} fields, expected {len(COLUMNS)} ({','.join(COLUMNS)})"
        )
    _, split, label, image_value, mask_value = values
    if split not in ("train", "test") or label not in (NORMAL, ANOMALY):
        raise BenchError(
            f"{where}: split '{split}', label '{label}'; expected split train/test and label "
            f"{NORMAL}/{ANOMALY}"
        )
    anomalous = label == ANOMALY
    if anomalous and split == "train":
        raise BenchError(
            f"{where}: an anomalous training image; the 1-class split trains on normal images only"
        )
    if anomalous and not mask_value:
        raise BenchError(f"{where}: anomalous image {image_value} has no mask path")
    image = inside(root, image_value, where, "image")
    mask = inside(root, mask_value, where, "mask") if anomalous else None
    for kind, file in (("image", image), ("mask", mask)):
        if file is not None and file not in existing:
            raise BenchError(
                f"{file}: {kind} listed in {where} not found; restore it from the archive"
            )
    folder, file_name = posixpath.split(image_value)
    name = f"{posixpath.basename(folder)}/{posixpath.splitext(file_name)[0]}"  # e.g. Normal/0836
    sample = Sample(image, int(anomalous), mask, ANOMALY if anomalous else "good", name)
    return _Row(split, image_value, sample)
