"""No rank left hanging: a stop signal as a request every rank honours together (SIGTERM, SIGINT, SIGHUP), and work
the main process does alone shared with every rank, its error included, so none waits at a barrier for a failed one."""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from vae_dist import errors
from vae_dist.run.fileio import print_out

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # a rank that only learned of a stop from the others carries 0
        return f"signal {signum}"


class Preempted(Exception):
    """Raised on every rank once the run is checkpointed for a stop request. ``finished``: the stop came
    after training; ``checkpoint`` is then the complete model file, and there is nothing to resume."""

    def __init__(self, signum: int, checkpoint: str = "", finished: bool = False):
        super().__init__(signum, checkpoint, finished)  # all of them: it is pickled between ranks (on_main_then_share)
        self.signum, self.checkpoint, self.finished = signum, checkpoint, finished

    def __str__(self) -> str:  # the one line the CLI prints for it (on rank 0)
        name = signal_name(self.signum)
        if self.finished:
            return f"stopped by {name} after training finished; {self.checkpoint} is complete, nothing to resume."
        return f"stopped by {name}; checkpoint {self.checkpoint} is complete. Continue with the same command plus " \
               "--resume."

    line = property(lambda self: str(self))


class StoppedBeforeStart(Preempted):
    """A stop during the set-up: nothing was trained or checkpointed; raised at once, on the rank that got it."""

    def __str__(self) -> str:
        return (f"stopped by {signal_name(self.signum)} before the first training step; nothing was trained: "
                "run the same command again to start.")


class StopRequest:
    """While entered, STOP_SIGNALS set ``signum`` (or raise StoppedBeforeStart while ``at_once``); the loop
    checkpoints after its step and the CLI exits 128 + the signal. A second SIGINT stops at once."""

    def __init__(self, *, at_once: bool = False) -> None:
        self.signum: Optional[int] = None
        self.at_once = at_once
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.at_once:
            raise StoppedBeforeStart(signum)
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        # Handlers can only be installed from the main thread: elsewhere (a notebook's worker) no stop request.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[StopRequest]:
        """From here a stop is a request the loop honours after its step; the previous handlers are back after."""
        self.at_once = False
        try:
            yield self
        finally:
            self.__exit__()


def on_main_then_share(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only; every rank returns its result or raises its error, the others as
    ``as_seen_by_the_others`` (unlike Accelerate's ``main_process_first``, whose barrier they would wait at forever)."""
    result: Any = None
    caught: BaseException | None = None
    error: errors.VaeDistError | Preempted | None = None
    if accelerator.is_main_process:
        try:
            result = fn()
        except BaseException as e:  # also KeyboardInterrupt: the others must not wait for it
            caught, error = e, as_seen_by_the_others(e)
    if accelerator.num_processes > 1:
        result, error = broadcast_object_list([result, error], from_process=0)
    if caught is not None or error is not None:
        raise caught or error  # type: ignore[misc]
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
    return max_over_ranks(accelerator, int(flag)) > 0


def max_over_ranks(accelerator: Accelerator, value: int) -> int:
    """The largest of every rank's ``value``, on every rank (one tiny all-reduce; none on one process)."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor([float(value)], device=accelerator.device), reduction="max").item())


def main_print(accelerator: Accelerator) -> Callable[[str], None]:
    """print on the global main process only (``accelerator.print`` prints once per machine)."""
    return lambda message: print_out(message, required=False) if accelerator.is_main_process else None


def lost_process(e: BaseException) -> bool:
    """Whether ``e`` is a collective or the store failing because another process of the run died or cannot
    be reached: torch's DistError types, or gloo's RuntimeError naming its transport ("gloo/transport/...")."""
    return isinstance(e, (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError)) or \
        isinstance(e, RuntimeError) and "gloo/transport/" in str(e)


def lost_process_line(e: BaseException) -> str:
    """The one line for a ``lost_process`` error: what happened, its cause, what to do."""
    cause = re.sub(r"^\[[^\]]*\]\s*", "", errors.first_line(e))  # gloo's "[file.cc:561] " prefix
    cause = cause.split(". ")[0].rstrip(".")  # before gloo's and NCCL's generic advice
    return (f"another process of this run stopped or cannot be reached ({cause}); start the run again on every "
            "process, with --resume to continue from its last checkpoint")
