"""Pictures: what a model shows (evaluation.evaluate's previews, the API's TrainedVAE), the grids
they are drawn in (evaluation.images), the previews training writes each epoch, and the sample /
reconstruct / interpolate commands, run in this process on a model file written from a
seeded untrained VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import check_ok, copy_run, main_in_process, one_error_line, snapshot
from vae_dist.evaluation import evaluate
from vae_dist.evaluation import images
from vae_dist.cli.app import _output_path
from vae_dist.config import ModelConfig, TrainingConfig
from vae_dist.errors import VaeDistError
from vae_dist.evaluation.api import TrainedVAE, manifold_grid
from vae_dist.evaluation.images import PADDING
from vae_dist.models import build
from vae_dist.models.protocol import Model
from vae_dist.run.checkpoint import MANIFEST
from vae_dist.run.modelfile import save_model_file
from vae_dist.run.folder import CONFIG, MARKER, METRICS, MODEL
from vae_dist.training.trainer import NUM_PREVIEW, NUM_SAMPLES, epoch_previews

SIDE = 28


def grid_size(n: int, nrow: int) -> tuple[int, int]:
    """(width, height) of torchvision's make_grid: ``PADDING`` before every tile plus one
    closing strip, ``min(nrow, n)`` tiles per row."""
    cols = min(nrow, n)
    rows = -(-n // cols)
    return cols * (SIDE + PADDING) + PADDING, rows * (SIDE + PADDING) + PADDING


def png(path: Path) -> Image.Image:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.convert("L")


def tile(img: Image.Image, row: int, col: int, left: int = 0) -> np.ndarray:
    """The tile at (row, col) of a grid drawn ``left`` pixels from the image's left edge (after its labels)."""
    step = SIDE + PADDING
    y, x = PADDING + row * step, left + PADDING + col * step
    return np.asarray(img)[y : y + SIDE, x : x + SIDE]


def margin(img: Image.Image, tiles: int, nrow: int) -> int:
    """The width of a labelled grid's margin: what the image has beyond the grid of ``tiles``."""
    width, height = grid_size(tiles, nrow)
    assert img.height == height and img.width > width
    return img.width - width


def model_run(root: Path, latent: int = 2, data_dir: Path | None = None) -> Path:
    """A folder holding a model file of a seeded, untrained small MLP."""
    cfg = TrainingConfig.from_dict({
        "model": {"kind": "mlp", "hidden_sizes": [16], "latent_size": latent},
        "data": {"data_dir": str(data_dir) if data_dir else None},
    })
    torch.manual_seed(0)
    save_model_file(root / MODEL, build(cfg).state_dict(), cfg)
    (root / MARKER).write_text("{}")
    return root


# --- what a model shows -----------------------------------------------------------------------------


def _small_model(kind: str, latent: int = 8) -> Model:
    torch.manual_seed(0)
    return build(TrainingConfig(model=ModelConfig(kind=kind, latent_size=latent)))


