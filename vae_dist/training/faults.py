"""Test hooks that inject faults at chosen steps; the loop consults them only when a variable is set."""

from __future__ import annotations

import os
import signal
from typing import Iterable, Iterator

import torch

# "R:S" raises on rank R before global step S; "R:S:kill" SIGKILLs that rank there; "R:S:term" sends it
# SIGTERM there and goes on (a stop request that reaches one rank).
FAIL_HOOK_ENV = "VAE_DIST_TEST_FAIL_AT"
# "N" multiplies the batch of the N-th optimizer step (1-based) by NaN on every rank.
NAN_HOOK_ENV = "VAE_DIST_TEST_NAN_AT"


def active() -> bool:
    return bool(os.environ.get(FAIL_HOOK_ENV) or os.environ.get(NAN_HOOK_ENV))


def inject(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], rank: int,
           first_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` with the configured faults; ``first_step``: the global step count before the first."""
    fail, nan_at = os.environ.get(FAIL_HOOK_ENV, ""), os.environ.get(NAN_HOOK_ENV, "")
    fail_rank, fail_step, *kind = fail.split(":") if fail else ("-1", "-1")
    for step, (images, index) in enumerate(batches, start=first_step):
        if int(fail_rank) == rank and int(fail_step) == step:
            if kind in (["kill"], ["term"]):
                os.kill(os.getpid(), signal.SIGKILL if kind == ["kill"] else signal.SIGTERM)
            else:
                raise RuntimeError(f"test fault injected on rank {rank} at step {step}")
        if nan_at == str(step + 1):
            images = images * float("nan")
        yield images, index
