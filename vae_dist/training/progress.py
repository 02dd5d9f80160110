"""What a run shows: a live bar on a terminal, else a line every few seconds (a log file under SLURM, CI or
nohup would fill with redrawn bars); and the end-of-run summary table."""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from vae_dist.run.fileio import print_err


class Progress:
    def __init__(self, desc: str, total: int, initial: int, enabled: bool, line_every: float = 30.0):
        self.desc, self.total, self.done, self.initial = desc, total, initial, initial
        self.enabled, self.line_every, self.postfix = enabled, line_every, ""
        self.started = self.last_line = time.perf_counter()
        try:  # a stream that is not there, or closed, is no terminal
            live = enabled and bool(sys.stderr.isatty())
        except (AttributeError, ValueError, OSError):
            live = False
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False) if live else None

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (self.done == self.initial + 1  # the first step too: training is under way
                               or time.perf_counter() - self.last_line >= self.line_every):
            self.last_line = time.perf_counter()
            left = (self.last_line - self.started) / (self.done - self.initial) * (self.total - self.done)
            print_err(f"{self.desc}: {self.done}/{self.total}{self.postfix}, {left:,.0f} s left")

    def report(self, loss: float, samples_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.2f}", samples_s=f"{samples_per_second:,.0f}")
        self.postfix = f", loss {loss:.2f}, {samples_per_second:,.0f} samples/s"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_summary(history: list[dict[str, Any]], terms: Sequence[str]) -> str:
    """A table, one row per epoch and one column per train/ and valid/ loss term; in each column the
    best (lowest) value is marked '*' and the worst '!'."""
    if not history:
        return "no epochs completed"
    keys = [k for k in (f"{s}/{t}" for s in ("train", "valid") for t in terms) if any(k in row for row in history)]
    marks: dict[tuple[int, str], str] = {}
    for key in keys:
        vals = [(row[key], i) for i, row in enumerate(history) if key in row]
        if len(vals) > 1:
            marks[(min(vals)[1], key)], marks[(max(vals)[1], key)] = "*", "!"
    header = ["epoch", "step", *keys]
    rows = [[str(row.get("epoch", i + 1)), str(row.get("step", "")),
             *(f"{row[k]:.3f}{marks.get((i, k), ' ')}" if k in row else "-" for k in keys)]
            for i, row in enumerate(history)]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |" for cells in [header] + rows]
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join(["Summary (nats per image; * best, ! worst)", lines[0], sep, *lines[1:]])
