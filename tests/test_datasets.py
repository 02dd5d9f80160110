"""The dataset table and its IDX files: the real MNIST files in each layout found, one-line
refusals for broken ones, bounded reads of hostile ones, the download through each row's
torchvision class, and a test-written Fashion-MNIST trained on and named in every record;
your own images as NumPy files, read and refused the same way, and a colour dataset trained on."""

from __future__ import annotations

import functools
import gzip
import io
import json
import math
import os
import re
import shutil
import resource
import struct
import sys
import threading
import time
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

from conftest import check_ok, main_in_process, one_error_line, small_train_args
from vae_dist.config import TrainingConfig, options
from vae_dist.data import keyed
from vae_dist.data.datasets import (
    DATASETS, FILES, IMAGE_MAGIC, LABEL_MAGIC, MAX_CLASSES, MAX_SIDE, download, load_split, read_idx,
    torchvision_class,
)
from vae_dist.errors import DataError

TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def _gz(data_dir: Path, name: str) -> Path:
    p = data_dir / f"{name}.gz"
    return p if p.exists() else data_dir / name


@functools.lru_cache(maxsize=None)
def _raw(data_dir: Path, name: str) -> bytes:
    p = _gz(data_dir, name)
    return gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()


def _header(n: int, side: int = 28, cols: int | None = None) -> bytes:
    return struct.pack(">IIII", IMAGE_MAGIC, n, side, cols or side)


