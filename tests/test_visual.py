"""Seeing the model: the pictures training writes, the offline W&B run it records, and the
`sample` / `reconstruct` / `interpolate` / `evaluate --iw-samples` commands on its model.

One short real training run (2 epochs on a slice, W&B offline, KL warm-up over 2 epochs)
is shared by the whole module, plus a tiny 2-D-latent MLP run for the manifold picture.
The picture commands run in-process through ``vae_dist.cli.main`` (the real Typer app and
error handling, without paying a new interpreter each time); ``train`` and ``evaluate``,
and one ``sample``, run as real subprocesses.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_env, run_cli, small_train_args
from vae_dist import inference
from vae_dist.artifacts import read_metrics
from vae_dist.cli import main
from vae_dist.config import ModelConfig
from vae_dist.mnist import load_split
from vae_dist.errors import VaeDistError
from vae_dist.images import PADDING
from vae_dist.learner import NUM_PREVIEW
from vae_dist.model import VAE

EPOCHS = 2
SIDE = 28


# --------------------------------------------------------------------------- helpers


def grid_size(n: int, nrow: int) -> tuple[int, int]:
    """(width, height) of torchvision's make_grid: ``PADDING`` before every tile plus one
    closing strip, ``min(nrow, n)`` tiles per row."""
    cols = min(nrow, n)
    rows = -(-n // cols)
    return cols * (SIDE + PADDING) + PADDING, rows * (SIDE + PADDING) + PADDING


def tile(img: Image.Image, row: int, col: int) -> np.ndarray:
    step = SIDE + PADDING
    y, x = PADDING + row * step, PADDING + col * step
    return np.asarray(img)[y : y + SIDE, x : x + SIDE]


def png(path: Path) -> Image.Image:
    assert path.is_file(), f"{path} was not written"
    img = Image.open(path)
    img.load()
    return img


def not_blank(img: Image.Image) -> bool:
    return float(np.asarray(img.convert("L"), dtype=np.float64).std()) > 0.0


def vae(*args: Any) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    rc = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# W&B's transaction log (run-<id>.wandb) is a LevelDB-style log: a 7-byte file header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a header
# (crc32 seeded by the chunk type, length, type) and FULL/FIRST/MIDDLE/LAST types that
# join into serialized `Record` protobufs. wandb 0.31 ships no Python reader (the
# writer lives in wandb-core), so this is the reader.
_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", raw[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the tail of a block too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero fill: nothing more in this block
            pos += left
            continue
        data = raw[pos + _HEADER : pos + _HEADER + length]
        assert len(data) == length, f"truncated chunk at byte {pos}"
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pos += _HEADER + length
        if kind == _FULL:
            whole = data
        elif kind == _FIRST:
            pending = data
            continue
        elif kind == _MIDDLE:
            pending += data
            continue
        elif kind == _LAST:
            whole, pending = pending + data, b""
        else:
            raise AssertionError(f"unknown chunk type {kind} at byte {pos}")
        record = pb.Record()
        record.ParseFromString(whole)
        yield record


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    """Each history record as {key: value}; nested keys (an image's fields) join with '/'."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2 epochs, W&B offline into a private WANDB_DIR, KL warm-up over both epochs."""
    root = tmp_path_factory.mktemp("visual")
    art, wandb_dir = root / "run", root / "wandb-home"
    wandb_dir.mkdir()
    # Repeated options: the last one wins, so these override small_train_args' values.
    args = small_train_args(
        data_dir, art, "--epochs", str(EPOCHS), "--wandb-mode", "offline", "--kl-warmup-epochs", str(EPOCHS)
    )
    proc = run_cli(args, env=cli_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"art": art, "wandb_dir": wandb_dir, "stdout": proc.stdout, "root": root}


@pytest.fixture(scope="module")
def mlp2d(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    art = tmp_path_factory.mktemp("visual-mlp2d") / "run"
    proc = run_cli(small_train_args(data_dir, art, "--model", "mlp", "--latent-size", "2", "--max-steps", "20"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return art


@pytest.fixture(scope="module")
def test_split(data_dir: Path) -> torch.Tensor:
    return load_split(data_dir, "test").images


# --------------------------------------------------------------- inference functions


def _small_model(kind: str = "conv", latent: int = 8) -> VAE:
    torch.manual_seed(0)
    return VAE.from_config(ModelConfig(kind=kind, latent_size=latent))


def test_prior_samples_are_seeded_images() -> None:
    model = _small_model().train()
    a = inference.prior_samples(model, 5, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    b = inference.prior_samples(model, 5, seed=3)
    c = inference.prior_samples(model, 5, seed=4)
    assert a.shape == (5, 1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert model.training, "the model's mode is restored"


def test_reconstructions_and_interpolation_use_the_posterior_mean() -> None:
    model = _small_model("mlp", 4)
    x = torch.rand(3, 1, 28, 28)
    rec = inference.reconstructions(model, x)
    assert rec.shape == x.shape and not rec.requires_grad
    with torch.no_grad():
        expected = torch.sigmoid(model.decode(model.encode(x)[0]))
    torch.testing.assert_close(rec, expected)
    # uint8 images are read as 0..255
    torch.testing.assert_close(inference.reconstructions(model, (x * 255).round().to(torch.uint8)), rec, atol=0.02, rtol=0)
    line = inference.interpolate(model, x[0], x[2], steps=5)
    assert line.shape == (5, 1, 28, 28)
    torch.testing.assert_close(line[0], rec[0])
    torch.testing.assert_close(line[-1], rec[2])
    with torch.no_grad():
        mu = model.encode(x)[0]
        mid = torch.sigmoid(model.decode(((mu[0] + mu[2]) / 2).unsqueeze(0)))[0]
    torch.testing.assert_close(line[2], mid)
    with pytest.raises(ValueError):
        inference.interpolate(model, x[0], x[1], steps=1)


def test_manifold_grid_and_latent_check() -> None:
    z = inference.manifold_grid(4)
    assert z.shape == (16, 2)
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 4))
    # row-major: z1 grows along a row, z2 falls down the rows; symmetric about 0
    torch.testing.assert_close(z[:4, 0], q)
    torch.testing.assert_close(z[::4, 1], q.flip(0))
    torch.testing.assert_close(q, -q.flip(0))
    out = inference.manifold(_small_model("mlp", 2), 3)
    assert out.shape == (9, 1, 28, 28)
    with pytest.raises(VaeDistError, match="2-dimensional"):
        inference.manifold(_small_model("mlp", 3), 3)


# ------------------------------------------------------------- pictures of training


@pytest.mark.slow
def test_epoch_pictures_and_loss_curves(trained: dict[str, Any]) -> None:
    art = trained["art"]
    for epoch in range(1, EPOCHS + 1):
        recon = png(art / "images" / f"epoch-{epoch:03d}-reconstructions.png")
        samples = png(art / "images" / f"epoch-{epoch:03d}-samples.png")
        # originals and reconstructions in alternating rows of 8: 2 * NUM_PREVIEW tiles
        assert recon.size == grid_size(2 * NUM_PREVIEW, 8) == (8 * 30 + 2, 8 * 30 + 2)
        assert samples.size == grid_size(64, 8)
        assert not_blank(recon) and not_blank(samples)
    curves = png(art / "loss_curves.png")
    assert not_blank(curves)


@pytest.mark.slow
def test_preview_rows_pair_test_images_with_reconstructions(trained: dict[str, Any], test_split: torch.Tensor) -> None:
    recon = png(trained["art"] / "images" / f"epoch-{EPOCHS:03d}-reconstructions.png")
    for i in (0, 9):
        row, col = 2 * (i // 8), i % 8
        assert np.array_equal(tile(recon, row, col), test_split[i, 0].numpy())
        assert tile(recon, row + 1, col).std() > 0


# ------------------------------------------------------------------------- commands


@pytest.mark.slow
def test_sample_is_reproducible_and_seeded(trained: dict[str, Any], tmp_path: Path) -> None:
    art = trained["art"]
    proc = run_cli(["sample", str(art), "--num", "10", "--seed", "5"])  # a separate process
    assert proc.returncode == 0, proc.stderr
    default = art / "samples.png"
    assert proc.stdout.strip() == str(default)
    img = png(default)
    assert img.size == grid_size(10, 4) == (4 * 30 + 2, 3 * 30 + 2)  # nrow = ceil(sqrt(10))
    assert not_blank(img)
    rc, out, err = vae("sample", art / "model.safetensors", "--num", "10", "--seed", "5", "--out", tmp_path / "again.png")
    assert rc == 0, err
    assert out.strip() == str(tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == default.read_bytes()
    rc, _, err = vae("sample", art, "--num", "10", "--seed", "6", "--out", tmp_path / "other.png")
    assert rc == 0, err
    other = png(tmp_path / "other.png")
    assert other.size == img.size
    assert not np.array_equal(np.asarray(other), np.asarray(img))
    # the default count: 64 in rows of 8
    rc, _, err = vae("sample", art, "--out", tmp_path / "sixty-four.png")
    assert rc == 0, err
    assert png(tmp_path / "sixty-four.png").size == grid_size(64, 8)


@pytest.mark.slow
def test_sample_rejects_bad_arguments(trained: dict[str, Any], tmp_path: Path) -> None:
    art = trained["art"]
    assert_one_line_error(*vae("sample", art, "--num", "0")[::2], "--num")
    assert_one_line_error(*vae("sample", art, "--manifold", "--grid-size", "0")[::2], "--grid-size")
    assert_one_line_error(*vae("sample", tmp_path / "nothing-here")[::2], "no trained model")
    (tmp_path / "adir").mkdir()
    assert_one_line_error(*vae("sample", art, "--out", tmp_path / "adir")[::2], "directory")


@pytest.mark.slow
def test_manifold_needs_a_two_dimensional_latent(trained: dict[str, Any]) -> None:
    rc, out, err = vae("sample", trained["art"], "--manifold")
    latent = json.loads((trained["art"] / "config.json").read_text())["model"]["latent_size"]
    assert_one_line_error(rc, err, "2-dimensional", str(latent))
    assert not (trained["art"] / "manifold.png").exists()


@pytest.mark.slow
def test_manifold_of_a_2d_mlp(mlp2d: Path) -> None:
    rc, out, err = vae("sample", mlp2d, "--manifold", "--grid-size", "5")
    assert rc == 0, err
    assert out.strip() == str(mlp2d / "manifold.png")
    img = png(mlp2d / "manifold.png")
    assert img.size == grid_size(25, 5)
    assert not_blank(img)


@pytest.mark.slow
def test_reconstruct(trained: dict[str, Any], tmp_path: Path, test_split: torch.Tensor) -> None:
    model_file = trained["art"] / "model.safetensors"
    rc, out, err = vae("reconstruct", model_file, "--num", "12")  # default data dir: the training one
    assert rc == 0, err
    target = trained["art"] / "reconstructions.png"  # beside the model file
    assert out.strip() == str(target)
    img = png(target)
    assert img.size == grid_size(4 * 8, 8)  # 12 images -> 2 chunks of 8, each an original and a recon row
    for i in (0, 11):
        row, col = 2 * (i // 8), i % 8
        assert np.array_equal(tile(img, row, col), test_split[i, 0].numpy())
        assert tile(img, row + 1, col).std() > 0
    rc, out, err = vae("reconstruct", trained["art"], "--num", "3", "--out", tmp_path / "r.png")
    assert rc == 0, err
    assert png(tmp_path / "r.png").size == grid_size(2 * 3, 3)
    assert_one_line_error(*vae("reconstruct", trained["art"], "--num", "0")[::2], "--num")
    assert_one_line_error(*vae("reconstruct", trained["art"], "--data-dir", tmp_path / "missing")[::2], "does not exist")


@pytest.mark.slow
def test_interpolate(trained: dict[str, Any], tmp_path: Path, test_split: torch.Tensor) -> None:
    art = trained["art"]
    rc, out, err = vae("interpolate", art, "--from", "3", "--to", "7", "--steps", "5")
    assert rc == 0, err
    assert out.strip() == str(art / "interpolation.png")
    img = png(art / "interpolation.png")
    assert img.size == grid_size(5 + 2, 7)  # one row: original, 5 decodings, original
    assert np.array_equal(tile(img, 0, 0), test_split[3, 0].numpy())
    assert np.array_equal(tile(img, 0, 6), test_split[7, 0].numpy())
    middle = [tile(img, 0, c) for c in range(1, 6)]
    assert all(t.std() > 0 for t in middle)
    rc, _, err = vae("interpolate", art, "--from", "0", "--to", "1", "--out", tmp_path / "i.png")
    assert rc == 0, err
    assert png(tmp_path / "i.png").size == grid_size(10 + 2, 12)
    n = test_split.shape[0]
    assert_one_line_error(*vae("interpolate", art, "--from", "0", "--to", str(n))[::2], "--to", str(n - 1))
    assert_one_line_error(*vae("interpolate", art, "--from", "-1", "--to", "2")[::2], "--from")
    assert_one_line_error(*vae("interpolate", art, "--from", "0", "--to", "2", "--steps", "1")[::2], "--steps")
    assert_one_line_error(*vae("interpolate", art, "--from", "0")[::2], "--to")


@pytest.mark.slow
def test_evaluate_importance_weighted_nll(trained: dict[str, Any]) -> None:
    # 200 importance samples of 100 images: 20,000 decodes, a few seconds on one thread.
    proc = run_cli(["evaluate", str(trained["art"]), "--iw-samples", "200", "--limit-eval-samples", "100", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"loss", "recon", "kl", "samples", "iw_nll"} <= set(result)
    assert result["samples"] == 100
    assert math.isclose(result["loss"], result["recon"] + result["kl"], rel_tol=1e-6)
    # IW-200 bounds -log p(x) more tightly than the ELBO, and a weak model's gap is small.
    assert result["iw_nll"] <= result["loss"]
    assert result["iw_nll"] >= 0.95 * result["loss"]


# ------------------------------------------------------------------------ W&B offline


@pytest.mark.slow
def test_offline_wandb_run(trained: dict[str, Any]) -> None:
    stdout = trained["stdout"]
    runs = sorted((trained["wandb_dir"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    run_id = run.name.rsplit("-", 1)[1]
    assert f"id {run_id}" in stdout
    assert f"wandb sync {run}" in stdout
    assert not (trained["art"] / "wandb").exists(), "WANDB_DIR is honoured"

    logs = list(run.glob("run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"]
    records = list(wandb_records(logs[0]))
    kinds = {r.WhichOneof("record_type") for r in records}
    assert {"run", "config", "history"} <= kinds

    rows = history_rows(records)
    keys = set().union(*rows)
    for key in ("train/loss", "valid/loss", "valid/recon", "valid/kl", "valid/active_units", "train/lr",
                "samples_per_second", "train/kl_weight", "epoch_seconds"):
        assert key in keys, key
    metrics = read_metrics(trained["art"])
    epoch_rows = [r for r in rows if "valid/loss" in r]
    assert [r["_step"] for r in epoch_rows] == [m["step"] for m in metrics]
    for logged, saved in zip(epoch_rows, metrics):
        assert logged["valid/loss"] == pytest.approx(saved["valid/loss"])
        # the epoch's pictures are logged at the epoch's global step
        for key in ("valid/reconstructions", "prior/samples"):
            assert logged[f"{key}/_type"] == "image-file"
            assert logged[f"{key}/width"] == grid_size(64, 8)[0]
            assert (run / "files" / logged[f"{key}/path"]).is_file()

    media = list((run / "files" / "media" / "images").rglob("*.png"))
    assert len(media) == 2 * EPOCHS
    assert all(png(p).size == grid_size(64, 8) for p in media)

    config: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
    saved_config = json.loads((trained["art"] / "config.json").read_text())
    assert config["optimizer"]["learning_rate"] == saved_config["optimizer"]["learning_rate"]
    assert config["epochs"] == EPOCHS and config["wandb_mode"] == "offline"
    for key in saved_config:
        assert config[key] == saved_config[key], key


@pytest.mark.slow
def test_kl_warmup_is_logged(trained: dict[str, Any]) -> None:
    rows = read_metrics(trained["art"])
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    weights = [r["train/kl_weight"] for r in rows]
    assert 0 < weights[0] < 1
    assert weights[1] > weights[0]
    assert weights[-1] == pytest.approx(1.0)  # warm-up over all epochs ends at the full weight
