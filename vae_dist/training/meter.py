"""The running sums of one epoch's training metrics, kept on the device.

A step adds its sums with one in-place add and never waits for the host: the interval
loss is a difference of snapshots taken when a report is due, the sample count is kept
in Python, and the losses still to be checked for non-finite values are kept until the
next report. Reductions across ranks are the Learner's (they are collectives).
"""

from __future__ import annotations

import time
from typing import Optional

import torch


class TrainMeter:
    def __init__(self, device: torch.device, terms: int):
        self.device = device
        self.sums = torch.zeros(terms, dtype=torch.float64, device=device)  # the family's terms, the objective first
        self.count = 0.0  # this rank's images this epoch
        self.samples = 0  # images seen by all ranks since the epoch (or the resumed part) began
        self.started = time.perf_counter()
        self._mark = (self.sums.clone(), self.count)  # start of the current logging interval
        self._unchecked: list[tuple[int, torch.Tensor]] = []  # (global step, loss) not yet checked

    def start_epoch(self, carried: Optional[list[float]] = None) -> None:
        """Zero the sums, or start from a resumed partial epoch's [*terms, count]."""
        self.sums.zero_()
        self.count = 0.0
        if carried is not None:
            self.sums += torch.tensor(carried[:-1], dtype=torch.float64, device=self.device)
            self.count = carried[-1]
        self.samples = 0
        self.started = time.perf_counter()
        self._mark = (self.sums.clone(), self.count)

    def add(self, step_sums: torch.Tensor, loss: torch.Tensor, images: int, world: int, step: int) -> None:
        self.sums += step_sums
        self.count += images
        self.samples += images * world
        self._unchecked.append((step, loss))

    def take_interval(self) -> torch.Tensor:
        """[objective sum, images] since the previous take, this rank; starts a new interval."""
        objective, count = self._mark
        out = torch.stack([self.sums[0] - objective[0], torch.full_like(objective[0], self.count - count)])
        self._mark = (self.sums.clone(), self.count)
        return out

    def totals(self) -> torch.Tensor:
        """[*terms, count] of this rank's epoch so far."""
        return torch.cat([self.sums, torch.tensor([self.count], dtype=torch.float64, device=self.device)])

    def first_nonfinite_step(self) -> torch.Tensor:
        """(1,) the first global step since the last call whose loss was not finite, else -1."""
        pending, self._unchecked = self._unchecked, []
        first = torch.full((1,), -1, dtype=torch.long, device=self.device)
        if pending:
            steps = torch.tensor([s for s, _ in pending], device=self.device)
            bad = ~torch.isfinite(torch.stack([loss for _, loss in pending]))
            first = torch.where(bad.any(), steps[bad.int().argmax()], first)
        return first

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def samples_per_second(self) -> float:
        s = self.seconds()
        return self.samples / s if s > 0 else 0.0
