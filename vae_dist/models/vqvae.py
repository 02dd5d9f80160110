"""The VQ-VAE (van den Oord et al. 2017): a conv encoder to an (H/4)x(W/4) grid of vectors (7x7 on MNIST), each
replaced by its nearest code of a learned codebook, and the mirror decoder. The gradient passes the quantisation
straight through; the codebook learns from ||sg[z_e] - e||^2, the encoder is held to it by beta * ||z_e - sg[e]||^2
(both summed per image). No KL term, no likelihood bound. The prior is a categorical per grid position, fitted on the
training set's codes every epoch end (the paper's PixelCNN's simplest stand-in)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Iterable, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vae_dist.errors import ConfigError
from vae_dist.models.protocol import Family, Model, Output, quarter_grid, reconstruction
from vae_dist.schema import Section, option

if TYPE_CHECKING:
    from vae_dist.config import ModelConfig

Channels = Annotated[int, Field(strict=True, ge=1, le=1024)]


class VQOptions(Section):
    path: ClassVar[str] = "model.vq_vae"

    # A batch of B MNIST images holds B x 49 x K distances (at the validation batch of 1,000: 400 MB for K = 2048).
    codebook_size: int = option(128, "vq-vae: codes in the codebook.", ge=2, le=2048)
    commitment: float = option(0.25, "vq-vae: weight beta of the commitment term.", flag="--commitment-cost", ge=0.0)
    channels: tuple[Channels, Channels] = option(
        (32, 64), "vq-vae: channels of the encoder's two stride-2 convolutions, e.g. 32,64 (the decoder mirrors them).",
        flag="--vq-channels", strict=False)


class VQVAE(Model):
    TERMS = ("loss", "recon", "codebook", "commitment")

    def __init__(self, config: ModelConfig, likelihood: str):
        super().__init__()
        opts: VQOptions = config.vq_vae  # type: ignore[attr-defined]
        dim, (c1, c2), codes = int(config.latent_size), opts.channels, opts.codebook_size  # type: ignore[arg-type]
        self.likelihood, self.beta, self.grid = likelihood, opts.commitment, quarter_grid(config)
        channels = config.image_shape[0]
        self.encoder = nn.Sequential(nn.Conv2d(channels, c1, 4, stride=2, padding=1), nn.ReLU(),  # (B, c1, H/2, W/2)
                                     nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),  # (B, c2, H/4, W/4)
                                     nn.Conv2d(c2, dim, 1))  # (B, D, H/4, W/4)
        self.codebook = nn.Embedding(codes, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codes, 1.0 / codes)
        self.decoder = nn.Sequential(nn.Conv2d(dim, c2, 3, padding=1), nn.ReLU(),
                                     nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),  # (B, c1, H/2, W/2)
                                     nn.ConvTranspose2d(c1, channels, 4, stride=2, padding=1))  # (B, C, H, W) logits
        # Code counts per grid position over the training set (+1 each): the prior.
        self.register_buffer("prior_counts", torch.ones(math.prod(self.grid), codes))

    def noise_shape(self, k: int) -> tuple[int, ...]:
        if k > 1:
            raise ConfigError("--model vq-vae has no importance-weighted bound: drop --iw-train-samples")
        return ()

    def _codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h*w) the index of each vector's nearest code (in float32)."""
        flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        return torch.cdist(flat, self.codebook.weight.float()).argmin(dim=1).view(z_e.shape[0], -1)

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h*w) codes -> (B, D, h, w) their vectors."""
        return self.codebook(codes).view(codes.shape[0], *self.grid, -1).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor], *, kl_weight: float = 1.0,
                labels: Optional[torch.Tensor] = None) -> Output:
        z_e = self.encoder(x)
        codes = self._codes(z_e)
        e = self._embed(codes).to(z_e.dtype)
        logits = self.decoder(z_e + (e - z_e).detach())  # straight through: the decoder's gradient reaches z_e
        recon = reconstruction(logits, x, self.likelihood)
        codebook = (z_e.detach() - e).float().pow(2).flatten(1).sum(dim=1)
        commitment = (z_e - e.detach()).float().pow(2).flatten(1).sum(dim=1)
        loss = recon + codebook + self.beta * commitment
        return Output({"loss": loss, "recon": recon, "codebook": codebook, "commitment": commitment}, codes)

    def summarise(self, features: torch.Tensor) -> dict[str, Any]:
        """The codebook's use over the test set: codes used, and the perplexity of their frequencies."""
        freq = torch.bincount(features.flatten(), minlength=self.codebook.num_embeddings).double()
        p = freq / freq.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        return {"codes_used": int((freq > 0).sum().item()), "perplexity": float(entropy.exp().item())}

    @torch.no_grad()
    def fit_prior(self, batches: Iterable[torch.Tensor]) -> None:
        counts = torch.ones_like(self.prior_counts)
        for x in batches:
            codes = self._codes(self.encoder(x))  # (B, h*w)
            counts += F.one_hot(codes, self.codebook.num_embeddings).sum(dim=0).to(counts.dtype)
        self.prior_counts.copy_(counts)

    def sample(self, n: int, generator: torch.Generator, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        codes = torch.multinomial(self.prior_counts.cpu(), n, replacement=True, generator=generator).T  # (n, h*w)
        return self._means(self._embed(codes.to(self.device)))

    def reconstruct(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._means(self._embed(self._codes(self.encoder(x.float().to(self.device)))))

    def _means(self, e: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(e).float()).cpu()


FAMILY = Family(VQVAE, {"latent_size": 16}, "vq-vae = van den Oord et al. (2017)'s VQ-VAE: a conv encoder to a "
                "(H/4)x(W/4) grid of codes from a learned codebook (straight-through gradient, commitment loss, "
                "--latent-size = the code vectors' size), sampled from a per-position categorical prior over the codes "
                "fitted on the training set", VQOptions)