def write_idx_dataset(folder: Path, side: int = 28, cols: int | None = None, splits=("train", "test")) -> Path:
    """A fake dataset's four IDX files, gzipped, in ``folder``: image i is a gradient shifted
    by i % 7 and its label i % 10, so that even 60,000 images write and read in a blink."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = side * (cols or side)
    for split in splits:
        (images, labels), n = FILES[split], getattr(DATASETS["mnist"], split)
        gradient = np.arange(pixels + 7, dtype=np.uint32).astype(np.uint8)
        body = np.concatenate([gradient[k : k + pixels] for k in range(7)] * (n // 7 + 1))[: n * pixels]
        (folder / f"{images}.gz").write_bytes(gzip.compress(_header(n, side, cols) + body.tobytes(), compresslevel=1))
        label_bytes = struct.pack(">II", LABEL_MAGIC, n) + (np.arange(n) % 10).astype(np.uint8).tobytes()
        (folder / f"{labels}.gz").write_bytes(gzip.compress(label_bytes, compresslevel=1))
    return folder


@pytest.fixture(scope="module")
def test_split(data_dir):
    return load_split(data_dir, "test")


def test_the_real_test_split(data_dir, test_split):
    assert test_split.images.shape == (10000, 1, 28, 28) and test_split.labels.shape == (10000,)
    assert test_split.images.dtype == torch.uint8 and test_split.labels.dtype == torch.uint8
    assert int(test_split.labels[0]) == 7  # as in every MNIST copy
    ref = np.frombuffer(_raw(data_dir, TEST_IMAGES), dtype=np.uint8, offset=16).reshape(10000, 1, 28, 28)
    assert torch.equal(test_split.images, torch.from_numpy(ref.copy()))


def _gzipped_flat(src: Path, dst: Path) -> None:
    for name in (TEST_IMAGES, TEST_LABELS):
        shutil.copy(_gz(src, name), dst / _gz(src, name).name)


def _uncompressed(src: Path, dst: Path) -> None:
    for name in (TEST_IMAGES, TEST_LABELS):
        (dst / name).write_bytes(_raw(src, name))


def _linked_under_raw(src: Path, dst: Path) -> None:
    raw = dst / "MNIST" / "raw"  # torchvision's layout; links followed
    raw.mkdir(parents=True)
    for name in (TEST_IMAGES, TEST_LABELS):
        (raw / _gz(src, name).name).symlink_to(_gz(src, name).resolve())


@pytest.mark.parametrize("layout", [_gzipped_flat, _uncompressed, _linked_under_raw], ids=lambda f: f.__name__[1:])
def test_layouts(layout, data_dir, tmp_path, test_split):
    layout(data_dir, tmp_path)
    split = load_split(tmp_path, "test")
    assert torch.equal(split.images, test_split.images) and torch.equal(split.labels, test_split.labels)


def _stale_plain(folder: Path) -> Path:
    """A plain copy of the test images beside the .gz, all black: an older extraction."""
    (folder / TEST_IMAGES).write_bytes(_header(10000) + bytes(10000 * 784))
    return folder / TEST_IMAGES


@pytest.mark.parametrize("where", ["beside", "under-raw"])
def test_two_copies_that_differ_are_refused_naming_both(where, tmp_path):
    gz = write_idx_dataset(tmp_path, splits=("test",)) / f"{TEST_IMAGES}.gz"
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    stale = _stale_plain(tmp_path if where == "beside" else raw)
    with pytest.raises(DataError) as e:
        load_split(tmp_path, "test")
    assert str(gz) in str(e.value) and str(stale) in str(e.value) and "differ" in str(e.value)


def test_identical_copies_as_torchvision_leaves_them_are_read(tmp_path):
    raw = write_idx_dataset(tmp_path / "MNIST" / "raw", splits=("test",))
    for name in (TEST_IMAGES, TEST_LABELS):  # torchvision keeps each .gz beside the file it extracts
        (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
    (raw / f"{TEST_IMAGES}.gz").rename(tmp_path / f"{TEST_IMAGES}.gz")  # and one more copy, flat
    split = load_split(tmp_path, "test")
    assert torch.equal(split.images, read_idx(tmp_path / f"{TEST_IMAGES}.gz", IMAGE_MAGIC, 10000))


def test_a_small_valid_file_parses(tmp_path):
    p = tmp_path / "tiny-images"
    pixels = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8)
    p.write_bytes(_header(2) + pixels.tobytes())
    images = read_idx(p, IMAGE_MAGIC, 2)
    assert images.shape == (2, 1, 28, 28) and torch.equal(images.flatten(), torch.from_numpy(pixels))


# --- refusals: one DataError line naming the file ------------------------------------------


def _truncated_gzip(data_dir: Path) -> bytes:
    p = _gz(data_dir, TEST_IMAGES)
    gz = p.read_bytes() if p.suffix == ".gz" else gzip.compress(p.read_bytes(), compresslevel=1)
    return gz[: len(gz) // 2]


def _corrupt_deflate(_: Path) -> bytes:
    gz = bytearray(gzip.compress(_header(10000) + os.urandom(3 * 784)))
    for i in range(12, len(gz) - 8):  # scramble the compressed body, keep the gzip header
        gz[i] ^= 0x5A
    return bytes(gz)


# (what the broken file holds, its name, words the message has)
BROKEN = {
    "truncated": (lambda d: _raw(d, TEST_IMAGES)[:100_000], TEST_IMAGES, ["truncated"]),
    "header-cut": (lambda d: struct.pack(">II", IMAGE_MAGIC, 10000), TEST_IMAGES, ["truncated"]),
    "padded": (lambda d: _raw(d, TEST_IMAGES) + b"\0" * 10, TEST_IMAGES, ["padded"]),
    "labels-as-images": (lambda d: _raw(d, TEST_LABELS), TEST_IMAGES, ["magic", str(LABEL_MAGIC)]),
    "wrong-count": (lambda d: _header(5) + bytes(5 * 784), TEST_IMAGES, ["holds 5 items, expected 10000"]),
    "side-zero": (lambda d: _header(10000, 0) + bytes(100), TEST_IMAGES, ["0x0 images", f"1 to {MAX_SIDE}"]),
    "side-too-large": (lambda d: _header(10000, 28, MAX_SIDE + 1), TEST_IMAGES, [f"28x{MAX_SIDE + 1} images"]),
    "gzip-truncated": (_truncated_gzip, f"{TEST_IMAGES}.gz", ["cannot be read"]),
    "gzip-corrupt-deflate": (_corrupt_deflate, f"{TEST_IMAGES}.gz", ["cannot be read"]),
    "gz-name-plain-bytes": (lambda d: _raw(d, TEST_IMAGES), f"{TEST_IMAGES}.gz", ["cannot be read"]),
    "label-above-9": (lambda d: _raw(d, TEST_LABELS)[:-1] + b"\x0a", TEST_LABELS, ["label 10 at item 9999", "0 to 9"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_file_is_one_data_error(case, data_dir, tmp_path):
    content, name, words = BROKEN[case]
    for real in (TEST_IMAGES, TEST_LABELS):  # then the broken one over (or, uncompressed, found before) its own
        shutil.copy(_gz(data_dir, real), tmp_path)
    (tmp_path / name).write_bytes(content(data_dir))
    with pytest.raises(DataError) as ei:
        load_split(tmp_path, "test")
    msg = str(ei.value)
    assert "\n" not in msg and f"mnist file {tmp_path / name}" in msg, msg
    for w in words:
        assert w in msg, msg


def test_a_missing_folder_or_file_is_named(data_dir, tmp_path):
    with pytest.raises(DataError, match="nope does not exist"):
        load_split(tmp_path / "nope", "test")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="file is not a directory"):
        load_split(tmp_path / "file", "test")
    shutil.copy(_gz(data_dir, TEST_IMAGES), tmp_path)
    with pytest.raises(DataError, match=f"mnist file {TEST_LABELS}.* not found"):
        load_split(tmp_path, "test")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_a_gzip_bomb_or_an_endless_input_fails_fast_without_reading_it(tmp_path):
    # A valid header for 10000 images, then 2 GB of zeros in 16 MB gzip members (a gzip
    # file may hold several; one member compressed once is cheap to repeat): a reader
    # that inflates the whole stream before checking sizes needs 2 GB.
    bomb = tmp_path / "t10k-images-idx3-ubyte.gz"
    zeros = gzip.compress(bytes(1 << 24), compresslevel=1)
    bomb.write_bytes(gzip.compress(_header(10000)) + zeros * 128)
    endless = tmp_path / "images"
    endless.symlink_to("/dev/zero")
    # This process's data segment capped at 1 GB above what it holds: a reader that takes a
    # whole stream into memory fails there (MemoryError) instead of exhausting the machine.
    held = int(re.search(r"VmData:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) << 10
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = held + (1 << 30) if hard == resource.RLIM_INFINITY else min(held + (1 << 30), hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        for path, words in ((bomb, "padded"), (endless, "magic")):
            t0 = time.monotonic()
            with pytest.raises(DataError, match=words):
                read_idx(path, IMAGE_MAGIC, 10000)
            assert time.monotonic() - t0 < 5, path
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def test_a_failed_download_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    """No network: one DataError that says what failed and points at --data-dir."""

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    # A stand-in for torchvision.datasets: importing the real one takes seconds.
    monkeypatch.setitem(sys.modules, "torchvision.datasets", types.SimpleNamespace(MNIST=offline))
    with pytest.raises(DataError) as e:
        download(tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "could not download mnist" in msg and "RuntimeError" in msg and "--data-dir" in msg


def test_the_download_and_the_class_names_come_from_the_rows_torchvision_class(tmp_path, monkeypatch):
    made = []

    class FashionMNIST:  # a stand-in, as above
        classes = ["T-shirt/top", "Trouser"]

        def __init__(self, root, train, download):
            made.append((root, train, download))

    monkeypatch.setitem(sys.modules, "torchvision.datasets", types.SimpleNamespace(FashionMNIST=FashionMNIST))
    assert download(tmp_path, "fashion-mnist") == tmp_path / "FashionMNIST" / "raw"
    assert made == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert torchvision_class("fashion-mnist").classes == ["T-shirt/top", "Trouser"]


@pytest.mark.slow  # imports torchvision
def test_every_idx_row_is_a_torchvision_class_with_the_four_files_and_its_classes():
    for name, row in ((name, row) for name, row in DATASETS.items() if row.torchvision is not None):  # npy: none
        checksummed = {file for file, _md5 in torchvision_class(name).resources}
        assert checksummed == {f"{f}.gz" for pair in FILES.values() for f in pair}, name
        assert len(torchvision_class(name).classes) == row.classes, name


# --- the table: which dataset, where its files are, what size its images are ---------------


def test_the_config_offers_the_tables_rows():
    (dataset,) = [o for o in options() if o.dotted == "data.dataset"]
    assert typing.get_args(dataset.annotation) == tuple(DATASETS) and dataset.default == "mnist"
    assert not dataset.resumable


def test_a_bad_dataset_is_one_line_listing_the_choices(tmp_path, capsys):
    line = one_error_line(main_in_process(["train", "--dataset", "cifar10", "--artifact-dir", str(tmp_path)], capsys))
    assert "cifar10" in line and all(f"'{name}'" in line for name in DATASETS), line


def test_a_dataset_is_found_in_its_torchvision_layout_and_not_in_anothers(tmp_path):
    write_idx_dataset(tmp_path / "FashionMNIST" / "raw", splits=("test",))
    split = load_split(tmp_path, "test", "fashion-mnist")
    assert split.images.shape == (10000, 1, 28, 28) and split.labels[:12].tolist() == [*range(10), 0, 1]
    with pytest.raises(DataError, match=re.escape(f"mnist file {TEST_IMAGES}(.gz) not found in {tmp_path} ")):
        load_split(tmp_path, "test", "mnist")  # MNIST's own folder is MNIST/raw/


def test_the_image_size_comes_from_the_header(tmp_path):
    write_idx_dataset(tmp_path, side=32, cols=20, splits=("test",))
    images = load_split(tmp_path, "test", "kmnist").images
    assert images.shape == (10000, 1, 32, 20) and images[1, 0, 0, :3].tolist() == [1, 2, 3]
    assert keyed.binarize_split(images, 0, 1).shape == images.shape  # the coins follow the size


def test_the_loss_curves_title_names_the_dataset(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from vae_dist.evaluation import images

    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda self, title, *args, **kwargs: titles.append(title))
    monkeypatch.setattr(images, "atomic_write", lambda path, write: None)  # the title is all this test needs
    row = {"epoch": 1, "train/loss": 2.0, "valid/loss": 1.0}
    images.save_loss_curves([{**row, "protocol": {"dataset": "kmnist"}}], tmp_path / "a.png")
    images.save_loss_curves([row], tmp_path / "b.png")  # a run recorded before datasets were named
    assert titles == ["Loss per epoch (kmnist)", "Loss per epoch"]


@pytest.mark.slow  # trains two steps on a test-written 60,000-image dataset
def test_fashion_mnist_trains_and_every_record_and_command_follows_it(tmp_path, capsys):
    import vae_dist
    from vae_dist.run.modelfile import model_results

    data, art = tmp_path / "data", tmp_path / "run"
    write_idx_dataset(data / "FashionMNIST" / "raw")  # not a file where MNIST's would be
    ran = main_in_process(small_train_args(data, art, "--dataset", "fashion-mnist", "--model", "mlp", "--max-steps", "2"),
                          capsys)
    check_ok(ran)
    assert "on 1024 fashion-mnist images" in ran.stdout
    assert json.loads((art / "config.json").read_text())["data"]["dataset"] == "fashion-mnist"
    rows = [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["protocol"]["dataset"] == "fashion-mnist" for row in rows)
    assert rows[-1]["protocol"]["data"].startswith("grey-level fashion-mnist")
    assert model_results(art / "model.safetensors")["protocol"]["dataset"] == "fashion-mnist"
    assert vae_dist.load(art).config.data.dataset == "fashion-mnist"
    ran = main_in_process(["evaluate", str(art), "--json"], capsys)
    check_ok(ran)
    assert json.loads(ran.stdout)["protocol"] == rows[-1]["protocol"]
    check_ok(main_in_process(["reconstruct", str(art), "--num", "8"], capsys))  # the test images, from FashionMNIST/raw


# --- your own images: NumPy files ---------------------------------------------------------------


def write_npy_dataset(folder: Path, shape=(3, 32, 32), train: int = 64, test: int = 32, labels: bool = True) -> Path:
    """train.npy and test.npy of ``shape`` images (image i a gradient shifted by i) and, with ``labels``, their
    <split>_labels.npy (image i's label i % 10)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        pixels = math.prod(shape)
        images = np.stack([(np.arange(pixels) + i) % 251 for i in range(n)]).astype(np.uint8).reshape(n, *shape)
        np.save(folder / f"{split}.npy", images)
        if labels:
            np.save(folder / f"{split}_labels.npy", np.arange(n) % 10)
    return folder


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)  # the pickled case must be writable to be refused
    return buf.getvalue()


