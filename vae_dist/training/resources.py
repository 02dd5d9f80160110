"""What a run needs of the machine, checked before the artifact folder is touched: the
memory its tables take (a K-sample noise table can be tens of GB) and, for --compile, a
compiler. Either found missing at step 1 would cost a previous run to --overwrite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from vae_dist.config import TrainingConfig, options
from vae_dist.errors import ConfigError

PIXELS = 28 * 28
FLOAT = 4  # bytes of a float32
# A compiler that does not answer `--version` in this long does not work.
COMPILER_TIMEOUT_S = 30


def _flag(dotted: str) -> str:
    return next(o.flag for o in options() if o.dotted == dotted)


def memory_needed(config: TrainingConfig, num_train: int, num_valid: int) -> list[tuple[str, str, int]]:
    """(what, the option that sizes it, bytes) for what one process holds at once: each
    epoch's noise table (N x K x latent float32), the training images (float32 beside the
    uint8 they come from, and the binarization coins), the validation images and noise,
    and a step's decoder output with its gradient (batch x K images)."""
    k, latent = config.loss.iw_samples, config.model.latent_size or 0
    images = num_train * PIXELS * (FLOAT + 1 + (2 if config.data.binarize == "dynamic" else 0))
    return [
        ("the noise table", _flag("loss.iw_samples") if k > 1 else _flag("data.limit_train_samples"),
         num_train * k * latent * FLOAT),
        ("the training images", _flag("data.limit_train_samples"), images),
        ("the test images", "--limit-eval-samples", num_valid * (PIXELS * (FLOAT + 1) + latent * FLOAT)),
        ("a step's output", _flag("data.batch_size"), 2 * config.data.batch_size * k * PIXELS * FLOAT),
    ]


def host_memory_available() -> int:
    """Bytes this process may still allocate: the machine's available memory, or less
    under a cgroup (a container, a SLURM job) that caps it."""
    import psutil  # an Accelerate dependency

    free = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read
    return free


def available_memory(device: torch.device) -> int:
    """Bytes free where the tables live: the GPU's memory on CUDA, else the host's."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_memory_available()


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_memory(config: TrainingConfig, num_train: int, num_valid: int, device: torch.device,
                 local_processes: int = 1) -> None:
    """ConfigError naming the option to lower when the run will not fit in memory. On the
    CPU every process of this machine holds its own tables; on a GPU each has its own."""
    need = memory_needed(config, num_train, num_valid)
    share = 1 if device.type == "cuda" else max(1, local_processes)
    total = sum(n for _, _, n in need) * share
    free = available_memory(device)
    if total > free:
        what, option, biggest = max(need, key=lambda item: item[2])
        where = "GPU memory" if device.type == "cuda" else "memory"
        per = f" for its {share} processes on this machine" if share > 1 else ""
        raise ConfigError(
            f"the run needs about {_gb(total)} of {where}{per} ({_gb(biggest * share)} for {what}), "
            f"but {_gb(free)} is available: lower {option}"
        )


def _answers(compiler: str) -> bool:
    try:
        subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=COMPILER_TIMEOUT_S)
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def check_compiler(device: torch.device) -> None:
    """--compile needs what inductor will call at the first step: its C++ compiler on the
    CPU (found the way inductor finds it: $CXX, else g++), triton and a C compiler on a GPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("--compile on a GPU needs triton (pip install triton), which is not usable here")
        cc: Optional[str] = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")  # triton's search
        if cc is None or not _answers(cc):
            raise ConfigError(f"--compile on a GPU needs a C compiler for triton ({cc or 'gcc or clang'} not found or "
                              "not working); set CC or install one, or drop --compile")
        return
    from torch._inductor import config as inductor_config

    tried = [c for c in inductor_config.cpp.cxx if c]  # None: a conda download, only when asked for
    if not any(_answers(c) for c in tried):
        raise ConfigError(f"--compile on the CPU needs a C++ compiler ({', '.join(tried)} not found or not working); "
                          "set CXX or install g++, or drop --compile")


def check_resources(config: TrainingConfig, num_train: int, num_valid: int, device: torch.device) -> None:
    """Everything the machine must provide, before the run touches its folder."""
    check_memory(config, num_train, num_valid, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if config.compile:
        check_compiler(device)
