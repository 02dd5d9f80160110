"""MNIST as in-memory tensors: IDX parsing, the download, the dataset and the loaders.

The whole split is one uint8 tensor (47 MB for the training set), and a batch is one
vectorised index into it (``__getitems__``), so feeding the model costs a gather and a
divide instead of 64 PIL conversions. Nothing here knows about ranks: Accelerate shards
the loaders this module builds.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vae_dist.errors import DataError

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE = 28
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
# Where tests, benchmarks and smoke runs find the offline copy (see README).
DATA_DIR_ENV = "VAE_DIST_DATA_DIR"


def default_data_dir() -> Path:
    """The data folder for tests and benchmarks: $VAE_DIST_DATA_DIR, else ../shared/mnist."""
    return Path(os.environ.get(DATA_DIR_ENV, Path(__file__).resolve().parents[1].parent / "shared" / "mnist"))


def find_idx_file(data_dir: Path, name: str) -> Path:
    """Find ``name`` (or ``name.gz``) directly in ``data_dir`` or under ``MNIST/raw/``."""
    for folder in (data_dir, data_dir / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(
        f"MNIST file {name}(.gz) not found in {data_dir} (looked there and in {data_dir / 'MNIST' / 'raw'})"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"MNIST file {path} cannot be read: {e}") from None


def read_idx(path: Path, magic: int, count: Optional[int] = None) -> torch.Tensor:
    """Parse an IDX file, checking the header instead of a checksum.

    A local copy need not be byte-identical to the official gzip (see the shared copy's
    README), so the header, shape and size are the test of "is this MNIST".
    """
    raw = _read_bytes(path)
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"MNIST file {path} is truncated: {len(raw)} bytes, shorter than its header")
    dims = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(dims[0]) != magic:
        raise DataError(f"MNIST file {path} is not an IDX file of this kind (magic {int(dims[0])}, expected {magic})")
    n = int(dims[1])
    if ndim == 3 and (int(dims[2]), int(dims[3])) != (SIDE, SIDE):
        raise DataError(f"MNIST file {path} holds {int(dims[2])}x{int(dims[3])} images, expected 28x28")
    if count is not None and n != count:
        raise DataError(f"MNIST file {path} holds {n} items, expected {count}")
    expected = header + n * (SIDE * SIDE if ndim == 3 else 1)
    if len(raw) != expected:
        raise DataError(f"MNIST file {path} is truncated or padded: {len(raw)} bytes, expected {expected}")
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    t = torch.from_numpy(data.copy())
    return t.view(n, 1, SIDE, SIDE) if ndim == 3 else t


@dataclass
class MnistSplit:
    images: torch.Tensor  # (N, 1, 28, 28) uint8
    labels: torch.Tensor  # (N,) uint8


def load_split(data_dir: str | Path, split: str) -> MnistSplit:
    """Read one split ('train' or 'test') from a folder of IDX files."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    image_name, label_name, count = FILES[split]
    images = read_idx(find_idx_file(data_dir, image_name), IMAGE_MAGIC, count)
    labels = read_idx(find_idx_file(data_dir, label_name), LABEL_MAGIC, count)
    return MnistSplit(images, labels)


def download(cache_dir: str | Path) -> Path:
    """Download MNIST through torchvision (checksummed) and return the folder to read.

    Call it on one process while the others wait (see learner.prepare_data): torchvision
    writes straight to the final paths, so a concurrent reader can see half a file.
    """
    root = Path(cache_dir).expanduser()
    try:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError offline
        raise DataError(
            f"could not download MNIST into {root} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "with no network, point --data-dir at a folder holding the four MNIST IDX files"
        ) from None
    return root / "MNIST" / "raw"


class MnistImages(Dataset):
    """Images of one split as a single tensor; a batch is one vectorised index.

    Items are ``(image, index)``: the sample's index keys its reparameterisation noise,
    which is what makes a sample's noise independent of the rank that holds it.
    """

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.images.is_cuda:
            # A copy from pinned memory is asynchronous; from pageable memory it would wait
            # for every kernel already queued, i.e. a host sync on every step.
            idx = idx.pin_memory().to(self.images.device, non_blocking=True)
        # uint8 -> [0, 1] here, on whatever device the tensor lives on. index_select, not
        # images[idx]: the general indexing kernel takes twice as long on the CPU (2-core
        # machine, 128 rows: 53 vs 26 us with the conversion).
        batch = self.images.index_select(0, idx).float().div_(255.0)
        return batch, idx


def passthrough_collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``__getitems__`` already returns a stacked batch; the default collate would re-split it."""
    return batch


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch).

    Every rank draws the same permutation, so Accelerate's batch sharding gives disjoint
    shards; and the order of any epoch can be rebuilt on resume without saved RNG state.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def make_loader(
    dataset: MnistImages,
    batch_size: int,
    *,
    shuffle_seed: Optional[int],
    drop_last: bool,
    num_workers: int,
    worker_init_fn: Optional[Callable[[int], None]] = None,
) -> DataLoader:
    """A DataLoader over ``dataset``; shuffled by EpochShuffleSampler when a seed is given."""
    sampler = EpochShuffleSampler(len(dataset), shuffle_seed) if shuffle_seed is not None else None
    # An explicit generator: without one, creating each iterator draws a seed from the
    # global RNG, which would shift every random number drawn after it.
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=passthrough_collate,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init_fn,
        generator=generator,
    )
