"""The model protocol: all that the trainer, checkpoints, evaluation, the API, the pictures and
the trackers know of a family. A family is one module under models/ with a ``Model`` subclass
and a registry line; it knows nothing of devices, ranks or logging, and its noise comes from the caller."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vae_dist.errors import ConfigError

if TYPE_CHECKING:
    from vae_dist.config import ModelConfig

# The most one call may ask of a family, through the API or the CLI alike: ``sample`` makes its n images in one batch,
# whose activations grow with n, and ``iw_nll``'s time grows with K (Burda et al. use 5000; beyond 100,000 an estimate
# takes days for no gain).
MAX_IMAGES, MAX_IW_SAMPLES = 10_000, 100_000
MAX_GENERATOR_SEED = 2**63 - 1  # torch seeds a generator with 64 bits; within the signed range every seed is one stream


class Family(NamedTuple):
    """A registry entry: what ``--model NAME`` builds."""
    cls: type[Model]  # built as cls(config.model, likelihood)
    defaults: dict[str, Any]  # what the shared model fields left unset (null) mean for it
    help: str  # its line in --help
    options: Optional[type] = None  # a schema.Section of its own options, the config's model.<name>


class Output(NamedTuple):
    terms: dict[str, torch.Tensor]  # per image (B,), one per name of Model.TERMS; "loss" is the objective
    features: torch.Tensor  # (B, D) per image: what ``summarise`` turns into a metric of the whole test set


class Model(nn.Module):
    """What every family provides. ``forward`` is the objective (so that DDP sees it). ``labels`` (B,) are the images'
    classes, given to a conditional model (``num_classes`` set) and None for any other."""

    TERMS: ClassVar[tuple[str, ...]]  # the per-image terms, "loss" first, as metrics name them (train/kl, ...)
    CONDITIONAL: ClassVar[bool] = False  # whether the family has a conditional form (--conditional)
    # Optional abilities: None where the family has none (the API and the CLI then say so in one line).
    encode: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None  # (images, labels) -> (mu, logvar)
    decode: Optional[Callable[..., torch.Tensor]] = None  # (latents, labels) -> pixel logits
    iw_nll: Optional[Callable[..., torch.Tensor]] = None  # the importance-weighted -log p(x); see gaussian.VAE
    latent_size: Optional[int] = None  # of the continuous latent space that encode and decode use
    num_classes: Optional[int] = None  # a conditional model's classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def noise_shape(self, k: int) -> tuple[int, ...]:
        """The per-image noise ``forward`` takes when trained with ``k`` importance samples
        (() for none); refuses (ConfigError) a ``k`` the family has no objective for."""
        return ()

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor], *, kl_weight: float = 1.0,
                labels: Optional[torch.Tensor] = None) -> Output:
        """x: (B, C, H, W) in [0, 1], the config's image_shape; noise: (B, *noise_shape(k)), drawn by the caller."""
        raise NotImplementedError

    def summarise(self, features: torch.Tensor) -> dict[str, Any]:
        """Metrics of the whole test set from every image's features (valid/<name>)."""
        return {}

    def sample(self, n: int, generator: torch.Generator, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """n mean images (n, C, H, W) in [0, 1] from the prior; the same generator, the same images."""
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Each image's mean reconstruction, (B, C, H, W) in [0, 1], without sampling noise."""
        raise NotImplementedError

    def fit_prior(self, batches: Iterable[torch.Tensor]) -> None:
        """Fit what the prior learns from the training set (every rank, every epoch end, the
        same images and weights: the same result); a fixed prior has nothing to fit."""


def reconstruction(logits: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """-log p(x|z) per image, summed over pixels and channels: (B, C, H, W) -> (B,), in float32. bce: Bernoulli on the
    logits (each value in [0, 1], grey or colour); mse: unit-variance Gaussian around sigmoid(logits), less the
    constant C*H*W * log(sqrt(2 pi)) (no gradient)."""
    logits = logits.float()  # kind is the config's loss.recon_loss, "bce" or "mse"
    per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none") if kind == "bce" else \
        0.5 * (torch.sigmoid(logits) - x).pow(2)
    return per_pixel.flatten(1).sum(dim=1)


def quarter_grid(config: ModelConfig) -> tuple[int, int]:
    """The (H/4, W/4) grid of a conv family's two stride-2 layers, whose mirror doubles it back to (H, W) exactly;
    a ConfigError naming the shape where the sides are not multiples of 4."""
    c, h, w = config.image_shape
    if h % 4 or w % 4:
        raise ConfigError(f"--model {config.kind} takes images whose sides are multiples of 4 (two stride-2 layers); "
                          f"these are {c}x{h}x{w}")
    return h // 4, w // 4
