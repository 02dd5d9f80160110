"""Process-wide CPU settings, applied by the entry point (the CLI, the benchmarks) before any tensor work.

Flushing subnormals keeps Adam's decaying moments of rarely-updated weights off the CPU's slow path; it is
per thread, and torch's worker threads copy it when they start. Keeping freed memory stops glibc from
returning a conv step's buffers to the kernel only to fault them in again. benchmarks/README.md has figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks under 32 MB (glibc's largest) from the heap
TRIM_THRESHOLD_BYTES = 1 << 30  # up to 1 GB of freed heap kept for reuse
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def prepare_process(flush_denormal: bool) -> None:
    torch.set_flush_denormal(flush_denormal)  # a no-op on CPUs without the mode
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; False (nothing set) with another C library or allocator,
    or where the user chose a policy (MALLOC_*)."""
    if any(name in os.environ for name in ALLOCATOR_ENV):
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in OTHER_ALLOCATORS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
