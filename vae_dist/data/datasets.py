"""Datasets kept as MNIST's four IDX files: their table, bounded reads, the download. A split is one uint8 tensor;
its header (magic, the row's count, a bounded image size) is checked before the body is read, and nothing past that
size is read or inflated: a forged header, a gzip bomb or an endless device fails as fast as a short file. torch is
imported where used: config reads the table."""

from __future__ import annotations

import gzip
import importlib
import math
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple

from vae_dist.errors import DataError, first_line
from vae_dist.run.fileio import checking

if TYPE_CHECKING:
    import torch


class IdxDataset(NamedTuple):
    """A row: torchvision's class of this name downloads the files (checking its pinned checksums), lays them out
    under ``<name>/raw/`` and names the classes."""
    torchvision: str
    train: int = 60000  # items per split: a header must give exactly this, which bounds every read
    test: int = 10000
    classes: int = 10


# Adding an IDX dataset is one row: the key is its --dataset value.
DATASETS = {"mnist": IdxDataset("MNIST"), "fashion-mnist": IdxDataset("FashionMNIST"), "kmnist": IdxDataset("KMNIST")}
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
MAX_SIDE = 1024  # an image's rows and columns, checked before any body is read
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# What reading a damaged file (or gzip stream) raises: all become one DataError line.
READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError)
# The data folder when none is given (config.DataConfig; else the download), and the tests' and benchmarks'.
DATA_DIR_ENV = "VAE_DIST_DATA_DIR"


def default_data_dir() -> Path:
    """The data folder for tests and benchmarks: $VAE_DIST_DATA_DIR, else ../shared/mnist."""
    return Path(os.environ.get(DATA_DIR_ENV, Path(__file__).resolve().parents[2].parent / "shared" / "mnist"))


def find_idx_files(data_dir: Path, name: str, dataset: str = "mnist") -> list[Path]:
    """Every copy of ``name`` (or ``name.gz``) directly in ``data_dir`` or under ``<TorchvisionName>/raw/``."""
    raw = data_dir / DATASETS[dataset].torchvision / "raw"
    found = []
    for candidate in (folder / file for folder in (data_dir, raw) for file in (name, f"{name}.gz")):
        with checking(candidate, DataError, f"{dataset} file"):
            if candidate.is_file():
                found.append(candidate)
    if not found:
        raise DataError(f"{dataset} file {name}(.gz) not found in {data_dir} (looked there and in {raw})")
    return found


def _read_at_most(f: BinaryIO, n: int) -> bytearray:
    """Up to ``n`` bytes (fewer only at the stream's end), in chunks: a forged size costs what the stream holds."""
    buf = bytearray()
    while len(buf) < n and (chunk := f.read(min(n - len(buf), 1 << 24))):
        buf += chunk
    return buf


def read_idx(path: Path, magic: int, count: int, dataset: str = "mnist") -> torch.Tensor:
    """The ``count`` items of an IDX file: images (count, 1, rows, cols) of its header's size, or labels (count,) below
    the dataset's number of classes. Checked by header and size, not by checksum (a local copy need not be
    byte-identical to the official gzip); at most one byte past that size is read."""
    import torch

    ndim, what = 3 if magic == IMAGE_MAGIC else 1, f"{dataset} file {path}"
    try:
        with gzip.open(path, "rb") if Path(path).suffix == ".gz" else open(path, "rb") as f:
            header = _read_at_most(f, 4 * (1 + ndim))
            if len(header) < 4 * (1 + ndim):
                raise DataError(f"{what} is truncated: {len(header)} bytes, shorter than its header")
            got, n, *shape = struct.unpack(f">{1 + ndim}I", header)
            if got != magic:
                raise DataError(f"{what} is not an IDX file of this kind (magic {got}, expected {magic})")
            if not all(1 <= side <= MAX_SIDE for side in shape):
                raise DataError(f"{what} holds {shape[0]}x{shape[1]} images; each side must be 1 to {MAX_SIDE} pixels")
            if n != count:
                raise DataError(f"{what} holds {n} items, expected {count}")
            size = count * math.prod(shape)
            body = _read_at_most(f, size)
            if len(body) < size:
                raise DataError(f"{what} is truncated: {len(header) + len(body)} bytes, expected {len(header) + size}")
            if f.read(1):
                raise DataError(f"{what} is padded: longer than the {len(header) + size} bytes its header gives")
    except READ_ERRORS as e:
        raise DataError(f"{what} cannot be read ({type(e).__name__}: {first_line(e) or type(e).__name__})") from None
    items, classes = torch.frombuffer(body, dtype=torch.uint8), DATASETS[dataset].classes
    if shape:
        return items.view(count, 1, *shape)
    if len(wrong := (items >= classes).nonzero()):
        i = int(wrong[0])
        raise DataError(f"{what} holds label {int(items[i])} at item {i}: its {classes} classes are 0 to {classes - 1}")
    return items


class Split(NamedTuple):
    images: torch.Tensor  # (N, 1, rows, cols) uint8, the size the file gives
    labels: torch.Tensor  # (N,) uint8, each below the dataset's number of classes


def load_split(data_dir: str | Path, split: str, dataset: str = "mnist") -> Split:
    """Read one split ('train' or 'test') of ``dataset`` from a folder of IDX files."""
    data_dir = Path(data_dir).expanduser()
    with checking(data_dir, DataError, "data directory"):
        if not data_dir.is_dir():
            what = "is not a directory" if data_dir.exists() else "does not exist"
            raise DataError(f"data directory {data_dir} {what}")
    count = getattr(DATASETS[dataset], split)
    return Split(*(_read_copies(find_idx_files(data_dir, name, dataset), magic, count, dataset)
                   for name, magic in zip(FILES[split], (IMAGE_MAGIC, LABEL_MAGIC))))


def _read_copies(paths: list[Path], magic: int, count: int, dataset: str) -> torch.Tensor:
    """The items of the first copy, refused unless every other copy holds the same: torchvision's download keeps
    the .gz beside the file it extracts, and a stale copy beside a newer one must not be read in its place."""
    import torch

    items = read_idx(paths[0], magic, count, dataset)
    for other in paths[1:]:
        if not torch.equal(read_idx(other, magic, count, dataset), items):
            raise DataError(f"{dataset} files {paths[0]} and {other} differ; remove the one that should not be read")
    return items


def torchvision_class(dataset: str) -> Any:  # imported here: torchvision costs most of a second
    return getattr(importlib.import_module("torchvision.datasets"), DATASETS[dataset].torchvision)


def download(cache_dir: str | Path, dataset: str = "mnist") -> Path:
    """Download ``dataset`` through torchvision (checksummed); the folder to read. On one process while the others
    wait (trainer.data_dir_for): torchvision writes in place."""
    root = Path(cache_dir).expanduser()
    try:
        for train in (True, False):
            torchvision_class(dataset)(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError offline
        raise DataError(f"could not download {dataset} into {root} ({type(e).__name__}: {first_line(e)}); "
                        "with no network, point --data-dir at a folder holding its four IDX files") from None
    return root / DATASETS[dataset].torchvision / "raw"
