"""The in-memory dataset, its epoch-keyed sampler and the loaders; Accelerate shards them. A split is one float
tensor and a batch one vectorised index into it: feeding the model costs one gather, not a per-sample conversion."""

from __future__ import annotations

import signal
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vae_dist.data import keyed
from vae_dist.errors import ConfigError
from vae_dist.training.distributed import STOP_SIGNALS


class MnistImages(Dataset):
    """Items are ``(image, index)``: the index keys the sample's noise, whatever rank holds it, and gives its label
    (``labels[index]``, kept beside the images; None unless the model is conditional)."""

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        self.images = images.float().div_(255.0) if images.dtype == torch.uint8 else images
        self.labels = None if labels is None else labels.long().to(self.images.device)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.images.is_cuda:
            # A copy from pinned memory is asynchronous; from pageable memory it waits for every queued kernel.
            idx = idx.pin_memory().to(self.images.device, non_blocking=True)
        # index_select, not images[idx]: the general indexing kernel is twice as slow on the CPU.
        return self.images.index_select(0, idx), idx


def passthrough_collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``__getitems__`` already returns a stacked batch; the default collate would re-split it."""
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A permutation of (seed, epoch) alone: every rank draws the same one, so Accelerate's sharding gives disjoint
    shards, and a resume rebuilds any epoch's order without RNG state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = keyed.generator(keyed.SHUFFLE, self.seed, self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker's init. A stop reaches the whole process group (Ctrl-C, ``kill -TERM -<pgid>``):
    a worker killed by it would end the run in a DataLoader error before the main process checkpoints."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def check_batch_fits(num_train: int, batch_size: int, num_processes: int) -> None:
    """At least one optimizer step per epoch (drop_last: a partial global batch is dropped)."""
    if num_train // (batch_size * num_processes) == 0:
        raise ConfigError(f"the training set is smaller than one global batch ({batch_size} x {num_processes}"
                          f" processes > {num_train} images); lower --batch-size or raise --limit-train-samples")


def make_loader(dataset: MnistImages, batch_size: int, *, shuffle_seed: Optional[int], drop_last: bool,
                num_workers: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, drop_last=drop_last, num_workers=num_workers, collate_fn=passthrough_collate,
        sampler=EpochShuffleSampler(len(dataset), shuffle_seed) if shuffle_seed is not None else None,
        persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        # Its own generator: else each new iterator draws a seed from the global RNG, shifting every later draw.
        generator=torch.Generator().manual_seed(0))
