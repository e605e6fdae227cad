"""Keep freed memory in the process while cells run (glibc on Linux; elsewhere nothing).

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it on free, and trims the heap top past a threshold. A training step allocates and
frees the same activation sizes every time, so each step faults its memory back in page by
page: on the 2-core AVX2 machine, FastFlow resnet18's fit spent 10 of its 100 CPU seconds
in the kernel. With mappings off and trimming off, freed blocks are reused; the fit takes
about 5% less wall time. ``release_freed_memory`` hands the free heap back between cells,
so each cell's peak-memory figure starts from what the process really holds, and between a
cell's phases, since a block freed by a CPU worker thread stays in that thread's arena.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (musl and others lack one or both)
    except (OSError, AttributeError):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it; True when the allocator agreed."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def release_freed_memory() -> None:
    """Return the heap's free pages to the kernel (its size in use does not change)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
