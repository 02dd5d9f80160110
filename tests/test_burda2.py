"""Burda et al.'s two-stochastic-layer family (models/burda2.py): its sizes, the ELBO and the importance-weighted
bound against hand computations, the keyed IW-NLL, and the family end to end through the CLI, evaluate and the API."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributions import Normal

import vae_dist
from conftest import check_ok, main_in_process, small_train_args
from vae_dist.config import TrainingConfig
from vae_dist.data import keyed
from vae_dist.evaluation import evaluate
from vae_dist.models import build, parameter_count
from vae_dist.models.burda2 import H1
from vae_dist.models.gaussian import IW_CHUNK
from vae_dist.models.protocol import reconstruction

L = 3  # the small model's h2


def _config(**model) -> TrainingConfig:
    return TrainingConfig.from_dict({"model": {"kind": "burda-2layer", **model}})


def _small():
    torch.manual_seed(0)
    return build(_config(latent_size=L, hidden_sizes=[16]))


def _binary(b: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(b, 1, 28, 28, generator=torch.Generator().manual_seed(seed)) > 0.6).float()


def _log_normal(h: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return Normal(mu, torch.exp(0.5 * logvar)).log_prob(h).sum(dim=-1)


def test_the_architecture_is_the_papers():
    def mlp(*sizes: int) -> int:
        return sum(a * b + b for a, b in zip(sizes, sizes[1:]))

    # q: 784-200-200-(100, 100), 100-100-100-(50, 50); p: 50-100-100-(100, 100), 100-200-200-784.
    by_hand = (mlp(784, 200, 200) + 2 * mlp(200, 100) + mlp(100, 100, 100) + 2 * mlp(100, 50)
               + mlp(50, 100, 100) + 2 * mlp(100, 100) + mlp(100, 200, 200, 784))
    cfg = _config()
    assert parameter_count(cfg) == by_hand == sum(p.numel() for p in build(cfg).parameters())
    model = build(cfg)
    assert model.noise_shape(1) == (H1 + 50,) and model.noise_shape(5) == (5, H1 + 50) and model.latent_size == 50
    assert parameter_count(_config(latent_size=10)) < by_hand and parameter_count(_config(hidden_sizes=[100])) < by_hand


def test_the_model_is_built_for_its_image_shape():
    torch.manual_seed(0)
    model, x = build(_config(latent_size=L, hidden_sizes=[16], image_shape=[3, 8, 4])), torch.rand(2, 3, 8, 4)
    assert model.q1.body[0].in_features == 3 * 8 * 4 and model(x, torch.randn(2, H1 + L)).terms["loss"].shape == (2,)
    assert model.reconstruct(x).shape == x.shape and model.sample(5, torch.Generator()).shape == (5, 3, 8, 4)


def test_the_elbo_is_the_one_sample_estimate_and_k_1_of_the_iw_bound():
    model, x, eps = _small(), _binary(4), torch.randn(4, H1 + L)
    q1 = model.q1(x.flatten(1))
    h1 = q1[0] + eps[:, :H1] * torch.exp(0.5 * q1[1])
    q2 = model.q2(h1)
    h2 = q2[0] + eps[:, H1:] * torch.exp(0.5 * q2[1])
    prior = Normal(0.0, 1.0).log_prob(h2).sum(dim=1)
    kl = _log_normal(h1, *q1) + _log_normal(h2, *q2) - _log_normal(h1, *model.p1(h2)) - prior
    recon = reconstruction(model.px(h1), x, "bce")
    terms = model(x, eps, kl_weight=0.5).terms
    assert list(terms) == list(model.TERMS) == ["loss", "recon", "kl"]
    assert torch.allclose(terms["recon"], recon, atol=1e-4) and torch.allclose(terms["kl"], kl, atol=1e-4)
    assert torch.allclose(terms["loss"], recon + 0.5 * kl, atol=1e-4)
    assert torch.allclose(model(x, eps.unsqueeze(1)).terms["loss"], model(x, eps).terms["loss"], atol=1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_the_terms_are_float32_under_bf16_autocast(k):
    model, x = _small(), _binary(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.randn(4, *model.noise_shape(k)))
    assert all(t.dtype == torch.float32 for t in out.terms.values()) and out.features.dtype == torch.float32


def test_the_iw_bound_tightens_and_the_iw_nll_is_below_it():
    model, x = _small(), _binary(20, seed=1)
    with torch.no_grad():
        elbo = model(x, torch.randn(20, H1 + L)).terms["loss"].mean().item()
        bound = model(x, torch.randn(20, 50, H1 + L)).terms["loss"].mean().item()
        nll = model.iw_nll(x, 200, [torch.Generator().manual_seed(i) for i in range(20)]).mean().item()
    assert nll < bound < elbo - 0.1  # -log p(x) <= -IW_50 <= -ELBO


def test_the_iw_nll_is_the_same_whatever_the_batch_split():
    model, x = _small(), _binary(5, seed=2)

    def nll(idx: list[int]) -> torch.Tensor:  # image i's draws from its own keyed generator, as evaluate draws them
        generators = [keyed.generator(evaluate.IW_NOISE, evaluate.IW_SEED, i) for i in idx]
        with torch.no_grad():
            return model.iw_nll(x[idx], IW_CHUNK + 10, generators)  # two chunks of draws

    # The same draws (another stream would move it by about a nat); a batch of another size rounds its float32 sums of
    # 784 pixels differently.
    assert torch.allclose(torch.cat([nll([0, 1, 2]), nll([3]), nll([4])]), nll([0, 1, 2, 3, 4]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [1, 5])
def test_the_training_objective_reaches_every_parameter(k):
    model, x = _small(), _binary(3)
    model(x, torch.randn(3, *model.noise_shape(k))).terms["loss"].mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.parameters())


def test_active_units_are_counted_per_layer():
    features = torch.zeros(10, H1 + L)
    features[:, [0, 7]] = torch.randn(10, 2) * 3  # two units of h1 vary, one of h2
    features[:, H1 + 1] = torch.linspace(-1, 1, 10)
    assert _small().summarise(features) == {"active_units": 3, "active_units_h1": 2, "active_units_h2": 1}


def test_samples_reconstructions_and_the_top_latent_space():
    model, x = _small(), _binary(3)
    with torch.no_grad():
        a, b = model.sample(4, torch.Generator().manual_seed(3)), model.sample(4, torch.Generator().manual_seed(3))
        assert a.shape == (4, 1, 28, 28) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
        assert model.reconstruct(x).shape == (3, 1, 28, 28)
        mu, logvar = model.encode(x)
        assert mu.shape == logvar.shape == (3, L) and model.decode(mu).shape == (3, 1, 28, 28)


@pytest.mark.slow
def test_burda_2layer_end_to_end(data_dir, tmp_path, capsys):
    art = tmp_path / "run"
    ran = main_in_process(small_train_args(data_dir, art, "--model", "burda-2layer", "--binarize", "dynamic",
                                           "--iw-train-samples", "5", "--report-to", "none"), capsys)
    check_ok(ran)
    assert "valid/active_units_h2" in ran.stdout
    row = json.loads((art / "metrics.jsonl").read_text().splitlines()[-1])

    evaluated = main_in_process(["evaluate", str(art), "--iw-samples", "20", "--json"], capsys)
    check_ok(evaluated)
    result = json.loads(evaluated.stdout)
    assert result["loss"] == pytest.approx(row["valid/loss"]) and result["iw_nll"] < result["loss"]

    model = vae_dist.load(art)
    x = evaluate.test_split(model.config, limit=50).images.float().div(255.0)
    fresh = build(model.config).eval()
    with torch.no_grad():  # the trained model's ELBO against its untrained twin's, the same noise
        eps = torch.randn(50, *fresh.noise_shape(1), generator=torch.Generator().manual_seed(0))
        trained_loss, fresh_loss = (m(x, eps).terms["loss"].mean().item() for m in (model.model, fresh))
    assert trained_loss < fresh_loss - 100
    assert model.sample(4, seed=1).shape == (4, 1, 28, 28) and model.interpolate(x[:1], x[1:2], 3).shape[0] == 3
    assert vae_dist.iw_nll(model, x[:2], k=10) > 0