def test_prior_samples_are_seeded_images() -> None:
    model = _small_model("mlp").train()
    a = evaluate.prior_samples(model, 5, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    b = evaluate.prior_samples(model, 5, seed=3)
    c = evaluate.prior_samples(model, 5, seed=4)
    assert a.shape == (5, 1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert model.training, "the model's mode is restored"


def test_reconstructions_and_interpolation_use_the_posterior_mean() -> None:
    model = _small_model("mlp", 4)
    x = torch.rand(3, 1, 28, 28)
    rec = evaluate.reconstructions(model, x)
    assert rec.shape == x.shape and not rec.requires_grad
    with torch.no_grad():
        expected = torch.sigmoid(model.decode(model.encode(x)[0]))
    assert torch.allclose(rec, expected)
    line = TrainedVAE(model, TrainingConfig(model=ModelConfig(kind="mlp", latent_size=4)), {}).interpolate(x[:1], x[2:], 5)
    assert line.shape == (5, 1, 28, 28)
    assert torch.allclose(line[0], rec[0], atol=1e-6) and torch.allclose(line[-1], rec[2], atol=1e-6)
    with torch.no_grad():
        mu = model.encode(x)[0]
        mid = torch.sigmoid(model.decode(((mu[0] + mu[2]) / 2).unsqueeze(0)))[0]
    assert torch.allclose(line[2], mid, atol=1e-6)
    with pytest.raises(VaeDistError, match="steps"):
        TrainedVAE(model, TrainingConfig(), {}).interpolate(x[:1], x[1:2], steps=1)


def test_manifold_grid_and_latent_check() -> None:
    z = manifold_grid(4)
    assert z.shape == (16, 2)
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 4))
    # row-major: z1 grows along a row, z2 falls down the rows; symmetric about 0
    assert torch.allclose(z[:4, 0], q) and torch.allclose(z[::4, 1], q.flip(0))
    assert torch.allclose(q, -q.flip(0), atol=1e-6)
    assert TrainedVAE(_small_model("mlp", 2), TrainingConfig(), {}).manifold(3).shape == (9, 1, 28, 28)
    with pytest.raises(VaeDistError, match="2-dimensional"):
        TrainedVAE(_small_model("mlp", 3), TrainingConfig(), {}).manifold(3)


# --- grids and charts ----------------------------------------------------------------------


def test_side_by_side_puts_each_reconstruction_below_its_original() -> None:
    n, nrow = 12, 8  # not a multiple of nrow
    originals = torch.arange(1, n + 1).float().view(n, 1, 1, 1).expand(n, 1, 28, 28) / 100
    tiles = images.side_by_side(originals, originals + 0.5, nrow=nrow)
    assert tiles.shape == (4 * nrow, 1, 28, 28)  # 2 rows of originals, each with its row of reconstructions
    for i in range(n):
        chunk, col = divmod(i, nrow)
        assert torch.equal(tiles[2 * chunk * nrow + col], originals[i])
        assert torch.equal(tiles[(2 * chunk + 1) * nrow + col], originals[i] + 0.5)
    assert not tiles[2 * nrow + 4 :: nrow].any() and not tiles[-4:].any()  # the short row's blanks
    with pytest.raises(ValueError):
        images.side_by_side(originals, originals[:-1])


def test_row_labels_go_in_a_margin_left_of_the_unchanged_grid(tmp_path) -> None:
    tiles = images.side_by_side(torch.rand(12, 1, 28, 28), torch.rand(12, 1, 28, 28))
    images.save_grid(tiles, tmp_path / "plain.png", 8)
    images.save_grid(tiles, tmp_path / "labelled.png", 8, images.SIDE_BY_SIDE)
    plain, labelled = np.asarray(png(tmp_path / "plain.png")), np.asarray(png(tmp_path / "labelled.png"))
    left = labelled.shape[1] - plain.shape[1]
    assert left > 0 and np.array_equal(labelled[:, left:], plain)  # the tiles' pixels as without labels
    step = SIDE + PADDING
    bands = [labelled[PADDING + r * step : PADDING + r * step + SIDE, :left] for r in range(4)]
    assert all(band.max() > 0 for band in bands)  # each row is named ...
    assert np.array_equal(bands[0], bands[2]) and np.array_equal(bands[1], bands[3])  # ... in turn
    assert not np.array_equal(bands[0], bands[1])
    assert not labelled[:, :left].any(axis=1)[[PADDING + r * step - 1 for r in range(4)]].any()  # inside its row


