"""MNIST as in-memory tensors: IDX parsing, the download, the dataset and the loaders.

The whole split is one uint8 tensor (47 MB for the training set), and a batch is one
vectorised index into it (``__getitems__``), so feeding the model costs a gather and a
divide instead of 64 PIL conversions. Nothing here knows about ranks: Accelerate shards
the loaders this module builds.
"""

from __future__ import annotations

import gzip
import os
import signal
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vae_dist.errors import ConfigError, DataError
from vae_dist import noise

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE = 28
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
# Without an expected count, an IDX header may claim at most this many items: a forged
# header must not make the reader allocate (or inflate) gigabytes.
MAX_ITEMS = 1_000_000
READ_CHUNK = 1 << 20
# What reading a damaged file (or gzip stream) raises: all become one DataError line.
READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError)
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


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _read_exactly(f: BinaryIO, n: int) -> bytearray:
    """Up to ``n`` bytes (fewer only at the end of the stream), read in bounded chunks."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got : got + READ_CHUNK])  # type: ignore[attr-defined]
        if not k:
            break
        got += k
    del view
    del buf[got:]
    return buf


def _parse_header(path: Path, header: bytes, magic: int, ndim: int, count: Optional[int]) -> int:
    """The item count the header gives, after checking it against what is expected."""
    if len(header) < 4 * (1 + ndim):
        raise DataError(f"MNIST file {path} is truncated: {len(header)} bytes, shorter than its header")
    dims = np.frombuffer(bytes(header), dtype=">u4", count=1 + ndim)
    if int(dims[0]) != magic:
        raise DataError(f"MNIST file {path} is not an IDX file of this kind (magic {int(dims[0])}, expected {magic})")
    n = int(dims[1])
    if ndim == 3 and (int(dims[2]), int(dims[3])) != (SIDE, SIDE):
        raise DataError(f"MNIST file {path} holds {int(dims[2])}x{int(dims[3])} images, expected 28x28")
    if count is not None and n != count:
        raise DataError(f"MNIST file {path} holds {n} items, expected {count}")
    if n > MAX_ITEMS:
        raise DataError(f"MNIST file {path} claims {n} items, more than the {MAX_ITEMS} an IDX file here may hold")
    return n


def _read_idx_bytes(path: Path, magic: int, ndim: int, count: Optional[int]) -> tuple[int, bytearray]:
    """(items, body bytes) of an IDX file. The header is checked before the body is read,
    and never more than one byte past the size the header gives is read (or inflated),
    so a gzip bomb or an endless stream fails as fast as a short file."""
    header = 4 * (1 + ndim)
    with _open(path) as f:
        n = _parse_header(path, _read_exactly(f, header), magic, ndim, count)
        expected = n * (SIDE * SIDE if ndim == 3 else 1)
        body = _read_exactly(f, expected)
        if len(body) < expected:
            raise DataError(
                f"MNIST file {path} is truncated: {header + len(body)} bytes, expected {header + expected}"
            )
        if f.read(1):
            raise DataError(f"MNIST file {path} is padded: longer than the {header + expected} bytes its header gives")
    return n, body


def read_idx(path: Path, magic: int, count: Optional[int] = None) -> torch.Tensor:
    """Parse an IDX file, checking the header instead of a checksum.

    A local copy need not be byte-identical to the official gzip (see the shared copy's
    README), so the header, shape and size are the test of "is this MNIST".
    """
    ndim = 3 if magic == IMAGE_MAGIC else 1
    try:
        n, body = _read_idx_bytes(Path(path), magic, ndim, count)
    except READ_ERRORS as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"MNIST file {path} cannot be read ({type(e).__name__}: {text})") from None
    t = torch.frombuffer(body, dtype=torch.uint8) if body else torch.zeros(0, dtype=torch.uint8)
    return t.view(n, 1, SIDE, SIDE) if ndim == 3 else t


@dataclass
class MnistSplit:
    images: torch.Tensor  # (N, 1, 28, 28) uint8
    labels: torch.Tensor  # (N,) uint8


def load_split(data_dir: str | Path, split: str) -> MnistSplit:
    """Read one split ('train' or 'test') from a folder of IDX files."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise DataError(f"data directory {data_dir} {what}")
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
    """A permutation that depends only on (seed, epoch), from its own random stream.

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
        g = noise.generator(noise.SHUFFLE, self.seed, self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def ignore_stop_signals() -> None:
    """SIGTERM and SIGINT do nothing in a loader worker.

    A stop (``kill -TERM -<pgid>``, Ctrl-C in the terminal) reaches the whole process
    group: a worker that died of it would end the run in a DataLoader error before the
    main process could checkpoint. The main process stops them itself when it exits."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


class _WorkerInit:
    """worker_init_fn: ignore stop signals, then the caller's own init (picklable, for
    the spawn start method)."""

    def __init__(self, user: Optional[Callable[[int], None]]):
        self.user = user

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()
        if self.user is not None:
            self.user(worker_id)


def check_batch_fits(num_train: int, batch_size: int, num_processes: int) -> None:
    """At least one optimizer step per epoch (drop_last: a partial global batch is dropped)."""
    if num_train // (batch_size * num_processes) == 0:
        raise ConfigError(
            f"the training set is smaller than one global batch ({batch_size} x {num_processes}"
            f" processes > {num_train} images); lower --batch-size or raise --limit-train-samples"
        )


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
        worker_init_fn=_WorkerInit(worker_init_fn) if num_workers > 0 else worker_init_fn,
        generator=generator,
    )
