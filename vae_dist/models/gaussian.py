"""The Gaussian VAE family: an encoder to N(mu, diag(exp(logvar))), a standard normal prior,
a Bernoulli (or unit Gaussian) decoder; four architectures (deep-mlp, conv, mlp, burda) and
two objectives, the negative ELBO and Burda et al.'s importance-weighted bound. Conditional
(--conditional), it is Sohn et al. (2015)'s CVAE: the one-hot class joins the encoder's input
and the decoder's latent."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vae_dist.errors import ConfigError
from vae_dist.models.protocol import Model, Output, quarter_grid, reconstruction

if TYPE_CHECKING:
    from vae_dist.config import ModelConfig

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
IW_CHUNK = 400  # importance samples per image per pass: bounds memory whatever K is
# A unit is "active" when its posterior mean varies over the data (Burda et al. 2016).
ACTIVE_UNIT_THRESHOLD = 0.01
# --model names of this family, with what their fields left unset mean.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "deep-mlp": {"latent_size": 50, "hidden_sizes": (512, 256), "activation": "gelu"},
    "conv": {"latent_size": 64},
    "mlp": {"latent_size": 20, "hidden_sizes": (400,), "activation": "relu"},
    "burda": {"latent_size": 50, "hidden_sizes": (200, 200), "activation": "tanh"},
}
HELP = ("deep-mlp = 784-512-256-50 GELU (this trainer's recipe); conv = the original Burn flow's stride-2 conv "
        "encoder and its mirror; mlp = 784-400-20 ReLU, the PyTorch example; burda = 784-200-200-50 tanh, "
        "Burda et al. (2015)'s one-stochastic-layer model")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}  # --activation


def _mlp(sizes: list[int], activation: str) -> list[nn.Module]:
    """Linear layers through ``sizes``, the activation after each."""
    return [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), ACTIVATIONS[activation]())]


class VAE(Model):
    TERMS = ("loss", "recon", "kl")
    CONDITIONAL = True

    def __init__(self, config: ModelConfig, likelihood: str):
        super().__init__()
        if config.conditional and not config.num_classes:
            raise ConfigError("a conditional model needs model.num_classes (train sets it from the data's labels)")
        self.likelihood, self.conv = likelihood, config.kind == "conv"
        latent = self.latent_size = int(config.latent_size)  # type: ignore[arg-type]  # resolved by ModelConfig
        self.num_classes = config.num_classes if config.conditional else None
        channels, pixels, extra = config.image_shape[0], math.prod(config.image_shape), self.num_classes or 0
        if self.conv:  # the original Burn flow's: two 3x3 stride-2 convolutions and their mirror
            (c1, c2), (h, w) = config.conv_channels, quarter_grid(config)
            self.features = nn.Sequential(  # a conditional model's label: `extra` constant planes beside the channels
                nn.Conv2d(channels + extra, c1, 3, stride=2, padding=1), nn.ReLU(),  # (B, c1, H/2, W/2)
                nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),  # (B, c2 * H/4 * W/4)
            )
            width = c2 * h * w
            # output_padding=1 makes each side exactly double (7 -> 14 -> 28); the original's came out 13, 25.
            decoder = lambda: [nn.Linear(latent + extra, width), nn.Unflatten(1, (c2, h, w)), nn.ReLU(),  # noqa: E731
                               nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                               nn.ConvTranspose2d(c1, channels, 3, stride=2, padding=1, output_padding=1)]
        else:  # an MLP and its mirror: C*H*W -> hidden -> (mu, logvar); latent -> reversed hidden -> C*H*W
            hidden, act = [int(w) for w in config.hidden_sizes], config.activation  # type: ignore[union-attr]
            self.features = nn.Sequential(nn.Flatten(), *_mlp([pixels + extra, *hidden], act))  # type: ignore[arg-type]
            width = hidden[-1]
            decoder = lambda: [*_mlp([latent + extra, *reversed(hidden)], act), nn.Linear(hidden[0], pixels),  # noqa
                               nn.Unflatten(1, tuple(config.image_shape))]  # type: ignore[arg-type]
        # Created in this order: the same seed, the same weights.
        self.mu, self.logvar = nn.Linear(width, latent), nn.Linear(width, latent)
        self.decoder = nn.Sequential(*decoder())

    def encode(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None  # type: ignore[override]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_classes:  # the one-hot label after the pixels, or as constant planes beside the channels
            y = self._one_hot(labels, x)
            x = torch.cat([x, y[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1) if self.conv else \
                torch.cat([x.flatten(1), y], 1)
        h = self.features(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        return self.decoder(torch.cat([z, self._one_hot(labels, z)], 1) if self.num_classes else z)

    def _one_hot(self, labels: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        assert labels is not None, "a conditional model takes labels"
        return F.one_hot(labels.long().to(like.device), self.num_classes).to(like.dtype)  # type: ignore[arg-type]

    def noise_shape(self, k: int) -> tuple[int, ...]:
        return (k, self.latent_size) if k > 1 else (self.latent_size,)

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor], *, kl_weight: float = 1.0,
                labels: Optional[torch.Tensor] = None) -> Output:
        """noise: (B, L) for the ELBO, (B, K, L) for the K-sample importance-weighted bound."""
        mu, logvar = self.encode(x, labels)
        eps = torch.randn_like(mu) if noise is None else noise.to(mu.dtype)
        if eps.dim() == 3:  # K samples each: (B, K, L) latents, decoded as one batch of B*K
            z = mu.unsqueeze(1) + eps * torch.exp(0.5 * logvar).unsqueeze(1)
            each = None if labels is None else labels.repeat_interleave(z.shape[1])
            logits = self.decode(z.flatten(0, 1), each).unflatten(0, z.shape[:2])
            total, recon, kl = negative_iw_bound(logits, z, mu, logvar, x, kind=self.likelihood)
        else:
            z = mu + eps * torch.exp(0.5 * logvar)
            total, recon, kl = negative_elbo(self.decode(z, labels), mu, logvar, x, kind=self.likelihood,
                                             kl_weight=kl_weight)
        return Output({"loss": total, "recon": recon, "kl": kl}, mu.float())

    def summarise(self, features: torch.Tensor) -> dict[str, Any]:
        active = int((features.var(dim=0) > ACTIVE_UNIT_THRESHOLD).sum().item()) if features.shape[0] > 1 else 0
        return {"active_units": active}

    def sample(self, n: int, generator: torch.Generator, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._means(torch.randn(n, self.latent_size, generator=generator), labels)

    def reconstruct(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._means(self.encode(x.float().to(self.device), labels)[0], labels)

    def _means(self, z: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.decode(z.to(self.device), labels).float()).cpu()

    def iw_nll(self, x: torch.Tensor, k: int, generators: list[torch.Generator],  # type: ignore[override]
               labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``importance_sampled``'s -log p(x); log p(x|z) is minus the training reconstruction term."""
        mu, logvar = self.encode(x, labels)  # (B, L)

        def log_weights(eps: torch.Tensor) -> torch.Tensor:  # decoded as kk batches of the B images
            z = mu + eps.transpose(0, 1).contiguous() * torch.exp(0.5 * logvar)  # (kk, B, L)
            kk, b = z.shape[:2]
            logits = self.decode(z.reshape(kk * b, -1), None if labels is None else labels.repeat(kk))
            log_px_z = -reconstruction(logits, x.repeat(kk, 1, 1, 1), self.likelihood).view(kk, b)
            return log_importance_weights(log_px_z, z, mu, logvar).T

        return importance_sampled(k, generators, mu.shape[1], log_weights)


