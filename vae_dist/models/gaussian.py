"""The Gaussian VAE family: an encoder to (mu, logvar), a decoder to pixel logits (conv, mlp, deep-mlp,
burda), and its objectives, the negative ELBO and the importance-weighted bound.

The model knows nothing of devices, ranks, logging or randomness: the reparameterisation
noise is passed in by the caller, which owns the seeded generator.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vae_dist.config import ModelConfig

PIXELS = 28 * 28


class VAEOutput(NamedTuple):
    logits: torch.Tensor  # (B, 1, 28, 28) Bernoulli logits, or (B, K, 1, 28, 28) for K samples each
    mu: torch.Tensor  # (B, L) posterior mean
    logvar: torch.Tensor  # (B, L) posterior log-variance
    z: torch.Tensor  # (B, L) or (B, K, L): the latent samples decoded


class ConvEncoder(nn.Module):
    """The original's encoder: two 3x3 stride-2 convolutions, 28 -> 14 -> 7, then two heads."""

    def __init__(self, latent: int, channels: tuple[int, ...]):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU(),  # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),  # (B, c2, 7, 7)
            nn.Flatten(),
        )
        self.mu = nn.Linear(c2 * 7 * 7, latent)
        self.logvar = nn.Linear(c2 * 7 * 7, latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.mu(h), self.logvar(h)


class ConvDecoder(nn.Module):
    """Mirror of the encoder. output_padding=1 makes each transposed conv exactly double
    the side (7 -> 14 -> 28); without it the sides come out 13 and 25, the original's bug."""

    def __init__(self, latent: int, channels: tuple[int, ...]):
        super().__init__()
        c1, c2 = channels
        self.c2 = c2
        self.fc = nn.Linear(latent, c2 * 7 * 7)
        self.deconv = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),  # (B, c1, 14, 14)
            nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1),  # (B, 1, 28, 28)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.fc(z).view(-1, self.c2, 7, 7))


ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _mlp(sizes: list[int], activation: str) -> list[nn.Module]:
    """Linear layers through ``sizes``, the activation after each."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    return layers


class MlpEncoder(nn.Module):
    """784 -> hidden layers -> (mu, logvar): the canonical PyTorch example's (one layer of
    400, ReLU) or Burda et al.'s (two of 200, tanh)."""

    def __init__(self, latent: int, hidden: list[int], activation: str):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), *_mlp([PIXELS, *hidden], activation))
        self.mu = nn.Linear(hidden[-1], latent)
        self.logvar = nn.Linear(hidden[-1], latent)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(x)
        return self.mu(h), self.logvar(h)


class MlpDecoder(nn.Module):
    """The encoder's mirror: latent -> hidden layers (reversed) -> 784 logits."""

    def __init__(self, latent: int, hidden: list[int], activation: str):
        super().__init__()
        self.net = nn.Sequential(*_mlp([latent, *reversed(hidden)], activation), nn.Linear(hidden[0], PIXELS))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, 1, 28, 28)


class VAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        latent = config.latent_size
        assert latent is not None  # resolved by ModelConfig's validator
        if config.kind == "conv":  # every other kind is an MLP
            self.encoder: nn.Module = ConvEncoder(latent, config.conv_channels)
            self.decoder: nn.Module = ConvDecoder(latent, config.conv_channels)
        else:
            hidden = [int(w) for w in config.hidden_sizes]  # type: ignore[union-attr]
            self.encoder = MlpEncoder(latent, hidden, config.activation)
            self.decoder = MlpDecoder(latent, hidden, config.activation)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "VAE":
        return cls(config)

    @property
    def latent_size(self) -> int:
        return int(self.config.latent_size)  # type: ignore[arg-type]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None) -> VAEOutput:
        """x: (B, 1, 28, 28) in [0, 1]; eps: (B, L), or (B, K, L) for K samples per image,
        standard normal noise drawn by the caller so that runs are reproducible (None draws
        one sample from the global RNG, for ad-hoc use)."""
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        if eps.dim() == 3:  # K samples each: (B, K, L) latents, decoded as one batch of B*K
            z = mu.unsqueeze(1) + eps.to(mu.dtype) * torch.exp(0.5 * logvar).unsqueeze(1)
            return VAEOutput(self.decode(z.flatten(0, 1)).unflatten(0, z.shape[:2]), mu, logvar, z)
        z = mu + eps.to(mu.dtype) * torch.exp(0.5 * logvar)
        return VAEOutput(self.decode(z), mu, logvar, z)


def parameter_count(config: ModelConfig) -> int:
    """The number of parameters ``VAE(config)`` would have, counted on the meta device: no
    memory is allocated, so an absurd config can be refused before it is built."""
    with torch.device("meta"):
        return sum(p.numel() for p in VAE(config).parameters())


# --- the objective ------------------------------------------------------------



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
