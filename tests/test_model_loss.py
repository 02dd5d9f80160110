"""The VAE and its objectives: shapes, the reparameterisation, the architectures' sizes,
and the ELBO and importance-weighted bound against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from vae_dist.config import ModelConfig
from vae_dist.models.gaussian import gaussian_log_prob, kl_divergence, negative_bound, negative_elbo, reconstruction
from vae_dist.models.gaussian import VAE, parameter_count


def _images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _binary(b: int, seed: int = 0) -> torch.Tensor:
    return (_images(b, seed) > 0.6).float()


def _small(kind: str = "mlp", latent: int = 3) -> VAE:
    torch.manual_seed(0)
    return VAE(ModelConfig(kind=kind, latent_size=latent, hidden_sizes=(16,), conv_channels=(4, 8)))


# --- model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_output_shapes(kind):
    model = _small(kind, latent=2)
    out = model(_images(3), torch.zeros(3, 2))
    assert out.logits.shape == (3, 1, 28, 28)  # conv: output_padding makes 7 -> 14 -> 28
    assert out.mu.shape == out.logvar.shape == out.z.shape == (3, 2) and model.latent_size == 2
    k = model(_images(3), torch.zeros(3, 5, 2))  # K samples per image
    assert k.logits.shape == (3, 5, 1, 28, 28) and k.z.shape == (3, 5, 2)


def test_reparameterisation_formula():
    model = _small()
    x, eps = _images(2), torch.randn(2, 3)
    out = model(x, eps)
    assert torch.equal(out.z, out.mu + eps * torch.exp(0.5 * out.logvar))
    assert torch.allclose(out.logits, model.decode(out.z), atol=1e-6)
    assert torch.equal(model(x, eps).logits, out.logits)  # given eps, nothing else is random


def test_architecture_sizes():
    # The PyTorch example's 784-400-(20, 20) and back, counted by hand.
    h, l, p = 400, 20, 784
    assert parameter_count(ModelConfig(kind="mlp")) == (p * h + h) + 2 * (h * l + l) + (l * h + h) + (h * p + p)
    # The counter (on the meta device) agrees with the built model, and every size option counts.
    cfg = ModelConfig(kind="conv", latent_size=5, conv_channels=(3, 7))
    assert parameter_count(cfg) == sum(t.numel() for t in VAE(cfg).parameters())
    assert parameter_count(ModelConfig(kind="conv", latent_size=8)) < parameter_count(ModelConfig(kind="conv"))
    assert parameter_count(ModelConfig(kind="mlp", hidden_sizes=(100,))) < parameter_count(ModelConfig(kind="mlp"))


# --- the ELBO ------------------------------------------------------------------------------


def test_kl_is_the_analytic_divergence_from_the_prior():
    assert torch.equal(kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3))
    mu, logvar = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, math.log(4.0)]])
    # 0.5 * sum(exp(lv) + mu^2 - 1 - lv)
    assert kl_divergence(mu, logvar).item() == pytest.approx(0.5 * ((1 + 1 - 1) + (4 + 4 - 1 - math.log(4.0))), abs=1e-6)


def test_kl_grows_away_from_the_prior():
    """The original code dropped the leading minus, which makes this negative."""
    mu = torch.tensor([[0.5, -1.0, 2.0]])
    kl = kl_divergence(mu, torch.zeros_like(mu))
    assert kl.item() == pytest.approx(0.5 * (0.25 + 1.0 + 4.0))
    assert kl_divergence(2 * mu, torch.zeros_like(mu)).item() > kl.item() > 0


def test_bce_is_stable_for_large_logits():
    r = reconstruction(torch.full((1, 1, 28, 28), 200.0), torch.zeros(1, 1, 28, 28), "bce")
    assert r.item() == pytest.approx(784 * 200.0, rel=1e-5)


def test_mse_is_half_sum_of_squares():
    g = torch.Generator().manual_seed(3)
    logits, x = torch.randn(4, 1, 28, 28, generator=g), torch.rand(4, 1, 28, 28, generator=g)
    expected = 0.5 * ((torch.sigmoid(logits) - x) ** 2).flatten(1).sum(dim=1)
    assert torch.allclose(reconstruction(logits, x, "mse"), expected, atol=1e-5)


def test_negative_elbo_is_the_mean_of_recon_plus_weighted_kl():
    g = torch.Generator().manual_seed(4)
    logits, x = torch.randn(6, 1, 28, 28, generator=g), torch.rand(6, 1, 28, 28, generator=g)
    mu, logvar = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    parts = negative_elbo(logits, mu, logvar, x, kind="bce", kl_weight=0.5)
    recon, kl = reconstruction(logits, x, "bce"), kl_divergence(mu, logvar)
    assert torch.equal(parts.recon, recon) and torch.equal(parts.kl, kl)
    assert torch.allclose(parts.total, recon + 0.5 * kl) and parts.loss.item() == pytest.approx(parts.total.mean().item())


def test_the_loss_is_float32_under_bf16_autocast():
    model, x, eps = _small(), _images(4), torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, eps)
        parts = negative_elbo(out.logits, out.mu, out.logvar, x, kind="bce", kl_weight=1.0)
    assert out.logits.dtype == torch.bfloat16  # autocast did take effect
    assert all(t.dtype == torch.float32 for t in parts)


# --- the importance-weighted bound ---------------------------------------------------------


def test_gaussian_log_prob_is_the_normal_density():
    z, mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, math.log(4.0)]])
    by_hand = -0.5 * (0.25 + math.log(2 * math.pi)) - 0.5 * (math.log(4.0) + 4.0 / 4.0 + math.log(2 * math.pi))
    assert gaussian_log_prob(z, mu, logvar).item() == pytest.approx(by_hand, abs=1e-6)


def test_iw_bound_with_one_sample_is_the_single_sample_elbo():
    model, x = _small(), _binary(5)
    out = model(x, torch.randn(5, 1, 3))
    iw = negative_bound(out.logits, out.z, out.mu, out.logvar, x, kind="bce", kl_weight=1.0).total
    z = out.z[:, 0]
    by_hand = reconstruction(out.logits[:, 0], x, "bce") - gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) \
        + gaussian_log_prob(z, out.mu, out.logvar)
    assert torch.allclose(iw, by_hand, atol=1e-4)


def test_iw_bound_tightens_with_more_samples():
    model, x = _small("burda", latent=4), _binary(20, seed=1)
    with torch.no_grad():
        bound = {}
        for k in (1, 50):
            out = model(x, torch.randn(20, k, 4))
            bound[k] = negative_bound(out.logits, out.z, out.mu, out.logvar, x, kind="bce", kl_weight=1.0).loss.item()
        out = model(x, torch.randn(20, 4))
        elbo = negative_elbo(out.logits, out.mu, out.logvar, x, kind="bce", kl_weight=1.0).loss.item()
    assert bound[50] < bound[1] - 0.1 and bound[50] < elbo  # -log p(x) <= -IW_50 <= -ELBO


@pytest.mark.parametrize("k", [1, 5])
def test_the_training_objective_reaches_every_parameter(k):
    model, x = _small(), _binary(3)
    out = model(x, torch.randn(3, 3) if k == 1 else torch.randn(3, k, 3))
    negative_bound(out.logits, out.z, out.mu, out.logvar, x, kind="bce", kl_weight=1.0).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())