def importance_sampled(k: int, generators: list[torch.Generator], size: int,
                       log_weights: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """-log p(x) per image (float64, (B,)) from k importance samples (Burda et al. 2015), IW_CHUNK at a time, image i's
    from ``generators[i]``: ``log_weights`` maps their noise (B, kk, size) to log p(x, z) - log q(z | x), (B, kk)."""
    running = torch.full((len(generators),), -math.inf, dtype=torch.float64)
    for k0 in range(0, k, IW_CHUNK):
        eps = torch.stack([torch.randn(min(IW_CHUNK, k - k0), size, generator=g) for g in generators])
        running = torch.logaddexp(running, torch.logsumexp(log_weights(eps).double().cpu(), dim=1))
    return -(running - math.log(k))


# --- the objective: pure functions of tensors, in nats per image -----------------------


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Analytic KL from N(mu, exp(logvar)) to N(0, 1), summed over latent dims: (B, L) -> (B,)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def negative_elbo(logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, *, kind: str,
                  kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(recon + kl_weight * kl, recon, kl) per image; in float32 even under autocast (pixel sums lose in bf16)."""
    recon = reconstruction(logits, x, kind)
    kl = kl_divergence(mu.float(), logvar.float())
    return recon + kl_weight * kl, recon, kl


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dim."""
    return -0.5 * torch.sum(logvar + (z - mu).pow(2) / logvar.exp(), dim=-1) - z.shape[-1] * HALF_LOG_2PI


def log_importance_weights(log_px_z: torch.Tensor, z: torch.Tensor, mu: torch.Tensor,
                           logvar: torch.Tensor) -> torch.Tensor:
    """log p(x | z) + log p(z) - log q(z | x) per sample; mu and logvar broadcast against z."""
    return log_px_z + gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)) - gaussian_log_prob(z, mu, logvar)


def negative_iw_bound(logits: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor,
                      *, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-log (1/K) sum_k p(x, z_k) / q(z_k | x) per image (Burda et al. 2015); K = 1 is the ELBO.
    logits: (B, K, C, H, W); z: (B, K, L); mu, logvar: (B, L). recon, kl: the ELBO's (mean over K, analytic KL)."""
    b, k = z.shape[:2]
    images = x.unsqueeze(1).expand(b, k, *x.shape[1:]).flatten(0, 1)
    log_px_z = -reconstruction(logits.flatten(0, 1), images, kind).view(b, k)
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    log_w = log_importance_weights(log_px_z, z, mu.unsqueeze(1), logvar.unsqueeze(1))  # (B, K)
    total = -(torch.logsumexp(log_w, dim=1) - math.log(k))
    return total, -log_px_z.mean(dim=1), kl_divergence(mu, logvar)
