"""Burda et al. (2015, arXiv 1509.00519, appendix; as yburda/iwae builds it)'s VAE with two stochastic layers:
q(h1 | x) 784-200-200 tanh to a diagonal Gaussian over h1 (100 units), q(h2 | h1) 100-100-100 tanh to one over h2
(50); the prior p(h2) = N(0, I), p(h1 | h2) 50-100-100 tanh to a Gaussian over h1, p(x | h1) 100-200-200 tanh to
784 Bernoulli logits. The ELBO's KL between the layers has no closed form: it is the sample's log q - log p. With
K samples the objective is the importance-weighted bound; ``iw_nll`` is the Gaussian family's estimator."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from vae_dist.models.gaussian import ACTIVE_UNIT_THRESHOLD, _mlp, gaussian_log_prob, importance_sampled
from vae_dist.models.protocol import Family, Model, Output, reconstruction

if TYPE_CHECKING:
    from vae_dist.config import ModelConfig

H1 = 100  # h1's units, and the width of the two hidden layers between h1 and h2 (both ways), as in the paper

Pair = tuple[torch.Tensor, torch.Tensor]  # a diagonal Gaussian's (mean, log-variance)


class GaussianLayer(nn.Module):
    """sizes[0] -> an MLP through sizes[1:-1] -> (mean, log-variance) over sizes[-1]."""

    def __init__(self, sizes: list[int], activation: str):
        super().__init__()
        self.body = nn.Sequential(*_mlp(sizes[:-1], activation))
        self.mu, self.logvar = nn.Linear(sizes[-2], sizes[-1]), nn.Linear(sizes[-2], sizes[-1])

    def forward(self, h: torch.Tensor) -> Pair:
        h = self.body(h)
        return self.mu(h), self.logvar(h)


class TwoLayerVAE(Model):
    TERMS = ("loss", "recon", "kl")

    def __init__(self, config: ModelConfig, likelihood: str):
        super().__init__()
        self.likelihood = likelihood
        hidden, act = [int(w) for w in config.hidden_sizes], str(config.activation)  # type: ignore[union-attr]
        top = self.latent_size = int(config.latent_size)  # type: ignore[arg-type]  # resolved by ModelConfig
        pixels = math.prod(config.image_shape)
        # Created in this order: the same seed, the same weights.
        self.q1 = GaussianLayer([pixels, *hidden, H1], act)  # q(h1 | x)
        self.q2 = GaussianLayer([H1, H1, H1, top], act)  # q(h2 | h1)
        self.p1 = GaussianLayer([top, H1, H1, H1], act)  # p(h1 | h2)
        self.px = nn.Sequential(*_mlp([H1, *reversed(hidden)], act), nn.Linear(hidden[0], pixels),
                                nn.Unflatten(1, tuple(config.image_shape)))  # p(x | h1): logits

    def noise_shape(self, k: int) -> tuple[int, ...]:
        """Each sample's standard normal noise for h1, then for h2."""
        return (k, H1 + self.latent_size) if k > 1 else (H1 + self.latent_size,)  # type: ignore[operator]

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor], *, kl_weight: float = 1.0,
                labels: Optional[torch.Tensor] = None) -> Output:
        """noise: (B, H1 + L) for the ELBO, (B, K, H1 + L) for the K-sample importance-weighted bound."""
        q1 = self.q1(x.flatten(1))
        eps = torch.randn(x.shape[0], *self.noise_shape(1), device=x.device) if noise is None else noise.to(q1[0].dtype)
        recon, kl, mu2 = self._samples(x, q1, eps if eps.dim() == 3 else eps.unsqueeze(1))
        loss = recon[:, 0] + kl_weight * kl[:, 0] if eps.dim() == 2 else negative_iw_bound(recon, kl)
        return Output({"loss": loss, "recon": recon.mean(dim=1), "kl": kl.mean(dim=1)},
                      torch.cat([q1[0], mu2[:, 0]], dim=1).float())

    def _samples(self, x: torch.Tensor, q1: Pair, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """eps (B, K, H1 + L) -> -log p(x | h1) and the KL's estimate log q - log p, each (B, K), and the means of
        q(h2 | h1), (B, K, L)."""
        b, k = eps.shape[:2]
        mu1, logvar1 = q1[0].unsqueeze(1), q1[1].unsqueeze(1)
        h1 = mu1 + eps[..., :H1] * torch.exp(0.5 * logvar1)  # (B, K, H1)
        mu2, logvar2 = self.q2(h1)
        h2 = mu2 + eps[..., H1:] * torch.exp(0.5 * logvar2)  # (B, K, L)
        images = x.unsqueeze(1).expand(b, k, *x.shape[1:]).flatten(0, 1)
        recon = reconstruction(self.px(h1.flatten(0, 1)), images, self.likelihood).view(b, k)
        return recon, log_ratio(h1, h2, (mu1, logvar1), (mu2, logvar2), self.p1(h2)), mu2

    def summarise(self, features: torch.Tensor) -> dict[str, Any]:
        """Active units (Burda et al.: the posterior mean varies over the data) of each layer, and in all."""
        if features.shape[0] < 2:
            return {"active_units": 0, "active_units_h1": 0, "active_units_h2": 0}
        active = features.var(dim=0) > ACTIVE_UNIT_THRESHOLD
        h1, h2 = int(active[:H1].sum().item()), int(active[H1:].sum().item())
        return {"active_units": h1 + h2, "active_units_h1": h1, "active_units_h2": h2}

    def encode(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Pair:  # type: ignore[override]
        """q(h2 | h1) at h1 = the mean of q(h1 | x): the top layer, the latent space of interpolate and manifold."""
        return self.q2(self.q1(x.flatten(1))[0])

    def decode(self, h2: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        """Pixel logits of p(x | h1) at h1 = the mean of p(h1 | h2)."""
        return self.px(self.p1(h2)[0])

    def sample(self, n: int, generator: torch.Generator, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h2 from the prior, then h1 drawn from p(h1 | h2) with the same generator (as the paper's samples)."""
        h2 = torch.randn(n, self.latent_size, generator=generator).to(self.device)  # type: ignore[arg-type]
        mu, logvar = self.p1(h2)
        h1 = mu + torch.randn(n, H1, generator=generator).to(mu.device) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.px(h1).float()).cpu()

    def reconstruct(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """p(x | h1)'s mean at h1 = the mean of q(h1 | x)."""
        mu1 = self.q1(x.float().to(self.device).flatten(1))[0]
        return torch.sigmoid(self.px(mu1).float()).cpu()

    def iw_nll(self, x: torch.Tensor, k: int, generators: list[torch.Generator],  # type: ignore[override]
               labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``importance_sampled``'s -log p(x), as gaussian.VAE.iw_nll's."""
        q1 = self.q1(x.flatten(1))

        def log_weights(eps: torch.Tensor) -> torch.Tensor:
            recon, kl, _ = self._samples(x, q1, eps.to(q1[0].device))
            return -(recon + kl)

        return importance_sampled(k, generators, *self.noise_shape(1), log_weights)


# --- the objective: pure functions of tensors, in nats per image -----------------------


def log_ratio(h1: torch.Tensor, h2: torch.Tensor, q1: Pair, q2: Pair, p1: Pair) -> torch.Tensor:
    """log q(h1 | x) + log q(h2 | h1) - log p(h1 | h2) - log p(h2) per sample, in float32 (bf16 loses in the sums): the
    one-sample estimate of KL(q(h1, h2 | x) || p(h1, h2)). q1, q2, p1: (mean, log-variance) broadcasting to h1 or h2."""
    h1, h2 = h1.float(), h2.float()
    (m1, v1), (m2, v2), (mp, vp) = ((m.float(), v.float()) for m, v in (q1, q2, p1))
    zero = torch.zeros_like(h2)
    return (gaussian_log_prob(h1, m1, v1) + gaussian_log_prob(h2, m2, v2) - gaussian_log_prob(h1, mp, vp)
            - gaussian_log_prob(h2, zero, zero))


def negative_iw_bound(recon: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """-log (1/K) sum_k p(x, h_k) / q(h_k | x) per image from the (B, K) terms; K = 1 is the ELBO."""
    return -(torch.logsumexp(-(recon + kl), dim=1) - math.log(recon.shape[1]))


FAMILY = Family(TwoLayerVAE, {"latent_size": 50, "hidden_sizes": (200, 200), "activation": "tanh"},
                "burda-2layer = Burda et al. (2015)'s two-stochastic-layer model: 784-200-200 tanh to h1 (100 units), "
                "100-100 to h2 (50), p mirrors it (--latent-size: h2's units; --hidden-sizes: the x side's layers); "
                "its samples draw h1 from p(h1 | h2)")
