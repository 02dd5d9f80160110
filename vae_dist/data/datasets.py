"""MNIST's IDX files: finding them, reading them with bounded reads, and the download.

A split is read into one uint8 tensor. The header is checked against the split's known
size before the body is read, and nothing past that size is read (or inflated), so a
forged header, a gzip bomb or an endless device fails as fast as a short file.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from vae_dist.errors import DataError, first_line
from vae_dist.run.fileio import checking

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE = 28
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
# What reading a damaged file (or gzip stream) raises: all become one DataError line.
READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError)
# Where tests, benchmarks and smoke runs find the offline copy (see README).
DATA_DIR_ENV = "VAE_DIST_DATA_DIR"


def default_data_dir() -> Path:
    """The data folder for tests and benchmarks: $VAE_DIST_DATA_DIR, else ../shared/mnist."""
    return Path(os.environ.get(DATA_DIR_ENV, Path(__file__).resolve().parents[2].parent / "shared" / "mnist"))


def find_idx_file(data_dir: Path, name: str) -> Path:
    """Find ``name`` (or ``name.gz``) directly in ``data_dir`` or under ``MNIST/raw/``."""
    for folder in (data_dir, data_dir / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            with checking(candidate, DataError, "MNIST file"):
                found = candidate.is_file()
            if found:
                return candidate
    raise DataError(
        f"MNIST file {name}(.gz) not found in {data_dir} (looked there and in {data_dir / 'MNIST' / 'raw'})"
    )


def _read_at_most(f: BinaryIO, n: int) -> bytearray:
    """Up to ``n`` bytes (fewer only at the end of the stream)."""
    buf = bytearray(n)
    del buf[f.readinto(buf):]  # type: ignore[attr-defined]
    return buf


def _check_header(path: Path, header: bytes, magic: int, ndim: int, count: int) -> None:
    if len(header) < 4 * (1 + ndim):
        raise DataError(f"MNIST file {path} is truncated: {len(header)} bytes, shorter than its header")
    dims = [int(d) for d in np.frombuffer(bytes(header), dtype=">u4")]
    if dims[0] != magic:
        raise DataError(f"MNIST file {path} is not an IDX file of this kind (magic {dims[0]}, expected {magic})")
    if ndim == 3 and dims[2:] != [SIDE, SIDE]:
        raise DataError(f"MNIST file {path} holds {dims[2]}x{dims[3]} images, expected 28x28")
    if dims[1] != count:
        raise DataError(f"MNIST file {path} holds {dims[1]} items, expected {count}")


def read_idx(path: Path, magic: int, count: int) -> torch.Tensor:
    """The ``count`` items of an IDX file, checked by header, shape and size (and labels
    by value).

    Not by checksum: a local copy need not be byte-identical to the official gzip (see the
    shared copy's README). At most one byte past the size the header gives is read.
    """
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header, size = 4 * (1 + ndim), count * (SIDE * SIDE if ndim == 3 else 1)
    try:
        with gzip.open(path, "rb") if Path(path).suffix == ".gz" else open(path, "rb") as f:
            _check_header(path, _read_at_most(f, header), magic, ndim, count)
            body = _read_at_most(f, size)
            if len(body) < size:
                raise DataError(f"MNIST file {path} is truncated: {header + len(body)} bytes, expected {header + size}")
            if f.read(1):
                raise DataError(f"MNIST file {path} is padded: longer than the {header + size} bytes its header gives")
    except READ_ERRORS as e:
        text = first_line(e) or type(e).__name__
        raise DataError(f"MNIST file {path} cannot be read ({type(e).__name__}: {text})") from None
    t = torch.frombuffer(body, dtype=torch.uint8)
    if ndim == 3:
        return t.view(count, 1, SIDE, SIDE)
    wrong = (t > 9).nonzero()
    if len(wrong):
        i = int(wrong[0])
        raise DataError(f"MNIST file {path} holds label {int(t[i])} at item {i}: labels are the digits 0 to 9")
    return t


@dataclass
class MnistSplit:
    images: torch.Tensor  # (N, 1, 28, 28) uint8
    labels: torch.Tensor  # (N,) uint8


def load_split(data_dir: str | Path, split: str) -> MnistSplit:
    """Read one split ('train' or 'test') from a folder of IDX files."""
    data_dir = Path(data_dir).expanduser()
    with checking(data_dir, DataError, "data directory"):
        if not data_dir.is_dir():
            what = "is not a directory" if data_dir.exists() else "does not exist"
            raise DataError(f"data directory {data_dir} {what}")
    image_name, label_name, count = FILES[split]
    images = read_idx(find_idx_file(data_dir, image_name), IMAGE_MAGIC, count)
    labels = read_idx(find_idx_file(data_dir, label_name), LABEL_MAGIC, count)
    return MnistSplit(images, labels)


def download(cache_dir: str | Path) -> Path:
    """Download MNIST through torchvision (checksummed) and return the folder to read.

    Call it on one process while the others wait (see train.data_dir_for): torchvision
    writes straight to the final paths, so a concurrent reader can see half a file.
    """
    root = Path(cache_dir).expanduser()
    try:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError offline
        raise DataError(
            f"could not download MNIST into {root} ({type(e).__name__}: {first_line(e)}); "
            "with no network, point --data-dir at a folder holding the four MNIST IDX files"
        ) from None
    return root / "MNIST" / "raw"