def test_a_colour_grid_is_an_rgb_png_and_a_grey_one_greyscale(tmp_path) -> None:
    colour = torch.zeros(3, 3, 4, 5)
    colour[0, 0], colour[1, 1], colour[2] = 1.0, 1.0, 0.5  # red, green, grey
    images.save_grid(colour, tmp_path / "colour.png", nrow=2)
    images.save_grid(colour[:, :1], tmp_path / "grey.png", nrow=2)
    with Image.open(tmp_path / "colour.png") as rgb, Image.open(tmp_path / "grey.png") as grey:
        assert rgb.mode == "RGB" and grey.mode == "L" and rgb.size == grey.size == (2 * 7 + 2, 2 * 6 + 2)
        pixels = np.asarray(rgb)
        assert pixels[2, 2].tolist() == [255, 0, 0] and pixels[2, 9].tolist() == [0, 255, 0]
        assert pixels[8, 2].tolist() == [128] * 3 and pixels[0, 0].tolist() == [0, 0, 0]  # the padding is black
        assert np.asarray(grey)[2, 2] == 255 and np.asarray(grey)[2, 9] == 0


def test_loss_series_skip_only_what_cannot_be_drawn() -> None:
    history = [
        {"epoch": 3, "train/loss": 5.0, "valid/loss": 6.0},
        {"epoch": 1, "train/loss": 7.0},
        {"epoch": 2, "train/loss": float("nan"), "valid/loss": "n/a"},
        {"epoch": 4, "train/loss": float("inf"), "valid/loss": None},
        {"train/loss": 1.0},
    ]
    assert images._series(history, "train/loss") == [(1.0, 7.0), (3.0, 5.0)]  # sorted by epoch
    assert images._series(history, "valid/loss") == [(3.0, 6.0)]
    assert images._series(history, "valid/kl") == []


# --- the previews training writes ----------------------------------------------------------


def test_epoch_previews_go_under_images_and_to_the_tracker(tmp_path, monkeypatch) -> None:
    saved, logged, said = {}, [], []
    monkeypatch.setattr(images, "save_grid", lambda tiles, path, nrow, row_labels: saved.update(
        {Path(path): (tiles, row_labels)}))

    class Tracker:
        def log_images(self, pictures, step):
            logged.append((pictures, step))

    test = torch.randint(0, 256, (NUM_PREVIEW + 5, 1, 28, 28), dtype=torch.uint8)
    model = _small_model("mlp", 2)
    epoch_previews(tmp_path, Tracker(), said.append, test, seed=7)(model, 3, 30)
    recon, samples = tmp_path / "images" / "epoch-003-reconstructions.png", tmp_path / "images" / "epoch-003-samples.png"
    x = test[:NUM_PREVIEW].float() / 255
    assert set(saved) == {recon, samples}
    assert torch.equal(saved[recon][0], images.side_by_side(x, evaluate.reconstructions(model, x)))
    assert torch.equal(saved[samples][0], evaluate.prior_samples(model, NUM_SAMPLES, 7))
    assert (saved[recon][1], saved[samples][1]) == (images.SIDE_BY_SIDE, ())  # which row is which; samples are alike
    assert logged == [({"valid/reconstructions": str(recon), "prior/samples": str(samples)}, 30)]

    def full(tiles, path, nrow, row_labels):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images, "save_grid", full)
    epoch_previews(tmp_path, Tracker(), said.append, test, seed=7)(model, 4, 40)  # a preview is not worth a run
    assert len(said) == 2 and all("not written" in line and "training goes on" in line for line in said)


