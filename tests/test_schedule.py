"""The learning-rate schedules and the KL warm-up, as functions of the epochs done."""

from __future__ import annotations

import pytest

from vae_dist.config import LossConfig, OptimizerConfig
from vae_dist.training.schedule import burda_factor, kl_weight, learning_rate


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_epochs=1.0)
    rates = [learning_rate(cfg, e, b, 10, 10) for e in range(10) for b in range(10)]
    assert rates[:10] == sorted(rates[:10]) and rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[10:] == sorted(rates[10:], reverse=True) and 0 < rates[-1] < 1e-6
    # The same progress at another step size (another process count): the same rate.
    assert learning_rate(cfg, 6, 20, 40, 10) == pytest.approx(rates[65], rel=1e-12)
    assert learning_rate(OptimizerConfig(schedule="constant"), 0, 5, 10, 10) is None  # constant: the optimizer's own


def test_burda_schedule_stages():
    # 3^i epochs at 10^(-i/7), i = 0..7, then the last rate for ever.
    assert [burda_factor(e) for e in (0, 0.99)] == [1.0, 1.0]
    assert burda_factor(1) == pytest.approx(10 ** (-1 / 7)) and burda_factor(3.9) == pytest.approx(10 ** (-1 / 7))
    assert burda_factor(4) == pytest.approx(10 ** (-2 / 7))
    assert burda_factor(3279.9) == pytest.approx(0.1) and burda_factor(10_000) == pytest.approx(0.1)
    assert learning_rate(OptimizerConfig(learning_rate=1e-3, schedule="burda"), 4, 0, 10, 10) == pytest.approx(
        1e-3 * 10 ** (-2 / 7))


def test_kl_warm_up_ramps_linearly_to_the_weight():
    cfg = LossConfig(kl_weight=0.5, kl_warmup_epochs=2.0)
    assert [kl_weight(cfg, e, b, 10) for e, b in ((0, 0), (0, 5), (1, 0), (2, 0), (3, 5))] == [0.0, 0.125, 0.25, 0.5, 0.5]
    assert kl_weight(cfg, 1, 2, 4) == kl_weight(cfg, 1, 5, 10) == 0.375  # 1.5 epochs at any step size
    assert kl_weight(LossConfig(kl_weight=0.5, kl_warmup_epochs=0.0), 0, 0, 10) == 0.5
    # The importance-weighted bound trains unweighted from the first step.
    assert kl_weight(LossConfig(iw_samples=5), 0, 0, 10) == 1.0


@pytest.mark.parametrize("warmup_epochs", [1e-30, 1e-3, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0, 1.7, 3.0])
def test_the_rate_never_exceeds_the_peak(warmup_epochs):
    # A short warm-up or few steps per epoch (a large global batch): the warm-up ends within a step.
    for steps_per_epoch in (1, 2, 3, 4, 7, 10, 64):
        cfg = OptimizerConfig(learning_rate=2e-3, schedule="cosine", warmup_epochs=warmup_epochs)
        rates = [learning_rate(cfg, e, b, steps_per_epoch, 5) for e in range(5) for b in range(steps_per_epoch)]
        assert all(0 < r <= 2e-3 for r in rates), (steps_per_epoch, max(rates))
        if warmup_epochs * steps_per_epoch <= 1:  # less than a step of warm-up is none
            assert rates[0] == 2e-3
