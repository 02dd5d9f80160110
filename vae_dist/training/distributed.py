"""No rank left hanging: stop signals as a request every rank honours together, work the main process does alone
shared with every rank (its error included), and the processes' meeting bounded in time, as the launcher set it."""

from __future__ import annotations

import os
import re
import signal
import threading
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env

from vae_dist import errors
from vae_dist.run.fileio import print_err, print_out

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # the wait for the others, and any collective (not torch's 30 minutes)
# The ACCELERATE_* settings followed: `accelerate launch`'s --cpu, --mixed_precision (checked by the trainer), --debug,
# --enable_cpu_affinity, log output, and how --compile compiles. Any other (gradient accumulation, DeepSpeed, FSDP, a
# dynamo backend without --compile, ...) would change the run behind config.json's back: refused unless off.
FOLLOWED_ENV = ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DEBUG_MODE", "ACCELERATE_CPU_AFFINITY",
                "ACCELERATE_LOG_LEVEL", "ACCELERATE_ENABLE_RICH", "ACCELERATE_DYNAMO_MODE",
                "ACCELERATE_DYNAMO_USE_FULLGRAPH", "ACCELERATE_DYNAMO_USE_DYNAMIC")
OFF_VALUES = ("", "no", "false", "default")  # the launcher always exports some (ACCELERATE_DYNAMO_BACKEND=NO, ...)


class Preempted(Exception):
    """Raised on every rank once the run is checkpointed for a stop request. ``finished``: the stop came
    after training; ``checkpoint`` is then the complete model file, and there is nothing to resume.
    No ``checkpoint``: a stop during the set-up, raised at once on the rank that got it; nothing was trained."""

    def __init__(self, signum: int, checkpoint: str = "", finished: bool = False):
        super().__init__(signum, checkpoint, finished)  # all of them: it is pickled between ranks (on_main_then_share)
        self.signum, self.checkpoint, self.finished = signum, checkpoint, finished

    def __str__(self) -> str:  # the one line the CLI prints for it (on rank 0)
        try:
            name = signal.Signals(self.signum).name
        except ValueError:  # a rank that only learned of a stop from the others carries 0
            name = f"signal {self.signum}"
        if not self.checkpoint:
            return f"stopped by {name} before the first training step; nothing was trained: run the same command " \
                   "again to start."
        if self.finished:
            return f"stopped by {name} after training finished; {self.checkpoint} is complete, nothing to resume."
        return f"stopped by {name}; checkpoint {self.checkpoint} is complete. Continue with the same command plus " \
               "--resume."


class StopRequest:
    """While entered, STOP_SIGNALS set ``signum`` (or raise Preempted while ``at_once``); the loop
    checkpoints after its step and the CLI exits 128 + the signal. A second SIGINT stops at once."""

    def __init__(self, *, at_once: bool = False) -> None:
        self.signum: Optional[int] = None
        self.at_once = at_once
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.at_once:
            raise Preempted(signum)
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


def lost_process_line(e: BaseException) -> Optional[str]:
    """The one line for a collective or the store failing because another process of the run died or cannot be
    reached (torch's DistError types, or gloo's RuntimeError naming its transport); None for any other error."""
    if not (isinstance(e, (dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError))
            or isinstance(e, RuntimeError) and "gloo/transport/" in str(e)):
        return None
    cause = re.sub(r"^\[[^\]]*\]\s*", "", errors.first_line(e))  # gloo's "[file.cc:561] " prefix
    cause = cause.split(". ")[0].rstrip(".")  # before gloo's and NCCL's generic advice
    return (f"another process of this run stopped or cannot be reached ({cause}); start the run again on every "
            "process, with --resume to continue from its last checkpoint")


def launch_env() -> tuple[int, int]:
    """(rank, number of processes) as the launcher set them, checked, with any ACCELERATE_* setting vae_dist does not
    implement refused. RANK counts only with WORLD_SIZE > 1, as for Accelerate: a stray RANK=1 in a one-process
    command does not make it a silent non-main process."""
    for name, value in sorted(os.environ.items()):
        if name.startswith("ACCELERATE_") and name not in FOLLOWED_ENV and value.strip().lower() not in OFF_VALUES:
            raise errors.ConfigError(f"{name}={value}: vae_dist does not implement this Accelerate setting (it runs "
                                     "plain DDP or CPU processes); unset it")
    rank, world = os.environ.get("RANK") or "0", os.environ.get("WORLD_SIZE") or "1"
    if not (rank.isdigit() and world.isdigit() and int(world) > 0):
        raise errors.ConfigError(f"RANK={rank} and WORLD_SIZE={world} must be whole numbers, WORLD_SIZE at least 1")
    if int(world) > 1 and int(rank) >= int(world):
        raise errors.ConfigError(f"RANK={rank} is not below WORLD_SIZE={world}")
    return (int(rank) if int(world) > 1 else 0), int(world)


def join_processes(cpu: bool) -> None:
    """Set up Accelerate's process state; with WORLD_SIZE > 1 meet the other processes first, saying where (once
    per machine) and waiting at most COLLECTIVE_TIMEOUT, also the bound of every later collective."""
    rank, world = launch_env()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    minutes = f"{COLLECTIVE_TIMEOUT.total_seconds() / 60:g} minutes"
    if world > 1 and not dist.is_initialized() and os.environ.get("LOCAL_RANK", "0") == "0":
        print_err(f"rank {rank}: waiting for the {world} processes of this run to meet at {where} (at most {minutes})")
    try:
        # Here, not through the Accelerator's InitProcessGroupKwargs, which passes on only what differs from its
        # defaults: a timeout of NCCL's 10 minutes was dropped, and gloo waited torch's 30.
        PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=COLLECTIVE_TIMEOUT)
    except RuntimeError as e:
        if lost_process_line(e) is None:
            raise
        raise errors.VaeDistError(f"rank {rank}: the {world} processes of this run did not all meet at {where} "
                                  f"({errors.first_line(e).rstrip('.')}); start each of them within {minutes} of the "
                                  "first, or unset WORLD_SIZE to run one process") from None
