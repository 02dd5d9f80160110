"""SIGTERM, SIGINT and SIGHUP as a request to stop after the current step (the Learner checkpoints, then
exits 128 + the signal); a second SIGINT stops at once; before the first step (``at_once``) a stop ends the run.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; a number that names no signal is still printable."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Preempted(Exception):
    """Raised on every rank once the run is checkpointed for a stop request. ``finished``: the stop came
    after training; ``checkpoint`` is then the complete model file, and there is nothing to resume."""

    def __init__(self, signum: int, checkpoint: str = "", finished: bool = False):
        super().__init__(signum, checkpoint, finished)  # all of them: it is pickled between ranks (on_main_then_share)
        self.signum, self.checkpoint, self.finished = signum, checkpoint, finished

    def __str__(self) -> str:
        return self.line

    @property
    def line(self) -> str:
        """The one line the CLI prints for it (on rank 0)."""
        name = signal_name(self.signum)
        if self.finished:
            return f"stopped by {name} after training finished; {self.checkpoint} is complete, nothing to resume."
        return f"stopped by {name}; checkpoint {self.checkpoint} is complete. Continue with the same command plus --resume."


class StoppedBeforeStart(Preempted):
    """A stop during the set-up: nothing was trained or checkpointed; raised at once, on the rank that got it."""

    @property
    def line(self) -> str:
        return (f"stopped by {signal_name(self.signum)} before the first training step; nothing was trained: "
                "run the same command again to start.")


class StopRequest:
    """While entered, STOP_SIGNALS set ``signum`` (or raise StoppedBeforeStart while ``at_once``)."""

    def __init__(self, *, at_once: bool = False) -> None:
        self.signum: Optional[int] = None
        self.at_once = at_once
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.at_once:
            raise StoppedBeforeStart(signum)
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self) -> StopRequest:
        # Handlers can only be installed from the main thread: elsewhere (a notebook's worker) no stop request.
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
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
