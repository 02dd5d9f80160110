"""Tests for vae_dist.data: IDX parsing of the real files, the layouts found, one-line
refusals for broken files, the dataset, the sampler and the loader."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vae_dist.data import (
    IMAGE_MAGIC,
    LABEL_MAGIC,
    EpochShuffleSampler,
    MnistImages,
    find_idx_file,
    load_split,
    make_loader,
    read_idx,
)
from vae_dist.errors import DataError, VaeDistError

TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


@pytest.fixture(scope="module")
def train_split(data_dir):
    return load_split(data_dir, "train")


@pytest.fixture(scope="module")
def test_split(data_dir):
    return load_split(data_dir, "test")


def _gz(data_dir: Path, name: str) -> Path:
    p = data_dir / f"{name}.gz"
    return p if p.exists() else data_dir / name


def _raw(data_dir: Path, name: str) -> bytes:
    p = _gz(data_dir, name)
    return gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()


def _idx_images(n: int, side: int = 28) -> bytes:
    return struct.pack(">IIII", IMAGE_MAGIC, n, side, side) + bytes(n * side * side)


def _idx_labels(n: int) -> bytes:
    return struct.pack(">II", LABEL_MAGIC, n) + bytes(n)


# --- the real files ------------------------------------------------------------------------


def test_real_train_split(train_split):
    images, labels = train_split.images, train_split.labels
    assert images.shape == (60000, 1, 28, 28)
    assert labels.shape == (60000,)
    assert images.dtype == torch.uint8 and labels.dtype == torch.uint8
    mean = images.sum(dtype=torch.int64).item() / (images.numel() * 255.0)
    assert abs(mean - 0.1307) < 1e-3, mean
    assert int(labels.max()) == 9 and int(labels.min()) == 0
    # Every digit appears, in roughly MNIST's proportions.
    counts = torch.bincount(labels.long(), minlength=10)
    assert counts.min() > 5000 and counts.max() < 7000


def test_real_test_split(test_split):
    assert test_split.images.shape == (10000, 1, 28, 28)
    assert test_split.labels.shape == (10000,)
    assert test_split.images.dtype == torch.uint8
    assert int(test_split.images.max()) == 255 and int(test_split.images.min()) == 0
    # The first test image is a 7 (as in every MNIST copy).
    assert int(test_split.labels[0]) == 7


def test_read_idx_matches_numpy_parse(data_dir, test_split):
    raw = _raw(data_dir, TEST_IMAGES)
    ref = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(10000, 1, 28, 28)
    assert torch.equal(test_split.images, torch.from_numpy(ref.copy()))


# --- layouts -------------------------------------------------------------------------------


def test_layout_gzipped_flat(data_dir, tmp_path, test_split):
    for name in (TEST_IMAGES, TEST_LABELS):
        shutil.copy(_gz(data_dir, name), tmp_path / _gz(data_dir, name).name)
    split = load_split(tmp_path, "test")
    assert torch.equal(split.images, test_split.images)
    assert torch.equal(split.labels, test_split.labels)


def test_layout_uncompressed(data_dir, tmp_path, test_split):
    for name in (TEST_IMAGES, TEST_LABELS):
        (tmp_path / name).write_bytes(_raw(data_dir, name))
    assert find_idx_file(tmp_path, TEST_IMAGES) == tmp_path / TEST_IMAGES
    split = load_split(tmp_path, "test")
    assert torch.equal(split.images, test_split.images)
    assert torch.equal(split.labels, test_split.labels)


def test_layout_torchvision_raw(data_dir, tmp_path, test_split):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (TEST_IMAGES, TEST_LABELS):
        src = _gz(data_dir, name)
        shutil.copy(src, raw / src.name)
    found = find_idx_file(tmp_path, TEST_IMAGES)
    assert found.parent == raw
    split = load_split(tmp_path, "test")
    assert torch.equal(split.images, test_split.images)


def test_train_split_through_symlinks_under_raw(data_dir, tmp_path, train_split):
    """The 47 MB training file is linked, not copied; the layout search follows links."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (TRAIN_IMAGES, TRAIN_LABELS):
        src = _gz(data_dir, name)
        (raw / src.name).symlink_to(src.resolve())
    split = load_split(tmp_path, "train")
    assert torch.equal(split.labels, train_split.labels)
    assert split.images.shape == (60000, 1, 28, 28)


