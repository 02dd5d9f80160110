"""Reparameterisation noise keyed by (seed, epoch, sample index).

Each sample's noise is a row of a table drawn from a generator seeded by (seed, epoch),
indexed by the sample's position in the dataset. So the noise a sample gets does not
depend on the batch it lands in, the rank that holds it, the process count, or whether
the run was resumed: the same samples in the same global step get the same noise, which
is what makes N processes with batch b follow one process with batch N*b.
"""

from __future__ import annotations

import torch

# Keeps the evaluation stream apart from every training epoch's.
_EVAL_STREAM = 0x5EED_E7A1


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (2**63))


def train_noise(seed: int, epoch: int, num_samples: int, latent: int) -> torch.Tensor:
    """(num_samples, latent) standard normal noise for one training epoch, on the CPU."""
    return torch.randn(num_samples, latent, generator=_generator(seed, epoch + 1))


def eval_noise(seed: int, num_samples: int, latent: int) -> torch.Tensor:
    """(num_samples, latent) noise for validation: the same every epoch and in `evaluate`,
    so validation losses of different epochs and of the saved model are comparable."""
    return torch.randn(num_samples, latent, generator=_generator(seed, _EVAL_STREAM))
