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


@pytest.fixture
def one_thread():
    """Tiny tensors and timed calls on one thread: on a busy machine a second OpenMP thread
    only adds spin-waits at every barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
