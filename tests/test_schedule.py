"""The learning-rate schedules and the KL warm-up, as functions of the optimizer step."""

from __future__ import annotations

import pytest

from vae_dist.config import LossConfig, OptimizerConfig
from vae_dist.schedule import burda_factor, kl_weight, learning_rate


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_epochs=1.0)
    rates = [learning_rate(cfg, s, 10, 100) for s in range(100)]
    assert rates[:10] == sorted(rates[:10]) and rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[10:] == sorted(rates[10:], reverse=True) and rates[-1] < 1e-6
    assert learning_rate(OptimizerConfig(schedule="constant"), 5, 10, 100) is None  # constant: the optimizer's own


def test_burda_schedule_stages():
    # 3^i epochs at 10^(-i/7), i = 0..7, then the last rate for ever.
    assert [burda_factor(e) for e in (0, 0.99)] == [1.0, 1.0]
    assert burda_factor(1) == pytest.approx(10 ** (-1 / 7)) and burda_factor(3.9) == pytest.approx(10 ** (-1 / 7))
    assert burda_factor(4) == pytest.approx(10 ** (-2 / 7))
    assert burda_factor(3279.9) == pytest.approx(0.1) and burda_factor(10_000) == pytest.approx(0.1)
    assert learning_rate(OptimizerConfig(learning_rate=1e-3, schedule="burda"), 40, 10, 100) == pytest.approx(
        1e-3 * 10 ** (-2 / 7))


def test_kl_warm_up_ramps_linearly_to_the_weight():
    cfg = LossConfig(kl_weight=0.5, kl_warmup_epochs=2.0)
    assert [kl_weight(cfg, s, 10) for s in (0, 5, 10, 20, 35)] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert kl_weight(LossConfig(kl_weight=0.5, kl_warmup_epochs=0.0), 0, 10) == 0.5
    # The importance-weighted bound trains unweighted from the first step.
    assert kl_weight(LossConfig(iw_samples=5), 0, 10) == 1.0
