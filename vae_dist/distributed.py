"""Small collective helpers that keep every rank moving together.

The rule they enforce: work that only the main process does (creating folders, a
download, choosing a checkpoint) ends with every rank knowing the outcome, error
included, so no rank is left waiting at a barrier for a main process that has failed.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from vae_dist import errors

T = TypeVar("T")


def on_main_then_share(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only; every rank returns its result or raises its error.

    Accelerate's ``main_process_first`` has no try/finally: if the main process raised
    inside it, the others would wait at its barrier forever. Here the error travels.
    """
    result: Any = None
    error: tuple[str, str] | None = None
    if accelerator.is_main_process:
        try:
            result = fn()
        except errors.VaeDistError as e:
            error = (type(e).__name__, str(e))
    if accelerator.num_processes > 1:
        payload = [result, error]
        broadcast_object_list(payload, from_process=0)
        result, error = payload
    if error is not None:
        cls = getattr(errors, error[0], errors.VaeDistError)
        raise cls(error[1])
    return result


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (one tiny all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def main_print(accelerator: Accelerator) -> Callable[[str], None]:
    """print on the global main process only (``accelerator.print`` prints once per machine)."""

    def say(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    return say
