"""Randomness keyed by (purpose, seed, epoch or stream, sample index): noise tables and binarization. A sample's
draw is row i of a table from a generator seeded by the key, so it does not depend on its batch, its rank, the
process count or a resume: N processes with batch b follow one with N*b."""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

# Each purpose has its own streams: no two ever draw from one sequence.
SHUFFLE, TRAIN_NOISE, EVAL_NOISE = "shuffle", "train-noise", "eval-noise"


def generator(purpose: str, seed: int, index: int = 0) -> torch.Generator:
    """A generator seeded with 63 bits, a pure function of (purpose, seed, index)."""
    digest = hashlib.sha256(f"vae_dist/{purpose}/{int(seed)}/{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def noise(purpose: str, seed: int, index: int, n: int, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """(n, *shape) standard normal noise on the CPU from the stream (purpose, seed, index), row i for sample i; None
    for a family that takes none (shape ()). Training draws a table per epoch (TRAIN_NOISE, index = epoch);
    validation one for every epoch and for `evaluate` (EVAL_NOISE, index 0): their losses compare."""
    return torch.randn(n, *shape, generator=generator(purpose, seed, index)) if shape else None


# --- binarization, as the literature uses it: a pixel is 1 with probability its grey level ---
# ``dynamic`` draws fresh coins each epoch (stream = epoch + 1), ``static`` binarizes the training
# set once; the test set is one fixed draw in every run whatever its seed, so runs compare.
BINARIZE = "binarize"
TEST_SEED, TEST_STREAM, STATIC_STREAM = 0, 1 << 40, 1 << 41
LEVELS = 255  # grey levels are k/255, k = 0..255


def coins(seed: int, stream: int, n: int, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    """(n, *shape) int16 uniform on 0..254: pixel k/255 is on iff its coin < k, with probability exactly k/255."""
    return torch.randint(0, LEVELS, (n, *shape), dtype=torch.int16, generator=generator(BINARIZE, seed, stream))


def apply(images: torch.Tensor, coin: torch.Tensor) -> torch.Tensor:
    """images: grey levels in [0, 1] (any float dtype) -> 0/1 of the same dtype."""
    return (coin < torch.round(images * LEVELS)).to(images.dtype)


def binarize_split(images_u8: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """A whole uint8 split (N, 1, H, W) binarized once, as uint8 0/255."""
    on = coins(seed, stream, images_u8.shape[0], tuple(images_u8.shape[1:])) < images_u8.to(torch.int16)
    return on.to(torch.uint8) * 255


def train_stream(epoch: int) -> int:
    return epoch + 1
