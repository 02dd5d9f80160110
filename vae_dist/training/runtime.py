"""Process-wide CPU settings, applied once by the program's entry point, before any tensor work.

Two things slow CPU training down without changing what it learns:

- Subnormal floats. Adam's moment estimates for weights that rarely get a gradient
  (MNIST's border pixels) decay through the subnormal range, where the CPU takes a slow
  path; flushing them to zero keeps epochs from slowing down as training goes on
  (TrainingConfig.flush_denormal).
- glibc returning freed memory to the OS. A conv step frees and re-allocates buffers of a
  few MB; depending on the order of allocations, glibc gives them back to the kernel and
  the next step faults every page in again.

The flush mode is per thread and torch's worker threads copy it when they are created,
at the first parallel operation; the allocator settings apply to later allocations. Hence
"before any tensor work", and hence the entry point (vae_dist.cli, the benchmarks) and not
the library function train(). benchmarks/README.md has the measurements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks under 32 MB (glibc's largest allowed threshold) come from the heap, and up to
# 1 GB of freed heap is kept for reuse rather than returned.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30
# The user has chosen an allocator policy (or another allocator): leave it alone.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def prepare_process(flush_denormal: bool) -> None:
    """Call first in a training process (see the module docstring)."""
    torch.set_flush_denormal(flush_denormal)  # a no-op returning False on CPUs without the mode
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse. Returns whether the policy was set: not
    with another C library (macOS, musl), another allocator preloaded, or the user's own
    MALLOC_* settings."""
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
