"""Preemption: turn SIGTERM/SIGINT/SIGHUP into a request to stop after the current step.

The train loop polls ``requested``; the Learner then checkpoints and exits. A second
SIGINT raises KeyboardInterrupt at once, for a user who does not want to wait. SIGHUP (a
closed terminal) is a stop request like SIGTERM. Before the first step there is nothing to
checkpoint: a StopRequest made with ``at_once=True`` raises StoppedBeforeStart from its
handler until ``deferred()`` hands the stop to the loop.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Any, Iterator, Optional


# The signals that ask for a stop after the current step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; a number that names no signal is still printable."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Preempted(Exception):
    """Raised on every rank after the run was checkpointed because a stop was requested.

    ``finished``: the stop came after training ended; ``checkpoint`` is then the exported
    model file, complete, and there is nothing to resume."""

    def __init__(self, signum: int, checkpoint: str, *, finished: bool = False):
        self.signum = signum
        self.checkpoint = checkpoint
        self.finished = finished
        super().__init__(f"stopped by {signal_name(signum)} at {checkpoint}")

    @property
    def line(self) -> str:
        """The one line the CLI prints for it (on rank 0)."""
        name = signal_name(self.signum)
        if self.finished:
            return f"stopped by {name} after training finished; {self.checkpoint} is complete, nothing to resume."
        return f"stopped by {name}; checkpoint {self.checkpoint} is complete. Continue with the same command plus --resume."

    def __reduce__(self) -> Any:
        # It travels from the main process to the others (distributed.on_main_then_share):
        # the default pickling would call __init__ with the message alone.
        return (_rebuild, (type(self), self.signum, self.checkpoint, self.finished))


def _rebuild(cls: type, signum: int, checkpoint: str, finished: bool) -> "Preempted":
    return cls(signum, checkpoint, finished=finished)


class StoppedBeforeStart(Preempted):
    """A stop signal during the set-up (loading data, building, preparing): nothing was
    trained, so nothing is checkpointed; raised at once, on the rank that got it."""

    def __init__(self, signum: int, checkpoint: str = "", *, finished: bool = False):
        super().__init__(signum, checkpoint)

    @property
    def line(self) -> str:
        return f"stopped by {signal_name(self.signum)} before the first training step; nothing was trained: run the same command again to start."


class StopRequest:
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

    def __enter__(self) -> "StopRequest":
        # Signal handlers can only be installed from the main thread (e.g. not in a
        # notebook worker thread); there the run simply is not preemptible.
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator["StopRequest"]:
        """From here a stop is a request that the loop honours after its step; at the end
        of the block the handlers that were there before are back."""
        self.at_once = False
        try:
            yield self
        finally:
            self.__exit__()
