"""The learning rate and the KL weight as pure functions of the position (``epoch`` finished epochs, then batch
``batch``), not of the global step, whose size depends on the process count: no saved state for bit-exact resume."""

from __future__ import annotations

import math
from typing import Optional

from vae_dist.config import LossConfig, OptimizerConfig


def burda_factor(epoch: float) -> float:
    """Burda et al. (2015), section 5: 3^i epochs at rate 0.001 * 10^(-i/7), i = 0..7 (0.001: --learning-rate).
    Stage i ends after 3^0 + ... + 3^i = (3^(i+1) - 1) / 2 epochs."""
    stage = next((i for i in range(8) if epoch < (3 ** (i + 1) - 1) / 2), 7)
    return 10 ** (-stage / 7)


def learning_rate(cfg: OptimizerConfig, epoch: int, batch: int, steps_per_epoch: int, epochs: int) -> Optional[float]:
    """The rate of step ``batch`` of epoch ``epoch + 1`` of ``epochs``; None for a constant schedule (the
    optimizer's own). Cosine warms up to the rate of the step's end and decays from that of its start."""
    if cfg.schedule == "constant":
        return None
    # In integer steps of this run: exact, so one process count computes the same floats as another.
    step, total = epoch * steps_per_epoch + batch, epochs * steps_per_epoch
    if cfg.schedule == "burda":
        return cfg.learning_rate * burda_factor(step / steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:  # at most the peak: a warm-up shorter than a step is none, not a rate of peak / warm-up
        return cfg.learning_rate * min(1.0, (step + 1) / warmup)
    progress = (step - warmup) / max(1.0, total - warmup)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def kl_weight(cfg: LossConfig, epoch: int, batch: int, steps_per_epoch: int) -> float:
    """A linear warm-up from 0 to kl_weight over kl_warmup_epochs."""
    warmup = cfg.kl_warmup_epochs * steps_per_epoch
    return cfg.kl_weight * min(1.0, (epoch * steps_per_epoch + batch) / warmup) if warmup > 0 else cfg.kl_weight