# --- refusals ------------------------------------------------------------------------------


def _one_line_data_error(fn, *args, name: str) -> str:
    with pytest.raises(DataError) as ei:
        fn(*args)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert name in msg, msg
    assert isinstance(ei.value, VaeDistError)
    return msg


def test_missing_directory(tmp_path):
    msg = _one_line_data_error(load_split, tmp_path / "nope", "test", name="nope")
    assert "does not exist" in msg


def test_missing_file(data_dir, tmp_path):
    shutil.copy(_gz(data_dir, TEST_IMAGES), tmp_path / _gz(data_dir, TEST_IMAGES).name)
    msg = _one_line_data_error(load_split, tmp_path, "test", name=TEST_LABELS)
    assert "not found" in msg


def test_truncated_uncompressed_file(data_dir, tmp_path):
    (tmp_path / TEST_IMAGES).write_bytes(_raw(data_dir, TEST_IMAGES)[:100_000])
    (tmp_path / TEST_LABELS).write_bytes(_raw(data_dir, TEST_LABELS))
    msg = _one_line_data_error(load_split, tmp_path, "test", name=TEST_IMAGES)
    assert "truncated" in msg


def test_truncated_header(tmp_path):
    p = tmp_path / TEST_IMAGES
    p.write_bytes(struct.pack(">II", IMAGE_MAGIC, 10000))
    msg = _one_line_data_error(read_idx, p, IMAGE_MAGIC, 10000, name=TEST_IMAGES)
    assert "truncated" in msg


def test_truncated_gzip(data_dir, tmp_path):
    gz = _gz(data_dir, TEST_IMAGES).read_bytes()
    if not _gz(data_dir, TEST_IMAGES).suffix == ".gz":
        gz = gzip.compress(gz)
    (tmp_path / f"{TEST_IMAGES}.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / TEST_LABELS).write_bytes(_raw(data_dir, TEST_LABELS))
    _one_line_data_error(load_split, tmp_path, "test", name=TEST_IMAGES)


def test_padded_file(tmp_path):
    p = tmp_path / TEST_IMAGES
    p.write_bytes(_idx_images(3) + b"\0" * 10)
    msg = _one_line_data_error(read_idx, p, IMAGE_MAGIC, 3, name=TEST_IMAGES)
    assert "padded" in msg


def test_wrong_magic_labels_renamed_as_images(data_dir, tmp_path):
    (tmp_path / TEST_IMAGES).write_bytes(_raw(data_dir, TEST_LABELS))  # labels under the images name
    (tmp_path / TEST_LABELS).write_bytes(_raw(data_dir, TEST_LABELS))
    msg = _one_line_data_error(load_split, tmp_path, "test", name=TEST_IMAGES)
    assert "magic" in msg and str(LABEL_MAGIC) in msg


def test_wrong_count(tmp_path):
    (tmp_path / TEST_IMAGES).write_bytes(_idx_images(5))
    (tmp_path / TEST_LABELS).write_bytes(_idx_labels(5))
    msg = _one_line_data_error(load_split, tmp_path, "test", name=TEST_IMAGES)
    assert "5" in msg and "10000" in msg


def test_wrong_image_side(tmp_path):
    p = tmp_path / TEST_IMAGES
    p.write_bytes(_idx_images(2, side=27))
    msg = _one_line_data_error(read_idx, p, IMAGE_MAGIC, 2, name=TEST_IMAGES)
    assert "27x27" in msg


def test_not_gzip_despite_gz_suffix(data_dir, tmp_path):
    (tmp_path / f"{TEST_IMAGES}.gz").write_bytes(_raw(data_dir, TEST_IMAGES))  # plain bytes, .gz name
    (tmp_path / TEST_LABELS).write_bytes(_raw(data_dir, TEST_LABELS))
    _one_line_data_error(load_split, tmp_path, "test", name=f"{TEST_IMAGES}.gz")


def test_small_valid_file_parses(tmp_path):
    p = tmp_path / "tiny-images"
    pixels = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8)
    p.write_bytes(struct.pack(">IIII", IMAGE_MAGIC, 2, 28, 28) + pixels.tobytes())
    t = read_idx(p, IMAGE_MAGIC, 2)
    assert t.shape == (2, 1, 28, 28)
    assert torch.equal(t.flatten(), torch.from_numpy(pixels))
    assert read_idx(p, IMAGE_MAGIC).shape[0] == 2  # no expected count given


