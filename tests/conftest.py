"""Shared fixtures: the real MVTec AD sample in ../shared (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_MVTEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_mvtec() -> Path:
    """Folder holding real MVTec AD categories (bottle, bottle_xs)."""
    if not (SHARED_MVTEC / "bottle_xs").is_dir():
        pytest.skip("../shared/data/mvtec is absent")
    return SHARED_MVTEC
