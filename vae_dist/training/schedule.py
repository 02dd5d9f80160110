"""The learning rate and the KL weight, as pure functions of the training progress.

Progress is counted in epochs: a step is batch ``batch`` (0-based) of the epoch after
``epoch`` finished ones, in a run of ``steps_per_epoch`` steps per epoch, i.e. it runs
from ``epoch + batch / steps_per_epoch`` epochs to one step later. Not the global step:
after a resume at an epoch end with another process count, the steps already taken were
of another size, and a schedule of the global step would then end elsewhere than at its
last epoch. Being functions of the position alone, the schedules need no state of their
own: a resumed run computes the same values at the same position, so bit-exact resume
holds without saving a scheduler.
"""

from __future__ import annotations

import math
from typing import Optional

from vae_dist.config import LossConfig, OptimizerConfig

# Burda et al. (2015), section 5: "3^i epochs with learning rate 0.001 * 10^(-i/7), i = 0..7"
# (3,280 epochs in all). The base rate is --learning-rate.
BURDA_STAGES = 8


def burda_factor(epoch: float) -> float:
    start = 0
    for i in range(BURDA_STAGES):
        start += 3**i
        if epoch < start:
            return 10 ** (-i / 7)
    return 10 ** (-(BURDA_STAGES - 1) / 7)


def learning_rate(cfg: OptimizerConfig, epoch: int, batch: int, steps_per_epoch: int, epochs: int) -> Optional[float]:
    """The rate of the step ``batch`` of epoch ``epoch + 1`` in a run of ``epochs`` epochs,
    or None for a constant schedule (the optimizer keeps the rate it was built with).

    Cosine: the warm-up rate is the one of the step's end (the first step is not wasted
    at rate 0) and the decay the one of its start (nor is the last one: it ends at ~0)."""
    if cfg.schedule == "constant":
        return None
    # In this run's steps (integers: exact), so that a run at one process count computes
    # the very floats it did when the schedule read the global step.
    step, total = epoch * steps_per_epoch + batch, epochs * steps_per_epoch
    if cfg.schedule == "burda":
        return cfg.learning_rate * burda_factor(step / steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1.0, total - warmup)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def kl_weight(cfg: LossConfig, epoch: int, batch: int, steps_per_epoch: int) -> float:
    """The KL weight at ``epoch + batch / steps_per_epoch`` epochs: a linear warm-up from 0
    to kl_weight over kl_warmup_epochs."""
    if cfg.kl_warmup_epochs <= 0:
        return cfg.kl_weight
    step = epoch * steps_per_epoch + batch
    return cfg.kl_weight * min(1.0, step / (cfg.kl_warmup_epochs * steps_per_epoch))
