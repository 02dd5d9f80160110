"""The Gaussian family (models/gaussian.py) through the model protocol: its architectures'
sizes, the reparameterisation, and the ELBO and importance-weighted bound against hand
computations."""

from __future__ import annotations

import math

import pytest
import torch

from vae_dist.config import TrainingConfig
from vae_dist.errors import ConfigError
from vae_dist.models import build, parameter_count
from vae_dist.models.gaussian import gaussian_log_prob, kl_divergence
from vae_dist.models.protocol import reconstruction


def _images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _binary(b: int, seed: int = 0) -> torch.Tensor:
    return (_images(b, seed) > 0.6).float()


def _config(kind: str = "mlp", **model) -> TrainingConfig:
    return TrainingConfig.from_dict({"model": {"kind": kind, **model}})


def _small(kind: str = "mlp", latent: int = 3, activation: str = "relu"):
    torch.manual_seed(0)
    return build(_config(kind, latent_size=latent, hidden_sizes=[16], conv_channels=[4, 8], activation=activation))


# --- the model -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_decoder_makes_28x28_and_noise_has_the_objectives_shape(kind):
    model = _small(kind, latent=2)
    assert model.decode(torch.zeros(3, 2)).shape == (3, 1, 28, 28)  # conv: output_padding makes 7 -> 14 -> 28
    assert model.noise_shape(1) == (2,) and model.noise_shape(5) == (5, 2)
    for noise in (torch.zeros(3, 2), torch.zeros(3, 5, 2)):
        out = model(_images(3), noise)
        assert all(t.shape == (3,) for t in out.terms.values()) and out.features.shape == (3, 2)


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_the_model_is_built_for_its_image_shape(kind):
    torch.manual_seed(0)
    model = build(_config(kind, latent_size=2, hidden_sizes=[16], conv_channels=[4, 8], image_shape=[3, 32, 32]))
    assert model.decode(torch.zeros(5, 2)).shape == (5, 3, 32, 32)
    x = torch.rand(5, 3, 32, 32)
    assert model(x, torch.zeros(5, 2)).terms["loss"].shape == (5,) and model.reconstruct(x).shape == x.shape
    if kind == "mlp":  # C*H*W inputs
        assert model.features[1].in_features == 3 * 32 * 32
    else:
        with pytest.raises(ConfigError, match=r"^--model conv takes images whose sides are multiples of 4 .* 3x30x32$"):
            build(_config(kind, image_shape=[3, 30, 32]))


def test_reparameterisation_formula():
    model, x, eps = _small(), _binary(2), torch.randn(2, 3)
    mu, logvar = model.encode(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    by_hand = reconstruction(model.decode(z), x, "bce") + kl_divergence(mu, logvar)
    assert torch.allclose(model(x, eps).terms["loss"], by_hand, atol=1e-4)
    assert torch.equal(model(x, eps).terms["loss"], model(x, eps).terms["loss"])  # given eps, nothing else is random


def test_architecture_sizes():
    # The PyTorch example's 784-400-(20, 20) and back, counted by hand.
    h, l, p = 400, 20, 784
    assert parameter_count(_config("mlp")) == (p * h + h) + 2 * (h * l + l) + (l * h + h) + (h * p + p)
    # The counter (on the meta device) agrees with the built model, and every size option counts.
    cfg = _config("conv", latent_size=5, conv_channels=[3, 7])
    assert parameter_count(cfg) == sum(t.numel() for t in build(cfg).parameters())
    assert parameter_count(_config("conv", latent_size=8)) < parameter_count(_config("conv"))
    assert parameter_count(_config("mlp", hidden_sizes=[100])) < parameter_count(_config("mlp"))


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


def test_the_loss_is_recon_plus_weighted_kl_and_the_terms_are_the_elbos():
    model, x, eps = _small(), _images(6), torch.randn(6, 3)
    terms = model(x, eps, kl_weight=0.5).terms
    assert list(terms) == list(model.TERMS) == ["loss", "recon", "kl"]
    assert torch.allclose(terms["loss"], terms["recon"] + 0.5 * terms["kl"])
    assert torch.equal(model(x, eps).terms["recon"], terms["recon"]) and (terms["kl"] > 0).all()


def test_the_terms_are_float32_under_bf16_autocast():
    model, x, eps = _small(), _images(4), torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.decode(eps).dtype == torch.bfloat16  # autocast does take effect
        terms = model(x, eps).terms
    assert all(t.dtype == torch.float32 for t in terms.values())


# --- the importance-weighted bound ---------------------------------------------------------


def test_gaussian_log_prob_is_the_normal_density():
    z, mu, logvar = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, math.log(4.0)]])
    by_hand = -0.5 * (0.25 + math.log(2 * math.pi)) - 0.5 * (math.log(4.0) + 4.0 / 4.0 + math.log(2 * math.pi))
    assert gaussian_log_prob(z, mu, logvar).item() == pytest.approx(by_hand, abs=1e-6)


def test_iw_bound_with_one_sample_is_the_single_sample_elbo():
    model, x, eps = _small(), _binary(5), torch.randn(5, 1, 3)
    mu, logvar = model.encode(x)
    z = mu + eps[:, 0] * torch.exp(0.5 * logvar)
    by_hand = reconstruction(model.decode(z), x, "bce") - gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) \
        + gaussian_log_prob(z, mu, logvar)
    assert torch.allclose(model(x, eps).terms["loss"], by_hand, atol=1e-4)


def test_iw_bound_tightens_with_more_samples_and_the_estimate_is_below_it():
    model, x = _small("burda", latent=4), _binary(20, seed=1)
    with torch.no_grad():
        bound = {k: model(x, torch.randn(20, k, 4)).terms["loss"].mean().item() for k in (1, 50)}
        elbo = model(x, torch.randn(20, 4)).terms["loss"].mean().item()
        gens = [torch.Generator().manual_seed(i) for i in range(20)]
        nll = model.iw_nll(x, 500, gens).mean().item()
    assert bound[50] < bound[1] - 0.1 and bound[50] < elbo  # -log p(x) <= -IW_50 <= -ELBO
    assert nll < bound[50]


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "silu"])
@pytest.mark.parametrize("k", [1, 5])
def test_the_training_objective_reaches_every_parameter(k, activation):
    model, x = _small(activation=activation), _binary(3)
    model(x, torch.randn(3, 3) if k == 1 else torch.randn(3, k, 3)).terms["loss"].mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())
