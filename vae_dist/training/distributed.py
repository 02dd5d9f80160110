"""Collective helpers that keep every rank moving together: work the main process does alone ends with
every rank knowing its outcome, error included, so none waits at a barrier for a main process that failed.
"""

from __future__ import annotations

import re
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from vae_dist import errors
from vae_dist.run.fileio import print_out
from vae_dist.training.signals import Preempted

T = TypeVar("T")


def on_main_then_share(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only; every rank returns its result or raises its error (unlike
    Accelerate's ``main_process_first``, whose barrier the others would wait at forever). The main process
    re-raises its own exception; the others raise ``as_seen_by_the_others`` of it."""
    result: Any = None
    caught: BaseException | None = None
    error: errors.VaeDistError | Preempted | None = None
    if accelerator.is_main_process:
        try:
            result = fn()
        except BaseException as e:  # also KeyboardInterrupt: the others must not wait for it
            caught, error = e, as_seen_by_the_others(e)
    if accelerator.num_processes > 1:
        payload = [result, error]
        broadcast_object_list(payload, from_process=0)
        result, error = payload
    if caught is not None:
        raise caught
    if error is not None:
        raise error
    return result


def as_seen_by_the_others(e: BaseException) -> errors.VaeDistError | Preempted:
    """A user error as a fresh one of its type (only its message travels), a stop as the same stop (every
    rank ends with its exit status), anything else as a MainProcessError."""
    if isinstance(e, Preempted):
        return e
    if isinstance(e, errors.VaeDistError):
        return type(e)(str(e))
    first = errors.first_line(e)
    return errors.MainProcessError(f"the main process failed ({type(e).__name__}{': ' + first if first else ''})")


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    return max_over_ranks(accelerator, int(flag)) > 0


def max_over_ranks(accelerator: Accelerator, value: int) -> int:
    """The largest of every rank's ``value``, on every rank (one tiny all-reduce; none on one process)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], device=accelerator.device)
    return int(accelerator.reduce(t, reduction="max").item())


def main_print(accelerator: Accelerator) -> Callable[[str], None]:
    """print on the global main process only (``accelerator.print`` prints once per machine)."""
    def say(message: str) -> None:
        if accelerator.is_main_process:
            print_out(message, required=False)
    return say


def lost_process(e: BaseException) -> bool:
    """Whether ``e`` is a collective or the store failing because another process of the run died or cannot
    be reached: torch's DistError types, or gloo's RuntimeError naming its transport ("gloo/transport/...")."""
    if isinstance(e, (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(e, RuntimeError) and "gloo/transport/" in str(e)


def lost_process_line(e: BaseException) -> str:
    """The one line for a ``lost_process`` error: what happened, its cause, what to do."""
    cause = re.sub(r"^\[[^\]]*\]\s*", "", errors.first_line(e))  # gloo's "[file.cc:561] " prefix
    cause = cause.split(". ")[0].rstrip(".")  # before gloo's and NCCL's generic advice
    return (f"another process of this run stopped or cannot be reached ({cause}); start the run again on every "
            "process, with --resume to continue from its last checkpoint")
