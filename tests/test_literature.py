"""The literature's protocol: binarization keyed by sample index, the importance-weighted
bound, the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from vae_dist import binarize
from vae_dist.config import ModelConfig, OptimizerConfig
from vae_dist.loss import gaussian_log_prob, negative_bound, negative_elbo, reconstruction
from vae_dist.model import VAE
from vae_dist.schedule import burda_factor, learning_rate


def _grey(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_a_samples_coins_depend_on_its_index_not_on_its_batch():
    images = _grey(64).float() / 255
    coins = binarize.coins(42, binarize.train_stream(3), 64)
    whole = binarize.apply(images, coins)
    order = torch.randperm(64)
    assert torch.equal(binarize.apply(images[order], coins[order]), whole[order])  # any batching, any rank
    assert not torch.equal(binarize.apply(images, binarize.coins(42, binarize.train_stream(4), 64)), whole)  # new epoch
    assert not torch.equal(binarize.apply(images, binarize.coins(43, binarize.train_stream(3), 64)), whole)  # new seed


def test_binarization_is_bernoulli_of_the_grey_level():
    level = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand(256, 1, 28, 28).contiguous()
    on = torch.cat([binarize.binarize_split(level, s, 1) for s in range(20)]).float().div(255)  # 20 draws per level
    frequency = on.view(20, 256, -1).mean(dim=(0, 2))  # per level, over 20 x 784 coins
    expected = torch.arange(256) / 255
    assert frequency[0] == 0 and frequency[255] == 1  # blank stays blank, ink stays ink
    assert torch.allclose(frequency, expected, atol=0.02)
    # The batch path gives the same bits as the whole-split path.
    coins = binarize.coins(5, 9, 256)
    assert torch.equal(binarize.apply(level.float() / 255, coins) * 255, binarize.binarize_split(level, 5, 9).float())


def test_the_test_binarization_does_not_depend_on_the_run():
    test = _grey(32, seed=1)
    train = _grey(32, seed=2)
    _, a = binarize.prepare_splits(train, test, "dynamic", seed=1)
    static_train, b = binarize.prepare_splits(train, test, "static", seed=99)
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0, 255}
    assert set(static_train.unique().tolist()) <= {0, 255}
    assert binarize.prepare_splits(train, test, "none", seed=1) == (train, test)


def test_iw_bound_with_one_sample_is_the_single_sample_elbo():
    torch.manual_seed(0)
    model = VAE.from_config(ModelConfig(kind="mlp", latent_size=3, hidden_size=16))
    x = (torch.rand(5, 1, 28, 28) > 0.5).float()
    out = model(x, torch.randn(5, 1, 3))
    iw = negative_bound(out.logits, out.z, out.mu, out.logvar, x, kind="bce", kl_weight=1.0).total
    z = out.z[:, 0]
    by_hand = reconstruction(out.logits[:, 0], x, "bce") - gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) \
        + gaussian_log_prob(z, out.mu, out.logvar)
    assert torch.allclose(iw, by_hand, atol=1e-4)


def test_iw_bound_tightens_with_more_samples():
    torch.manual_seed(0)
    model = VAE.from_config(ModelConfig(kind="burda", latent_size=4, hidden_size=32))
    x = (torch.rand(50, 1, 28, 28) > 0.7).float()
    with torch.no_grad():
        bounds = [
            negative_bound(*(lambda o: (o.logits, o.z, o.mu, o.logvar))(model(x, torch.randn(50, k, 4))), x,
                           kind="bce", kl_weight=1.0).loss.item()
            for k in (1, 50)
        ]
        out = model(x, torch.randn(50, 4))
        elbo = negative_elbo(out.logits, out.mu, out.logvar, x, kind="bce", kl_weight=1.0).loss.item()
    assert bounds[1] < bounds[0] - 0.1 and bounds[1] < elbo  # -log p(x) <= -IW_50 <= -ELBO
    out = model(x[:4], torch.randn(4, 5, 4))
    negative_bound(out.logits, out.z, out.mu, out.logvar, x[:4], kind="bce", kl_weight=1.0).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = OptimizerConfig(learning_rate=1e-3, schedule="cosine", warmup_epochs=1.0)
    rates = [learning_rate(cfg, s, 10, 100) for s in range(100)]
    assert rates[:10] == sorted(rates[:10]) and rates[9] == pytest.approx(1e-3)
    assert rates[10:] == sorted(rates[10:], reverse=True) and rates[-1] < 1e-6
    assert learning_rate(OptimizerConfig(schedule="constant"), 5, 10, 100) is None  # constant: the optimizer's own


def test_burda_schedule_stages():
    assert [burda_factor(e) for e in (0, 0.99)] == [1.0, 1.0]
    assert burda_factor(1) == pytest.approx(10 ** (-1 / 7)) and burda_factor(3.9) == pytest.approx(10 ** (-1 / 7))
    assert burda_factor(4) == pytest.approx(10 ** (-2 / 7))
    assert burda_factor(3279.9) == pytest.approx(0.1) and math.isclose(burda_factor(10_000), 0.1)
