"""What the side-by-side scripts share: the data subset both sides read, and a CUDA sync.

No torch or bench plugin is imported here, so the whole-process timer stays light.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.datasets.base import list_images


def subset_folder(
    data_root: Path,
    category: str,
    train: int,
    test_per_defect: int | None,
    root: Path | None = None,
) -> Path:
    """An MVTec-layout copy of one category under ``root`` (a new temporary folder when
    None): the first ``train`` normal training images, and the test images with their
    masks, ``test_per_defect`` per folder when given. Copies, not links: anomalib refuses
    files that resolve outside its dataset root."""
    root = Path(tempfile.mkdtemp(prefix="anomalib-compare-")) if root is None else root
    source, target = data_root / category, root / category
    (target / "train" / "good").mkdir(parents=True)
    for path in list_images(source / "train" / "good")[:train]:
        shutil.copy2(path, target / "train" / "good" / path.name)
    for defect in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        (target / "test" / defect.name).mkdir(parents=True)
        for path in list_images(defect)[:test_per_defect]:
            shutil.copy2(path, target / "test" / defect.name / path.name)
            mask = source / "ground_truth" / defect.name / f"{path.stem}_mask.png"
            if mask.is_file():
                (target / "ground_truth" / defect.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(mask, target / "ground_truth" / defect.name / mask.name)
    return root


def sync(device: Any) -> None:
    """Wait for queued CUDA work, so a timer stops when the work does."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
