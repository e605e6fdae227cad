"""CIFAR-10 one-vs-rest: one class is normal, the nine others are anomalies.

Reads the python version of the release (cifar-10-python.tar.gz, extracted). Its files are
Python 2 pickles; they are read with a restricted unpickler that only rebuilds numpy
arrays, because a plain ``pickle.load`` runs whatever code a tampered file names.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from bench.datasets.base import Dataset, Sample, require_dir
from bench.errors import BenchError
from bench.registry import DATASETS

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"

# The only globals the release's pickles name (numpy 1 and 2 spellings). _codecs.encode
# appears when Python 3 re-saves byte strings at protocol 2; it only converts text.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise BenchError(
                f"{self.path}: refusing to load '{module}.{name}' from this pickle; a CIFAR-10 "
                "batch holds only numpy arrays and lists (replace the file with the original)"
            ) from None


def _missing_hint() -> str:
    return (
        "the python version of CIFAR-10 is expected (cifar-10-python.tar.gz, extracted so "
        f"that --data-root holds {BATCHES_DIR}/)"
    )


def load_batch(path: Path) -> dict[bytes, Any]:
    """One pickled batch file as a dict with byte-string keys, loaded safely."""
    if not path.is_file():
        raise BenchError(f"{path}: missing CIFAR-10 file; {_missing_hint()}")
    try:
        with path.open("rb") as f:
            batch = _RestrictedUnpickler(f, path).load()
    except BenchError:
        raise
    except Exception as exc:  # a truncated or foreign file fails in many ways
        raise BenchError(f"{path}: unreadable CIFAR-10 batch ({exc}); {_missing_hint()}") from exc
    if not isinstance(batch, dict):
        raise BenchError(f"{path}: not a CIFAR-10 batch (a dict was expected); {_missing_hint()}")
    return batch


def _images_and_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images (HWC) and (N,) labels of one batch file."""
    batch = load_batch(path)
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or not isinstance(labels, list)
        or len(labels) != data.shape[0]
        or not all(isinstance(v, int) and 0 <= v < len(CIFAR10_CLASSES) for v in labels)
    ):
        raise BenchError(
            f"{path}: not a CIFAR-10 batch (expected b'data' uint8 (N, 3072) and N b'labels' in 0..9); "
            f"{_missing_hint()}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


@DATASETS.register("cifar10")
class CIFAR10(Dataset):
    """One-vs-rest CIFAR-10: train on one class, test on the whole 10,000-image test set."""

    name = "cifar10"
    categories = CIFAR10_CLASSES
    has_masks = False

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise BenchError(
                f"dataset 'cifar10' needs its files: pass --data-root with the folder holding "
                f"{BATCHES_DIR}/ (or that folder itself)"
            )
        super().__init__(Path(root))
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _batches_dir(self) -> Path:
        assert self.root is not None
        root = require_dir(self.root, f"--data-root of dataset 'cifar10'; {_missing_hint()}")
        return root / BATCHES_DIR if (root / BATCHES_DIR).is_dir() else root

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Decoded images and labels of 'train' or 'test', read once per instance."""
        if split not in self._splits:
            folder = self._batches_dir()
            self._check_label_names(folder / META_FILE)
            files = TRAIN_FILES if split == "train" else (TEST_FILE,)
            parts = [_images_and_labels(folder / f) for f in files]
            self._splits[split] = (
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
            )
        return self._splits[split]

    def _check_label_names(self, path: Path) -> None:
        """Refuse CIFAR-100 or a reordered release: labels index ``categories``."""
        names = load_batch(path).get(b"label_names")
        decoded = tuple(n.decode() if isinstance(n, bytes) else n for n in names or ())
        if decoded != self.categories:
            raise BenchError(
                f"{path}: label names {list(decoded)} are not CIFAR-10's {list(self.categories)}; "
                f"{_missing_hint()}"
            )

    def train(self, category: str) -> list[Sample]:
        self.check_category(category)
        images, labels = self._split("train")
        target = self.categories.index(category)
        return [
            Sample(images[i], 0, None, "good", f"{category}/{i:05d}")
            for i in np.flatnonzero(labels == target)
        ]

    def test(self, category: str) -> list[Sample]:
        """All test images; the category's are normal, the others carry their class as defect."""
        self.check_category(category)
        images, labels = self._split("test")
        samples = []
        for i, label in enumerate(labels.tolist()):
            cls = self.categories[label]
            normal = cls == category
            samples.append(
                Sample(
                    images[i], 0 if normal else 1, None, "good" if normal else cls, f"{cls}/{i:05d}"
                )
            )
        return samples
