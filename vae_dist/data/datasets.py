"""The dataset table (MNIST's four IDX files, or your own images as NumPy files), bounded reads, the download. A split
is one uint8 tensor; its file's header (magic, the count, a bounded image size) is checked before the body is read,
and nothing past that size is read or inflated: a forged header, a gzip bomb or an endless device fails as fast as a
short file. torch and numpy are imported where used: config reads the table."""

from __future__ import annotations

import gzip
import importlib
import io
import math
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple, Optional

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

    def read(self, data_dir: Path, split: str, dataset: str) -> Split:
        """Each file's first copy, refused unless every other copy holds the same: torchvision's download keeps the
        .gz beside the file it extracts, and a stale copy beside a newer one must not be read in its place."""
        import torch

        count, items = getattr(self, split), []
        for name, magic in zip(FILES[split], (IMAGE_MAGIC, LABEL_MAGIC)):
            first, *others = find_idx_files(data_dir, name, dataset)
            items.append(read_idx(first, magic, count, dataset))
            for other in others:
                if not torch.equal(read_idx(other, magic, count, dataset), items[-1]):
                    raise DataError(f"{dataset} files {first} and {other} differ; "
                                    "remove the one that should not be read")
        return Split(*items, self.classes)


class NpyDataset(NamedTuple):
    """A row of images kept as NumPy files in --data-dir: ``train.npy`` and ``test.npy``, uint8 shaped (N, H, W) or
    (N, C, H, W) with C = 1 (grey) or 3 (colour), each with an optional ``<split>_labels.npy`` of N integers."""
    torchvision: None = None  # no download: --data-dir only
    test: None = None  # the files give the counts

    def read(self, data_dir: Path, split: str, dataset: str) -> Split:
        images = read_npy(data_dir / f"{split}.npy", dataset)
        path = data_dir / f"{split}_labels.npy"
        with checking(path, DataError, f"{dataset} file"):
            if not path.exists():
                return Split(images)
        labels = read_npy(path, dataset, count=images.shape[0])
        return Split(images, labels, int(labels.max()) + 1)


# Adding a dataset is one row: the key is its --dataset value.
DATASETS = {"mnist": IdxDataset("MNIST"), "fashion-mnist": IdxDataset("FashionMNIST"), "kmnist": IdxDataset("KMNIST"),
            "npy": NpyDataset()}
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
MAX_SIDE = 1024  # an image's rows and columns, checked before any body is read
CHANNELS = (1, 3)  # grey or colour
MAX_CLASSES = 1000  # an npy label is 0 to MAX_CLASSES - 1
MAX_NPY_HEADER = 10_000  # bytes: numpy's own bound on a header it parses
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


def read_npy(path: Path, dataset: str, count: Optional[int] = None) -> torch.Tensor:
    """A .npy file's uint8 images as (N, C, H, W), or with ``count`` its ``count`` integer labels (int64). No pickle
    and no memory map: the header (at most MAX_NPY_HEADER bytes, parsed by numpy's own reader) must give a plain
    numeric array of a bounded shape, and the file exactly the size it gives, before the body is read."""
    import numpy as np
    import torch

    what = f"{dataset} file {path}"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # before the open, which would wait for a FIFO's writer for ever
            raise DataError(f"{what} is not a regular file")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            length = _read_at_most(f, 2 if version == (1, 0) else 4)  # the header's length field
            if (n := int.from_bytes(length, "little")) > MAX_NPY_HEADER:
                raise DataError(f"{what} is not a NumPy array file: its header claims {n} bytes")
            header = io.BytesIO(bytes(length + _read_at_most(f, n)))
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(header)
            if count is None and (dtype != np.uint8 or len(shape) not in (3, 4)):
                raise DataError(f"{what} holds {dtype} {list(shape)}: images must be uint8 shaped (N, H, W) or "
                                "(N, C, H, W)")
            if count is not None and (dtype.kind not in "iu" or shape != (count,)):
                raise DataError(f"{what} holds {dtype} {list(shape)}: labels must be {count} integers, one per image")
            if count is None and not (shape[0] >= 1 and (len(shape) == 3 or shape[1] in CHANNELS)
                                      and all(1 <= side <= MAX_SIDE for side in shape[-2:])):
                raise DataError(f"{what} holds images shaped {list(shape)}: it needs at least one image, "
                                f"{' or '.join(map(str, CHANNELS))} channels (channels first) and sides of 1 to "
                                f"{MAX_SIDE} pixels")
            size = math.prod(shape) * dtype.itemsize
            if (got := os.fstat(f.fileno()).st_size - f.tell()) != size:
                problem = "truncated" if got < size else "padded"
                raise DataError(f"{what} is {problem}: its body is {got} bytes where its header gives {size}")
            body = _read_at_most(f, size)
    except READ_ERRORS as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{what} not found") from None
        raise DataError(f"{what} cannot be read ({type(e).__name__}: {first_line(e) or type(e).__name__})") from None
    array = np.frombuffer(body, dtype=dtype, count=math.prod(shape)).reshape(shape, order="F" if fortran else "C")
    if count is None:
        images = torch.from_numpy(np.ascontiguousarray(array))
        return images.unsqueeze(1) if images.dim() == 3 else images
    if len(wrong := np.flatnonzero((array < 0) | (array >= MAX_CLASSES))):
        i = int(wrong[0])
        raise DataError(f"{what} holds label {array[i]} at item {i}: labels are 0 to {MAX_CLASSES - 1}")
    return torch.from_numpy(array.astype(np.int64))


class Split(NamedTuple):
    images: torch.Tensor  # (N, C, rows, cols) uint8, the size the file gives
    labels: Optional[torch.Tensor] = None  # (N,) integers, each below ``classes``; None: the dataset has none
    classes: Optional[int] = None


def load_split(data_dir: str | Path, split: str, dataset: str = "mnist") -> Split:
    """Read one split ('train' or 'test') of ``dataset`` from a folder of its files."""
    data_dir = Path(data_dir).expanduser()
    with checking(data_dir, DataError, "data directory"):
        if not data_dir.is_dir():
            what = "is not a directory" if data_dir.exists() else "does not exist"
            raise DataError(f"data directory {data_dir} {what}")
    return DATASETS[dataset].read(data_dir, split, dataset)


def torchvision_class(dataset: str) -> Any:  # imported here: torchvision costs most of a second
    return getattr(importlib.import_module("torchvision.datasets"), DATASETS[dataset].torchvision)


def download(cache_dir: str | Path, dataset: str = "mnist") -> Path:
    """Download ``dataset`` through torchvision (checksummed); the folder to read. On one process while the others
    wait (trainer.load_images): torchvision writes in place."""
    if DATASETS[dataset].torchvision is None:
        raise DataError(f"--dataset {dataset} has no download: give --data-dir, the folder holding its files")
    root = Path(cache_dir).expanduser()
    try:
        for train in (True, False):
            torchvision_class(dataset)(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError offline
        raise DataError(f"could not download {dataset} into {root} ({type(e).__name__}: {first_line(e)}); "
                        "with no network, point --data-dir at a folder holding its four IDX files") from None
    return root / DATASETS[dataset].torchvision / "raw"