@pytest.mark.slow
def test_training_writes_each_epochs_previews_and_the_loss_curves(finished_run: Path, data_dir: Path) -> None:
    recon = png(finished_run / "images" / "epoch-001-reconstructions.png")
    samples = png(finished_run / "images" / "epoch-001-samples.png")
    left = margin(recon, 2 * NUM_PREVIEW, 8)  # the rows' labels
    assert samples.size == grid_size(NUM_SAMPLES, 8)
    test = evaluate.test_split(TrainingConfig(), data_dir, 0).images
    for i in (0, 9, NUM_PREVIEW - 1):
        row, col = 2 * (i // 8), i % 8
        assert np.array_equal(tile(recon, row, col, left), test[i, 0].numpy())
        assert tile(recon, row + 1, col, left).std() > 0
    assert np.asarray(samples).std() > 0
    with Image.open(finished_run / "loss_curves.png") as curves:
        assert curves.format == "PNG" and curves.size == (640, 400)
        assert np.asarray(curves.convert("L")).std() > 0


# --- the picture commands ------------------------------------------------------------------


@pytest.mark.slow
def test_sample_is_seeded_and_written_beside_the_model(tmp_path, capsys) -> None:
    run = model_run(tmp_path)
    ran = main_in_process(["sample", str(run), "--num", "10", "--seed", "5"], capsys)
    check_ok(ran)
    assert ran.stdout.strip() == str(run / "samples.png")
    img = png(run / "samples.png")
    assert img.size == grid_size(10, 4)  # nrow = ceil(sqrt(10))
    assert np.asarray(img).std() > 0
    check_ok(main_in_process(["sample", str(run / MODEL), "--num", "10", "--seed", "5", "--out",
                              str(tmp_path / "again.png")], capsys))
    assert (tmp_path / "again.png").read_bytes() == (run / "samples.png").read_bytes()
    check_ok(main_in_process(["sample", str(run), "--num", "10", "--seed", "6", "--out", str(tmp_path / "other.png")],
                             capsys))
    assert not np.array_equal(np.asarray(png(tmp_path / "other.png")), np.asarray(img))
    check_ok(main_in_process(["sample", str(run), "--manifold", "--grid-size", "5"], capsys))
    assert png(run / "manifold.png").size == grid_size(25, 5)


@pytest.mark.slow
def test_reconstruct_puts_test_images_above_their_reconstructions(tmp_path, data_dir, capsys) -> None:
    run = model_run(tmp_path, data_dir=data_dir)
    ran = main_in_process(["reconstruct", str(run / MODEL), "--num", "12"], capsys)  # the training's data dir
    check_ok(ran)
    assert ran.stdout.strip() == str(run / "reconstructions.png")  # beside the model file
    img = png(run / "reconstructions.png")
    left = margin(img, 4 * 8, 8)  # 12 images: 2 rows of originals, each above its reconstructions, labelled
    test = evaluate.test_split(TrainingConfig(), data_dir, 0).images
    for i in (0, 11):
        row, col = 2 * (i // 8), i % 8
        assert np.array_equal(tile(img, row, col, left), test[i, 0].numpy())
        assert tile(img, row + 1, col, left).std() > 0
    error = one_error_line(main_in_process(["reconstruct", str(run), "--data-dir", str(tmp_path / "missing")], capsys))
    assert "does not exist" in error


@pytest.mark.slow
def test_interpolate_runs_from_one_test_image_to_another(tmp_path, data_dir, capsys) -> None:
    run = model_run(tmp_path, data_dir=data_dir)
    check_ok(main_in_process(["interpolate", str(run), "--from", "3", "--to", "7", "--steps", "5"], capsys))
    img = png(run / "interpolation.png")
    assert img.size == grid_size(5 + 2, 7)  # one row: the image, 5 decodings, the other image
    test = evaluate.test_split(TrainingConfig(), data_dir, 0).images
    assert np.array_equal(tile(img, 0, 0), test[3, 0].numpy())
    assert np.array_equal(tile(img, 0, 6), test[7, 0].numpy())
    assert all(tile(img, 0, c).std() > 0 for c in range(1, 6))
    n = test.shape[0]
    assert str(n - 1) in one_error_line(main_in_process(["interpolate", str(run), "--from", "0", "--to", str(n)], capsys))
    assert "--from" in one_error_line(main_in_process(["interpolate", str(run), "--from", "-1", "--to", "2"], capsys))


@pytest.mark.slow
def test_pictures_of_a_checkpoint_go_beside_the_runs_and_change_nothing_of_it(finished_run, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    checkpoint = max((run / "checkpoints").glob("step-*"))
    before = snapshot(run)
    for command, name in (("sample", "samples"), ("reconstruct", "reconstructions")):
        ran = main_in_process([command, str(checkpoint), "--num", "4"], capsys)
        check_ok(ran)
        assert ran.stdout.strip() == str(run / f"{name}-{checkpoint.name}.png")
        png(run / f"{name}-{checkpoint.name}.png")
    assert {k: v for k, v in snapshot(run).items() if not k.endswith(f"-{checkpoint.name}.png")} == before


@pytest.mark.parametrize("args, needle", [
    (["sample", "RUN", "--num", "0"], "--num"),
    (["sample", "RUN", "--manifold", "--grid-size", "0"], "--grid-size"),
    (["sample", "RUN", "--seed", "-1"], "--seed"),
    (["sample", "RUN", "--seed", str(2**63)], "--seed"),
    (["sample", "RUN", "--seed", str(2**64)], "--seed"),
    (["sample", "RUN/nothing-here"], "no trained model"),
    (["sample", "RUN", "--out", "RUN"], "is a directory"),
    (["sample", "RUN", "--manifold"], "2-dimensional latent space; this one has 3"),
    (["reconstruct", "RUN", "--num", "0"], "--num"),
    (["interpolate", "RUN", "--from", "0", "--to", "2", "--steps", "1"], "--steps"),
    (["interpolate", "RUN", "--from", "0"], "--to"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_picture_arguments_are_one_line_and_write_nothing(tmp_path, capsys, args, needle) -> None:
    (tmp_path / "run").mkdir()
    run = model_run(tmp_path / "run", latent=3)
    before = sorted(p.name for p in run.iterdir())
    assert needle in one_error_line(main_in_process([a.replace("RUN", str(run)) for a in args], capsys))
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("name", [MODEL, CONFIG, METRICS, MARKER, "checkpoints/step-000000016/model.safetensors",
                                  "images/epoch-001-samples.png", "NOTES.txt", "link/model.safetensors"])
def test_a_picture_never_replaces_anything_in_a_run_but_a_picture(tmp_path, name) -> None:
    run = model_run(tmp_path)
    (run / "link").symlink_to(run)  # a path through a link into the run is inside it too
    (run / "NOTES.txt").write_text("mine")
    with pytest.raises(VaeDistError, match="inside the run folder"):
        _output_path(run, run / name, "samples.png")
    # an earlier picture may be replaced, a new name at the top level taken, and a file
    # of that name elsewhere is not the run's
    assert _output_path(run, run / "samples.png", "samples.png") == run / "samples.png"
    assert _output_path(run, run / "mine.png", "samples.png") == run / "mine.png"
    assert _output_path(run, tmp_path.parent / name, "samples.png") == tmp_path.parent / name


def test_a_checkpoints_picture_goes_beside_its_runs_named_after_it(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    run = model_run(tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-000000016"
    copied = tmp_path / "backup" / "step-000000016"
    for folder in (checkpoint, copied):
        folder.mkdir(parents=True)
        (folder / MANIFEST).write_text("{}")
    for name in ("samples.png", "reconstructions.png", "interpolation.png"):
        want = run / name.replace(".png", "-step-000000016.png")
        assert _output_path(checkpoint, None, name) == want
        want.write_bytes(b"an earlier picture")  # which the same command may replace
        assert _output_path(checkpoint, None, name) == want
    assert _output_path(copied, None, "samples.png") == tmp_path / "backup" / "samples-step-000000016.png"
    assert _output_path(checkpoint, tmp_path / "mine.png", "samples.png") == tmp_path / "mine.png"


def test_a_default_picture_path_the_run_refuses_asks_for_out(tmp_path) -> None:
    run = model_run(tmp_path)
    (run / "export").mkdir()  # a model file copied into a folder of the run
    with pytest.raises(VaeDistError) as e:
        _output_path(run / "export" / MODEL, None, "samples.png")
    assert str(e.value).startswith(f"the picture path {run / 'export' / 'samples.png'} is inside the run folder")
    assert str(e.value).endswith("give --out")


def test_a_picture_is_not_written_through_a_linked_run_folder(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(VaeDistError, match="symbolic link"):
        _output_path(link, None, "samples.png")
    assert _output_path(run, None, "samples.png") == run / "samples.png"
