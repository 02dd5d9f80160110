"""Progress of a long loop (an epoch, an evaluation): a live bar on a terminal, a line every
few seconds elsewhere.

Under SLURM, CI or nohup, stderr is a file: a bar redrawn with carriage returns on every
step fills it with noise, so there progress is a plain line at a fixed interval, as
Lightning and the HF Trainer do.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from tqdm.auto import tqdm

from vae_dist.run.fileio import print_err

# Seconds between progress lines when stderr is not a terminal.
LINE_EVERY_SECONDS = 30.0


class Progress:
    def __init__(self, desc: str, total: int, initial: int, enabled: bool, line_every: float = LINE_EVERY_SECONDS):
        self.desc, self.total, self.done, self.initial = desc, total, initial, initial
        self.enabled = enabled
        self.line_every = line_every
        self.postfix = ""
        self.started = self.last_line = time.perf_counter()
        live = enabled and _is_terminal(sys.stderr)
        self.bar: Optional[Any] = (
            tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False) if live else None
        )

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (self.done == self.initial + 1 or time.perf_counter() - self.last_line >= self.line_every):
            # The first step too: a log then shows at once that training is under way.
            self.last_line = time.perf_counter()
            print_err(f"{self.desc}: {self.done}/{self.total}{self.postfix}{self._eta()}")

    def _eta(self) -> str:
        done_here = self.done - self.initial
        if done_here <= 0:
            return ""
        left = (time.perf_counter() - self.started) / done_here * (self.total - self.done)
        return f", {left:,.0f} s left"

    def report(self, loss: float, samples_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.2f}", samples_s=f"{samples_per_second:,.0f}")
        self.postfix = f", loss {loss:.2f}, {samples_per_second:,.0f} samples/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream: object) -> bool:
    """False for a stream that is not there, or closed: a bar needs a terminal."""
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError):
        return False
