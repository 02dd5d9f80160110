"""Binarized MNIST as the literature uses it: each pixel is 1 with probability its grey level.

The coins for a split are one table per (seed, stream), row i for sample i, drawn from a
generator keyed by those two numbers on the CPU: the same bits on any device, at any
process count and after a resume. ``dynamic`` training draws a fresh table each epoch
(the stream is the epoch); ``static`` binarizes the training set once. Evaluation always
uses one fixed binarization of the test set (TEST_SEED, TEST_STREAM: the same in every run
whatever its seed), so numbers of different runs are comparable.
"""

from __future__ import annotations

import torch

from vae_dist import noise

# Its own purpose, so these coins share no stream with the shuffle or the noise.
BINARIZE = "binarize"
TEST_SEED = 0
TEST_STREAM = 1 << 40
STATIC_STREAM = 1 << 41
LEVELS = 255  # grey levels are k/255, k = 0..255


def coins(seed: int, stream: int, n: int) -> torch.Tensor:
    """(n, 1, 28, 28) int16 uniform on 0..254: pixel k/255 is on iff its coin < k, which
    happens with probability exactly k/255."""
    return torch.randint(0, LEVELS, (n, 1, 28, 28), dtype=torch.int16, generator=noise.generator(BINARIZE, seed, stream))


def apply(images: torch.Tensor, coin: torch.Tensor) -> torch.Tensor:
    """images: grey levels in [0, 1] (any float dtype) -> 0/1 of the same dtype."""
    return (coin < torch.round(images * LEVELS)).to(images.dtype)


def binarize_split(images_u8: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """A whole uint8 split (N, 1, 28, 28) binarized once, as uint8 0/255."""
    return (coins(seed, stream, images_u8.shape[0]) < images_u8.to(torch.int16)).to(torch.uint8) * 255


def train_stream(epoch: int) -> int:
    """The stream of an epoch's dynamic binarization: a fresh draw each epoch."""
    return epoch + 1


def protocol(mode: str) -> dict[str, object]:
    """What a reported number was measured on; recorded wherever the number is."""
    if mode == "none":
        return {"data": "grey-level MNIST (pixel/255) with a Bernoulli likelihood"}
    return {
        "data": f"binarized MNIST, training binarization {mode}",
        "test_binarization": f"one fixed Bernoulli draw of the 10,000 test images (seed {TEST_SEED})",
    }
