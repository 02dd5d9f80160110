"""The learning rate and the KL weight, as pure functions of the optimizer step.

Being functions of the step alone, they need no state of their own: a resumed run
computes the same values at the same step, so bit-exact resume holds without saving a
scheduler.
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


def learning_rate(cfg: OptimizerConfig, step: int, steps_per_epoch: int, total_steps: int) -> Optional[float]:
    """The rate for optimizer step ``step`` (0-based), or None for a constant schedule
    (the optimizer keeps the rate it was built with)."""
    if cfg.schedule == "constant":
        return None
    epoch = step / steps_per_epoch
    if cfg.schedule == "burda":
        return cfg.learning_rate * burda_factor(epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1.0, total_steps - warmup)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def kl_weight(cfg: LossConfig, step: int, steps_per_epoch: int) -> float:
    """The KL weight at ``step``: linear warm-up from 0 to kl_weight over kl_warmup_epochs."""
    if cfg.kl_warmup_epochs <= 0:
        return cfg.kl_weight
    return cfg.kl_weight * min(1.0, step / (cfg.kl_warmup_epochs * steps_per_epoch))
