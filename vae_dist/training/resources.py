"""Memory for the tables a config asks for, checked before the run starts: a K-sample noise
table can be tens of GB, and the one line names the option to lower and both sizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil  # an Accelerate dependency
import torch

from vae_dist.config import TrainingConfig, options
from vae_dist.errors import ConfigError

PIXELS = 28 * 28
FLOAT = 4  # bytes of a float32


def _flag(dotted: str) -> str:
    return next(o.flag for o in options() if o.dotted == dotted)


def memory_needed(config: TrainingConfig, num_train: int, num_valid: int) -> list[tuple[str, str, int]]:
    """(what, the option that sizes it, bytes) for what one process holds at once: each
    epoch's noise table (N x K x latent), the training images (float32 beside their uint8,
    and the binarization coins), the test images and noise, and a step's decoder output
    with its gradient (batch x K images)."""
    k, latent = config.loss.iw_samples, config.model.latent_size or 0
    images = num_train * PIXELS * (FLOAT + 1 + (2 if config.data.binarize == "dynamic" else 0))
    return [
        ("the noise table", _flag("loss.iw_samples") if k > 1 else _flag("data.limit_train_samples"),
         num_train * k * latent * FLOAT),
        ("the training images", _flag("data.limit_train_samples"), images),
        ("the test images", "--limit-eval-samples", num_valid * (PIXELS * (FLOAT + 1) + latent * FLOAT)),
        ("a step's output", _flag("data.batch_size"), 2 * config.data.batch_size * k * PIXELS * FLOAT),
    ]


def available_memory(device: torch.device) -> int:
    """Bytes free where the tables live: the GPU's memory on CUDA, else the host's, or less
    under a cgroup v2 limit (a container, a SLURM job)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free, cgroup = psutil.virtual_memory().available, Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def check_memory(config: TrainingConfig, num_train: int, num_valid: int, device: torch.device,
                 local_processes: int = 1) -> None:
    """ConfigError naming the option to lower when the run will not fit. On the CPU every
    process of this machine holds its own tables in the same memory."""
    need = memory_needed(config, num_train, num_valid)
    share = 1 if device.type == "cuda" else max(1, local_processes)
    total, free = sum(n for _, _, n in need) * share, available_memory(device)
    if total > free:
        what, option, biggest = max(need, key=lambda item: item[2])
        per = f" for its {share} processes on this machine" if share > 1 else ""
        raise ConfigError(
            f"the run needs about {total / 1e9:.1f} GB of {'GPU ' if device.type == 'cuda' else ''}memory{per} "
            f"({biggest * share / 1e9:.1f} GB for {what}), but {free / 1e9:.1f} GB is available: lower {option}"
        )


def check_resources(config: TrainingConfig, num_train: int, num_valid: int, device: torch.device) -> None:
    check_memory(config, num_train, num_valid, device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
