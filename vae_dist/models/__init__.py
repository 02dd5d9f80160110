"""The model families by --model name; each is one module behind the protocol (protocol.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vae_dist.models import burda2, gaussian, vqvae
from vae_dist.models.protocol import Family, Model

if TYPE_CHECKING:
    from vae_dist.config import TrainingConfig

REGISTRY: dict[str, Family] = {
    **{name: Family(gaussian.VAE, defaults, gaussian.HELP) for name, defaults in gaussian.ARCHITECTURES.items()},
    "burda-2layer": burda2.FAMILY,
    "vq-vae": vqvae.FAMILY,
}


def build(config: TrainingConfig) -> Model:
    """The model ``config`` describes, with fresh weights from the global RNG."""
    return REGISTRY[config.model.kind].cls(config.model, config.loss.recon_loss)


def parameter_count(config: TrainingConfig) -> int:
    """Parameters of ``build(config)``, counted on the meta device: an absurd config is refused unallocated."""
    with torch.device("meta"):
        return sum(p.numel() for p in build(config).parameters())
