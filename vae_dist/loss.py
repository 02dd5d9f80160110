"""The negative ELBO, per image: reconstruction summed over pixels plus the weighted KL.

Pure functions of tensors. All values are in nats per image.

KL(q(z|x) || N(0, I)) = -1/2 * sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j)). The original
Burn flow wrote this without the leading minus, which makes the "KL" negative and rewards
the encoder for moving away from the prior.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class LossParts(NamedTuple):
    loss: torch.Tensor  # () mean over the batch of recon + kl_weight * kl: what is minimised
    recon: torch.Tensor  # (B,) reconstruction nats per image
    kl: torch.Tensor  # (B,) KL nats per image
    total: torch.Tensor  # (B,) recon + kl_weight * kl per image


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL from N(mu, exp(logvar)) to N(0, 1), summed over latent dims: (B, L) -> (B,)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """-log p(x|z) per image, summed over pixels: (B, 1, 28, 28) -> (B,).

    bce: Bernoulli likelihood on logits (the stable form of BCE(sigmoid(logits), x)).
    mse: Gaussian with unit variance around sigmoid(logits), without the constant
    784 * log(sqrt(2 pi)) nats, which moves the loss but not its gradient.
    """
    logits = logits.float()
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif kind == "mse":
        per_pixel = 0.5 * (torch.sigmoid(logits) - x).pow(2)
    else:
        raise ValueError(f"unknown reconstruction loss {kind!r}")
    return per_pixel.flatten(1).sum(dim=1)


def negative_elbo(
    logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, *, kind: str, kl_weight: float
) -> LossParts:
    # Computed in float32 even under autocast: sums over 784 pixels lose too much in bf16.
    recon = reconstruction(logits, x, kind)
    kl = kl_divergence(mu.float(), logvar.float())
    total = recon + kl_weight * kl
    return LossParts(total.mean(), recon, kl, total)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dim."""
    return -0.5 * torch.sum(logvar + (z - mu).pow(2) / logvar.exp(), dim=-1) - z.shape[-1] * HALF_LOG_2PI


def log_importance_weights(
    log_px_z: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """log p(x | z) + log p(z) - log q(z | x) per sample; mu and logvar broadcast against z."""
    return log_px_z + gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) - gaussian_log_prob(z, mu, logvar)


def negative_iw_bound(
    logits: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, *, kind: str
) -> LossParts:
    """The negative importance-weighted bound (Burda et al. 2015) from K samples per image:
    -log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x); K = 1 gives the ELBO.

    logits: (B, K, 1, 28, 28); z: (B, K, L); mu, logvar: (B, L); x: (B, 1, 28, 28).
    ``recon`` and ``kl`` report the ELBO's parts (mean reconstruction over the K samples,
    analytic KL), so they stay comparable with K = 1; ``total`` is the bound itself.
    """
    b, k = z.shape[:2]
    log_px_z = -reconstruction(logits.flatten(0, 1), x.unsqueeze(1).expand(b, k, *x.shape[1:]).flatten(0, 1), kind).view(b, k)
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    log_w = log_importance_weights(log_px_z, z, mu.unsqueeze(1), logvar.unsqueeze(1))  # (B, K)
    total = -(torch.logsumexp(log_w, dim=1) - math.log(k))
    return LossParts(total.mean(), -log_px_z.mean(dim=1), kl_divergence(mu, logvar), total)


def negative_bound(
    logits: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, *,
    kind: str, kl_weight: float,
) -> LossParts:
    """The training objective: the (weighted) ELBO for one sample per image (z: (B, L)),
    the importance-weighted bound for K (z: (B, K, L))."""
    if z.dim() == 3:
        return negative_iw_bound(logits, z, mu, logvar, x, kind=kind)
    return negative_elbo(logits, mu, logvar, x, kind=kind, kl_weight=kl_weight)