def _forged(shape: tuple, body: bytes = b"", descr: str = "|u1") -> bytes:
    """A valid .npy header declaring ``shape``, then ``body``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"shape": shape, "fortran_order": False, "descr": descr})
    return buf.getvalue() + body


def test_npy_images_are_grey_or_colour_with_labels_or_without(tmp_path):
    grey = np.arange(2 * 5 * 7, dtype=np.uint8).reshape(2, 5, 7)
    np.save(tmp_path / "test.npy", grey)
    split = load_split(tmp_path, "test", "npy")
    assert split.images.shape == (2, 1, 5, 7) and torch.equal(split.images[:, 0], torch.from_numpy(grey))
    assert split.labels is None and split.classes is None
    colour = np.asfortranarray(np.arange(2 * 3 * 4 * 6, dtype=np.uint8).reshape(2, 3, 4, 6))  # stored column-major
    np.save(tmp_path / "test.npy", colour)
    np.save(tmp_path / "test_labels.npy", np.array([4, 1], dtype=">i2"))  # any integer type and byte order
    split = load_split(tmp_path, "test", "npy")
    assert split.images.dtype == torch.uint8
    assert torch.equal(split.images, torch.from_numpy(np.ascontiguousarray(colour)))
    assert split.labels.tolist() == [4, 1] and split.classes == 5


# (the file, what it holds, words the message has), over a valid test split of 32 3x32x32 images
NPY_BROKEN = {
    "not-npy": ("test.npy", b"P5 32 32 255\n", ["cannot be read", "magic"]),
    "header-length-forged": ("test.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 31),
                             ["claims 2147483648 bytes"]),
    "header-cut": ("test.npy", _forged((32, 32, 32))[:30], ["cannot be read"]),
    "float-images": ("test.npy", _npy(np.zeros((2, 4, 4), np.float32)), ["float32 [2, 4, 4]", "must be uint8"]),
    "pickled-objects": ("test.npy", _npy(np.array([{"a": 1}, None], dtype=object)), ["object", "must be uint8"]),
    "one-axis-short": ("test.npy", _npy(np.zeros((2, 16), np.uint8)), ["uint8 [2, 16]", "(N, H, W) or (N, C, H, W)"]),
    "channels-last": ("test.npy", _npy(np.zeros((2, 8, 8, 3), np.uint8)), ["[2, 8, 8, 3]", "channels first"]),
    "no-images": ("test.npy", _npy(np.zeros((0, 4, 4), np.uint8)), ["at least one image"]),
    "side-too-large": ("test.npy", _forged((1, 1, MAX_SIDE + 1)), [f"[1, 1, {MAX_SIDE + 1}]", f"1 to {MAX_SIDE}"]),
    "count-forged": ("test.npy", _forged((10**12, 28, 28), bytes(784)), ["truncated", "784 bytes", "784000000000000"]),
    "padded": ("test.npy", _npy(np.zeros((32, 3, 32, 32), np.uint8)) + b"\0", ["padded"]),
    "labels-float": ("test_labels.npy", _npy(np.zeros(32)), ["float64 [32]", "32 integers"]),
    "labels-too-few": ("test_labels.npy", _npy(np.zeros(31, np.int64)), ["int64 [31]", "32 integers"]),
    "label-too-large": ("test_labels.npy", _npy(np.eye(1, 32, 3, dtype=np.int64)[0] * MAX_CLASSES),
                        [f"label {MAX_CLASSES} at item 3", f"0 to {MAX_CLASSES - 1}"]),
    "label-negative": ("test_labels.npy", _npy(-np.ones(32, np.int8)), ["label -1 at item 0"]),
}


@pytest.mark.parametrize("case", list(NPY_BROKEN))
def test_a_broken_npy_file_is_one_data_error(case, tmp_path):
    name, content, words = NPY_BROKEN[case]
    write_npy_dataset(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as ei:
        load_split(tmp_path, "test", "npy")
    msg = str(ei.value)
    assert "\n" not in msg and f"npy file {tmp_path / name}" in msg, msg
    for w in words:
        assert w in msg, msg


def test_a_missing_or_endless_npy_file_is_one_data_error(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"npy file {tmp_path / 'test.npy'} not found")):
        load_split(tmp_path, "test", "npy")
    (tmp_path / "test.npy").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="is not a regular file"):
        load_split(tmp_path, "test", "npy")
    (tmp_path / "test.npy").unlink()
    os.mkfifo(tmp_path / "test.npy")  # open() would wait for a writer for ever: read in a thread, so a hang fails
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: outcome.append(
        pytest.raises(DataError, load_split, tmp_path, "test", "npy").value), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert outcome and str(outcome[0]).endswith("is not a regular file")


def test_npy_has_no_download(tmp_path):
    with pytest.raises(DataError, match="^--dataset npy has no download: give --data-dir"):
        download(tmp_path, "npy")  # where training and evaluate go without --data-dir


def test_a_conv_model_refuses_a_shape_it_cannot_serve_before_writing_anything(tmp_path, capsys):
    data, art = write_npy_dataset(tmp_path / "data", shape=(3, 30, 30), train=8, test=4), tmp_path / "run"
    args = small_train_args(data, art, "--dataset", "npy", "--batch-size", "4", "--model", "conv")
    ran = main_in_process(args, capsys)
    assert one_error_line(ran) == ("error: --model conv takes images whose sides are multiples of 4 (two stride-2 "
                                   "layers); these are 3x30x30") and not art.exists()


def test_the_test_images_must_have_the_models_shape(tmp_path):
    from vae_dist.evaluation.evaluate import test_split

    data = write_npy_dataset(tmp_path, shape=(1, 30, 30), train=1, test=4)
    config = TrainingConfig.from_dict({"data": {"dataset": "npy", "data_dir": str(data)},
                                       "model": {"image_shape": [3, 30, 30]}})
    line = f"the npy test images in {data} are 1x30x30; the model takes 3x30x30"
    with pytest.raises(DataError, match=re.escape(line)):
        test_split(config).images


@pytest.mark.slow  # trains 3 steps and runs every command on the result
def test_a_colour_npy_dataset_trains_and_every_command_follows_it(tmp_path, capsys):
    import vae_dist

    data, art = write_npy_dataset(tmp_path / "data"), tmp_path / "run"
    args = small_train_args(data, art, "--dataset", "npy", "--model", "conv", "--conv-channels", "4,8", "--latent-size",
                            "4", "--batch-size", "16", "--max-steps", "3", "--binarize", "dynamic")
    ran = main_in_process(args, capsys)
    check_ok(ran)
    assert "on 64 npy images" in ran.stdout
    assert json.loads((art / "config.json").read_text())["model"]["image_shape"] == [3, 32, 32]
    with Image.open(art / "images" / "epoch-001-samples.png") as img:
        assert img.mode == "RGB" and img.size == (8 * 34 + 2, 8 * 34 + 2)  # 64 colour tiles of 32 + 2 padding
    ran = main_in_process(["evaluate", str(art), "--json"], capsys)
    check_ok(ran)
    result = json.loads(ran.stdout)
    assert result["samples"] == 32 and result["protocol"]["dataset"] == "npy"
    for command in (["sample", str(art), "--num", "4"], ["reconstruct", str(art), "--num", "4"],
                    ["interpolate", str(art), "--from", "0", "--to", "1", "--steps", "3"]):
        check_ok(main_in_process(command, capsys))
    with Image.open(art / "samples.png") as img:
        assert img.mode == "RGB"
    model = vae_dist.load(art)
    test = torch.from_numpy(np.load(data / "test.npy"))
    assert model.sample(2, seed=0).shape == (2, 3, 32, 32)
    assert torch.allclose(model.reconstruct(test[:2]), model.reconstruct(test[:2].flatten(1).float() / 255))
    with pytest.raises(DataError, match=re.escape("(N, 3072) or (N, 3, 32, 32), got (2, 32, 32)")):
        model.reconstruct(test[:2, 0])  # a grey image for a colour model
