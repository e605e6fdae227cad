"""The runner's allocator settings: freed blocks are reused in place, and given back on request."""

from __future__ import annotations

import resource
import threading

import numpy as np
import pytest

from bench.runner.heap import _glibc, release_freed_memory, retain_freed_memory

pytestmark = pytest.mark.skipif(_glibc() is None, reason="needs glibc on Linux")

BLOCK = 256 * 2**20  # above glibc's largest mmap threshold, as activations of a batch are
# Touching a fresh block faults at least once per 2 MiB (numpy asks for huge pages), so 128
# times; a reused block not at all.
FRESH_FAULTS = BLOCK // (2 * 2**20)


def _faults_touching_a_fresh_block() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(BLOCK, dtype=np.uint8)  # allocates and writes every page
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def test_retained_blocks_are_reused_without_page_faults() -> None:
    assert retain_freed_memory()
    _faults_touching_a_fresh_block()  # the heap grows once
    assert _faults_touching_a_fresh_block() < FRESH_FAULTS // 8


def test_release_hands_the_free_heap_back() -> None:
    assert retain_freed_memory()
    _faults_touching_a_fresh_block()
    held = _resident_bytes()
    release_freed_memory()
    assert held - _resident_bytes() > BLOCK // 2
    assert _faults_touching_a_fresh_block() >= FRESH_FAULTS // 2


def test_release_also_hands_back_what_another_thread_freed() -> None:
    """A worker thread allocates from a glibc arena of its own; the runner's release between
    phases must reach it, or each worker keeps its own peak for the rest of the run."""
    assert retain_freed_memory()
    piece, count = 8 * 2**20, 24  # below a thread arena's 64 MiB heaps, as activations are

    def allocate_and_free() -> None:
        blocks = [np.ones(piece, dtype=np.uint8) for _ in range(count)]
        del blocks

    worker = threading.Thread(target=allocate_and_free)
    worker.start()
    worker.join()
    held = _resident_bytes()
    release_freed_memory()
    assert held - _resident_bytes() > piece * count // 2
