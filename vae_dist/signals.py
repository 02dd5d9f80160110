"""Preemption: turn SIGTERM/SIGINT into a request to stop after the current step.

The train loop polls ``requested``; the Learner then checkpoints and exits. A second
SIGINT raises KeyboardInterrupt at once, for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional


class Preempted(Exception):
    """Raised after the run was checkpointed because a stop was requested."""

    def __init__(self, signum: int, checkpoint: str):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at {checkpoint}")


class StopRequest:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        # Signal handlers can only be installed from the main thread (e.g. not in a
        # notebook worker thread); there the run simply is not preemptible.
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
