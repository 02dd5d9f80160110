"""What a trained VAE can show: samples from the prior, reconstructions, latent walks.

Pure functions of a model and tensors: no files, no CLI, no global RNG. Each runs under
``torch.no_grad`` with the model in eval mode (its previous mode is restored afterwards)
and returns mean images, ``sigmoid(decoder logits)``, as float32 CPU tensors shaped
(N, 1, 28, 28) with values in [0, 1].
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

from vae_dist.errors import VaeDistError
from vae_dist.models.protocol import Model

F = TypeVar("F", bound=Callable[..., torch.Tensor])


def _inference(fn: F) -> F:
    """no_grad + eval mode for the call, then the model's previous mode back."""

    @functools.wraps(fn)
    def wrapper(model: Model, *args, **kwargs):  # type: ignore[no-untyped-def]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return wrapper  # type: ignore[return-value]


def _means(model: Model, z: torch.Tensor) -> torch.Tensor:
    if model.decode is None:
        raise VaeDistError(f"this model ({type(model).__name__}) has no continuous latent space to decode")
    return torch.sigmoid(model.decode(z.to(next(model.parameters()).device)).float()).cpu()


def _posterior_means(model: Model, images: torch.Tensor) -> torch.Tensor:
    if model.encode is None:
        raise VaeDistError(f"this model ({type(model).__name__}) has no continuous latent space to encode into")
    return model.encode(images.float().to(next(model.parameters()).device))[0]


@_inference
def decode(model: Model, z: torch.Tensor) -> torch.Tensor:
    """The mean images of latents ``z`` (N, latent)."""
    return _means(model, z)


@_inference
def prior_samples(model: Model, n: int, seed: int) -> torch.Tensor:
    """``n`` samples of the model's prior from a generator seeded with ``seed``: the same
    model and seed give the identical tensor."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return model.sample(n, torch.Generator().manual_seed(seed))


@_inference
def reconstructions(model: Model, images: torch.Tensor) -> torch.Tensor:
    """Each of the (N, 1, 28, 28) images in [0, 1] reconstructed without sampling noise."""
    return model.reconstruct(images)


@_inference
def interpolate(model: Model, x_from: torch.Tensor, x_to: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` decodings at evenly spaced points on the straight line from the posterior
    mean of the (1, 28, 28) image ``x_from`` to that of ``x_to``, both ends included."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two ends), got {steps}")
    ends = _posterior_means(model, torch.stack([x_from, x_to]))
    t = torch.linspace(0.0, 1.0, steps, device=ends.device, dtype=ends.dtype).unsqueeze(1)
    return _means(model, (1 - t) * ends[0] + t * ends[1])


def manifold_grid(n_per_side: int) -> torch.Tensor:
    """The (n*n, 2) latent points of the manifold picture, row-major: rows run from high
    to low z2 (top to bottom), columns from low to high z1. The coordinates are the
    standard normal quantiles of an even grid in (0, 1), as in Kingma & Welling (2014)."""
    if n_per_side < 1:
        raise ValueError(f"n_per_side must be >= 1, got {n_per_side}")
    u = torch.linspace(0.05, 0.95, n_per_side) if n_per_side > 1 else torch.tensor([0.5])
    q = torch.distributions.Normal(0.0, 1.0).icdf(u)
    z2, z1 = torch.meshgrid(q.flip(0), q, indexing="ij")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=1)


@_inference
def manifold(model: Model, n_per_side: int) -> torch.Tensor:
    """Decodings over an n x n grid of the 2-D latent space (see ``manifold_grid``)."""
    if model.latent_size != 2:
        raise VaeDistError(
            f"a manifold picture needs a model with a 2-dimensional latent space; this one has "
            f"{model.latent_size} (train one with --latent-size 2)"
        )
    return _means(model, manifold_grid(n_per_side))
