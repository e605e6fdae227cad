"""Shared fixtures, among them real MVTec AD images named by ``FLOWAD_MVTEC_SAMPLE``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# A folder in MVTec AD's layout holding the categories bottle and bottle_xs (bottle with five
# training images); the tests that read real images skip without it.
MVTEC_SAMPLE = os.environ.get("FLOWAD_MVTEC_SAMPLE", "")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_mvtec() -> Path:
    """Folder holding real MVTec AD categories (bottle, bottle_xs)."""
    if not MVTEC_SAMPLE or not (Path(MVTEC_SAMPLE) / "bottle_xs").is_dir():
        pytest.skip("set FLOWAD_MVTEC_SAMPLE to a folder holding MVTec AD's bottle and bottle_xs")
    return Path(MVTEC_SAMPLE)


@pytest.fixture
def one_thread():
    """Tiny tensors and timed calls on one thread: on a busy machine a second OpenMP thread
    only adds spin-waits at every barrier."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