# --- dataset, sampler, loader --------------------------------------------------------------


def test_getitems_returns_unit_floats_and_indices(test_split):
    ds = MnistImages(test_split.images)
    assert len(ds) == 10000
    idx = [5, 0, 9999, 5]
    x, i = ds.__getitems__(idx)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.max()) == 1.0  # 255 maps to exactly 1
    assert i.dtype == torch.int64 and i.tolist() == idx
    assert torch.allclose(x, test_split.images[idx].float() / 255.0)
    # The stored uint8 tensor is not modified by the in-place divide.
    assert test_split.images.dtype == torch.uint8 and int(test_split.images.max()) == 255


def test_getitem_single(test_split):
    ds = MnistImages(test_split.images)
    x, i = ds[3]
    assert x.shape == (1, 1, 28, 28) and i.tolist() == [3]


def test_sampler_is_permutation():
    s = EpochShuffleSampler(1000, seed=42)
    order = list(s)
    assert len(s) == 1000
    assert sorted(order) == list(range(1000))
    assert order != list(range(1000))


def test_sampler_same_for_same_seed_and_epoch():
    a, b = EpochShuffleSampler(500, seed=3), EpochShuffleSampler(500, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    # Iterating twice gives the same order (no hidden RNG state).
    assert list(a) == list(a)


def test_sampler_differs_across_epochs_and_seeds():
    s = EpochShuffleSampler(500, seed=3)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    other = EpochShuffleSampler(500, seed=4)
    assert list(other) != orders[0]


def test_sampler_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(EpochShuffleSampler(100, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_make_loader_drop_last_batches(test_split):
    n, batch = 1000, 64
    ds = MnistImages(test_split.images[:n])
    loader = make_loader(ds, batch, shuffle_seed=42, drop_last=True, num_workers=0)
    batches = list(loader)
    assert len(loader) == n // batch == len(batches)
    seen = []
    for x, idx in batches:
        assert x.shape == (batch, 1, 28, 28) and idx.shape == (batch,)
        assert torch.equal(x, test_split.images[idx].float() / 255.0)
        seen += idx.tolist()
    assert len(set(seen)) == len(seen) == (n // batch) * batch
    assert all(0 <= i < n for i in seen)
    # The order is the sampler's permutation for (seed, epoch 0).
    assert seen == list(EpochShuffleSampler(n, 42))[: len(seen)]


def test_make_loader_epochs_reshuffle(test_split):
    ds = MnistImages(test_split.images[:256])
    loader = make_loader(ds, 32, shuffle_seed=1, drop_last=True, num_workers=0)
    first = torch.cat([i for _, i in loader]).tolist()
    loader.sampler.set_epoch(1)
    second = torch.cat([i for _, i in loader]).tolist()
    loader.sampler.set_epoch(0)
    again = torch.cat([i for _, i in loader]).tolist()
    assert first != second and sorted(first) == sorted(second)
    assert first == again


def test_make_loader_unshuffled_keeps_everything_in_order(test_split):
    n = 250
    ds = MnistImages(test_split.images[:n])
    loader = make_loader(ds, 100, shuffle_seed=None, drop_last=False, num_workers=0)
    sizes = [x.shape[0] for x, _ in loader]
    assert sizes == [100, 100, 50]
    assert torch.cat([i for _, i in loader]).tolist() == list(range(n))


def test_make_loader_does_not_touch_global_rng(test_split):
    ds = MnistImages(test_split.images[:128])
    loader = make_loader(ds, 32, shuffle_seed=0, drop_last=True, num_workers=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    for _ in loader:
        pass
    assert torch.equal(torch.rand(3), expected)


def test_download_failure_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    """No network: one DataError that says what failed and points at --data-dir."""
    import torchvision.datasets

    from vae_dist.data import download

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError) as e:
        download(tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "could not download MNIST" in msg and "--data-dir" in msg
