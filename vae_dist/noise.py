"""Reparameterisation noise keyed by (seed, epoch, sample index).

Each sample's noise is a row of a table drawn from a generator seeded by (seed, epoch),
indexed by the sample's position in the dataset. So the noise a sample gets does not
depend on the batch it lands in, the rank that holds it, the process count, or whether
the run was resumed: the same samples in the same global step get the same noise, which
is what makes N processes with batch b follow one process with batch N*b.
"""

from __future__ import annotations

import hashlib

import torch

# Each use of randomness has its own stream: a generator seeded from a hash of
# (purpose, seed, epoch), so that no two purposes (the data order of one epoch and the
# noise of another, say) ever draw from one sequence.
SHUFFLE, TRAIN_NOISE, EVAL_NOISE = "shuffle", "train-noise", "eval-noise"


def stream_seed(purpose: str, seed: int, index: int = 0) -> int:
    """A 63-bit generator seed, a pure function of (purpose, seed, index)."""
    digest = hashlib.sha256(f"vae_dist/{purpose}/{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generator(purpose: str, seed: int, index: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(purpose, seed, index))


def train_noise(seed: int, epoch: int, num_samples: int, latent: int) -> torch.Tensor:
    """(num_samples, latent) standard normal noise for one training epoch, on the CPU."""
    return torch.randn(num_samples, latent, generator=generator(TRAIN_NOISE, seed, epoch))


def eval_noise(seed: int, num_samples: int, latent: int) -> torch.Tensor:
    """(num_samples, latent) noise for validation: the same every epoch and in `evaluate`,
    so validation losses of different epochs and of the saved model are comparable."""
    return torch.randn(num_samples, latent, generator=generator(EVAL_NOISE, seed))
