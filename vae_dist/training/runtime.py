"""What the machine gives a run: process-wide CPU settings, applied by the entry point before any tensor work, and
the memory a config's tables need, checked before the run starts (a K-sample noise table can be tens of GB)."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Optional

import psutil  # an Accelerate dependency
import torch

from vae_dist import models
from vae_dist.config import TrainingConfig
from vae_dist.errors import ConfigError, first_line

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20  # blocks under 32 MB (glibc's largest) from the heap
TRIM_THRESHOLD_BYTES = 1 << 30  # up to 1 GB of freed heap kept for reuse
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
FLOAT = 4  # bytes of a float32


def prepare_process(flush_denormal: bool) -> None:
    # Subnormals flushed keep Adam's decaying moments of rarely-updated weights off the CPU's slow path. Per thread:
    # torch's worker threads copy it when they start, so it comes first. A no-op on CPUs without the mode.
    torch.set_flush_denormal(flush_denormal)
    keep_freed_memory()


@contextmanager
def borrowed_process(flush_denormal: bool) -> Iterator[None]:
    """prepare_process's settings in a caller's process (the API's train), the caller's own back when the block ends
    or raises. Only those that can be undone: glibc's allocator policy cannot be read back, so it is not changed."""
    flushing = torch.tensor(1e-40).item() == 0.0  # torch has no getter: a subnormal reads back as zero when flushed
    # The mode is per thread, and a thread starts in its creator's: the intra-op threads start here (if not yet) in the
    # caller's mode, so that only this thread's needs undoing; the run's work on them does not flush (slower only
    # where subnormals arise).
    torch.ones(1 << 17).sum()
    torch.set_flush_denormal(flush_denormal)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushing)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory (a conv step's buffers, else returned to the kernel and faulted in again);
    False (nothing set) with another C library or allocator, or where the user chose a policy (MALLOC_*)."""
    preload = os.environ.get("LD_PRELOAD", "")
    if any(n in os.environ for n in ALLOCATOR_ENV) or any(n in preload for n in OTHER_ALLOCATORS):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def available_memory(device: torch.device) -> int:
    """Bytes free where the tables live: the GPU's on CUDA, else the host's, or less under a cgroup v2 limit or
    an address-space limit (ulimit -v), which counts what the process has mapped (torch's libraries too)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free, cgroup = psutil.virtual_memory().available, Path("/sys/fs/cgroup")
    with suppress(OSError, ValueError):  # no cgroup v2, or no limit: memory.max reads "max"
        free = min(free, int((cgroup / "memory.max").read_text()) - int((cgroup / "memory.current").read_text()))
    if (limit := address_space_limit()) is not None:
        free = min(free, limit - psutil.Process().memory_info().vms)
    return free


def address_space_limit() -> Optional[int]:
    """This process's RLIMIT_AS (`ulimit -v`) in bytes; None without one."""
    soft = psutil.Process().rlimit(psutil.RLIMIT_AS)[0]
    return None if soft == psutil.RLIM_INFINITY else soft


def out_of_memory_line(e: BaseException) -> Optional[str]:
    """The one line for a failed allocation (MemoryError, torch's "can't allocate memory", CUDA's out of memory),
    naming the limit the process ran under; None for any other error."""
    if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
        return None
    cause = first_line(e).split("DefaultCPUAllocator: ")[-1]  # after torch's "[enforce fail at ...]"
    limit = address_space_limit()
    if isinstance(e, torch.OutOfMemoryError):
        under = "on the GPU"
    elif limit is not None:
        under = f"under an address-space limit (ulimit -v) of {limit / 1e9:.1f} GB"
    else:
        under = f"with {available_memory(torch.device('cpu')) / 1e9:.1f} GB of memory available"
    return (f"out of memory {under} ({cause or type(e).__name__}): lower --batch-size, --iw-train-samples or "
            "--limit-train-samples, or give the process more memory")


def check_memory(config: TrainingConfig, num_train: int, num_valid: int, device: torch.device) -> None:
    """ConfigError naming the option to lower when the run will not fit. On the CPU each process of this
    machine (LOCAL_WORLD_SIZE) holds its own tables in the same memory."""
    # (what, the option that sizes it, bytes) one process holds at once: an epoch's noise table (N x the family's
    # noise_shape(K)), the training images (float32, uint8 and the coins), the test images and noise, a step's output
    # and its gradient.
    k = config.loss.iw_samples
    with torch.device("meta"):  # the family's own noise per image, with no weights allocated
        model = models.build(config)
    per_image, latent = math.prod(model.noise_shape(k)), math.prod(model.noise_shape(1))
    pixels = math.prod(config.model.image_shape)
    need = [("the noise table", "--iw-train-samples" if k > 1 else "--limit-train-samples",
             num_train * per_image * FLOAT),
            ("the training images", "--limit-train-samples",
             num_train * pixels * (FLOAT + 1 + (2 if config.data.binarize == "dynamic" else 0))),
            ("the test images", "--limit-eval-samples", num_valid * (pixels * (FLOAT + 1) + latent * FLOAT)),
            ("a step's output", "--batch-size", 2 * config.data.batch_size * k * pixels * FLOAT)]
    share = 1 if device.type == "cuda" else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    total, free = sum(n for _, _, n in need) * share, available_memory(device)
    if total > free:
        what, option, biggest = max(need, key=lambda item: item[2])
        per = f" for its {share} processes on this machine" if share > 1 else ""
        raise ConfigError(f"the run needs about {total / 1e9:.1f} GB of {'GPU ' if device.type == 'cuda' else ''}memory"
                          f"{per} ({biggest * share / 1e9:.1f} GB for {what}), but {free / 1e9:.1f} GB is available: "
                          f"lower {option}")
