"""Tests for vae_dist.images: grid geometry, pairing, PNG writing, loss charts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vae_dist.images import PADDING, image_grid, loss_curves, save_png, side_by_side


def _grid_size(n: int, nrow: int, side: int = 28, padding: int = PADDING) -> tuple[int, int]:
    """(width, height) that torchvision.utils.make_grid produces.

    make_grid puts ``padding`` pixels before every tile and one more strip at
    the end: width = cols*(side+padding)+padding, rows = ceil(n/cols).
    """
    cols = min(nrow, n)
    rows = -(-n // cols)
    return cols * (side + padding) + padding, rows * (side + padding) + padding


def _tile(img: Image.Image, row: int, col: int, side: int = 28) -> np.ndarray:
    step = side + PADDING
    arr = np.asarray(img)
    y, x = PADDING + row * step, PADDING + col * step
    return arr[y : y + side, x : x + side]


def test_grid_size_for_16_images_8_per_row() -> None:
    img = image_grid(torch.rand(16, 1, 28, 28), nrow=8)
    assert img.mode == "L"
    assert img.size == _grid_size(16, 8) == (242, 62)


def test_grid_accepts_flat_images_and_clamps() -> None:
    flat = torch.linspace(-1.0, 2.0, 3 * 784).reshape(3, 784)
    img = image_grid(flat, nrow=8)
    assert img.size == _grid_size(3, 8)
    # Out-of-range values are clamped, not wrapped around by the uint8 cast.
    first = _tile(img, 0, 0)
    assert first.min() == 0 and _tile(img, 0, 2).max() == 255


def test_grid_pixel_values_match_input() -> None:
    x = torch.zeros(2, 1, 28, 28)
    x[1] = 1.0
    img = image_grid(x, nrow=2)
    assert (_tile(img, 0, 0) == 0).all()
    assert (_tile(img, 0, 1) == 255).all()


def test_side_by_side_puts_each_reconstruction_below_its_original() -> None:
    n, nrow = 12, 8  # deliberately not a multiple of nrow
    originals = torch.stack([torch.full((1, 28, 28), (i + 1) / 100) for i in range(n)])
    recons = torch.stack([torch.full((1, 28, 28), (i + 1) / 100 + 0.5) for i in range(n)])
    img = side_by_side(originals, recons, nrow=nrow)
    assert img.mode == "L"
    # 2 chunks of 8 -> 4 rows of 8 tiles (the short chunk is padded with blanks).
    assert img.size == _grid_size(4 * nrow, nrow)
    for i in range(n):
        chunk, col = divmod(i, nrow)
        orig_px = _tile(img, 2 * chunk, col)
        recon_px = _tile(img, 2 * chunk + 1, col)
        assert int(orig_px[0, 0]) == int((i + 1) / 100 * 255 + 0.5)
        assert int(recon_px[0, 0]) == int(((i + 1) / 100 + 0.5) * 255 + 0.5)
    # Padding tiles in the last chunk stay blank.
    assert (_tile(img, 2, nrow - 1) == 0).all() and (_tile(img, 3, nrow - 1) == 0).all()


def test_side_by_side_rejects_mismatched_batches() -> None:
    with pytest.raises(ValueError):
        side_by_side(torch.rand(8, 1, 28, 28), torch.rand(7, 1, 28, 28))


def test_save_png_roundtrip(tmp_path) -> None:
    img = image_grid(torch.rand(16, 784), nrow=8)
    out = save_png(img, tmp_path / "nested" / "dir" / "grid.png")
    assert out == tmp_path / "nested" / "dir" / "grid.png"
    with Image.open(out) as back:
        assert back.format == "PNG"
        assert back.size == _grid_size(16, 8)
        assert np.asarray(back).std() > 0


def test_save_png_leaves_no_temp_files(tmp_path) -> None:
    img = image_grid(torch.rand(4, 1, 28, 28), nrow=2)
    save_png(img, tmp_path / "a.png")
    save_png(img, tmp_path / "a.png")  # overwrite in place
    save_png(img, str(tmp_path / "b.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_save_png_cleans_up_after_a_failed_write(tmp_path) -> None:
    class Broken(Image.Image):
        def save(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_png(Broken(), tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


def _history(epochs: int) -> list[dict]:
    return [
        {"epoch": e, "train/loss": 200.0 / e + 90.0, "valid/loss": 190.0 / e + 95.0}
        for e in range(1, epochs + 1)
    ]


# The chart's first two line colours (Okabe-Ito blue and vermillion).
BLUE, VERMILLION = (0, 114, 178), (213, 94, 0)


def _pixels_near(img: Image.Image, rgb: tuple[int, int, int], tol: int = 40) -> int:
    arr = np.asarray(img).astype(int)
    return int((np.abs(arr - np.array(rgb)).max(axis=2) <= tol).sum())


@pytest.mark.parametrize("epochs", [1, 5])
def test_loss_curves_size_and_not_blank(epochs: int) -> None:
    img = loss_curves(_history(epochs), width=640, height=400)
    assert img.mode == "RGB"
    assert img.size == (640, 400)
    arr = np.asarray(img)
    assert arr.std() > 0
    # Both series are drawn in their own colour (not just black axes and text).
    assert _pixels_near(img, BLUE) > 20 and _pixels_near(img, VERMILLION) > 20
    # Mostly white background: a clean chart, not a filled area.
    assert (arr.min(axis=2) > 240).mean() > 0.7


@pytest.mark.parametrize("size", [(320, 240), (641, 401), (333, 217), (1000, 700)])
def test_loss_curves_exact_size_for_any_dimensions(size: tuple[int, int]) -> None:
    assert loss_curves(_history(4), width=size[0], height=size[1]).size == size


def test_loss_curves_depend_on_the_history_and_are_deterministic() -> None:
    a = np.asarray(loss_curves(_history(5)))
    assert np.array_equal(a, np.asarray(loss_curves(_history(5))))
    other = _history(5)
    other[2]["valid/loss"] += 30.0
    assert not np.array_equal(a, np.asarray(loss_curves(other)))
    assert not np.array_equal(a, np.asarray(loss_curves(_history(6))))


def test_loss_curves_more_data_means_more_line() -> None:
    # Ten epochs of a series draw a longer line than one epoch's lone marker.
    one = _pixels_near(loss_curves(_history(1)), VERMILLION)
    ten = _pixels_near(loss_curves(_history(10)), VERMILLION)
    assert ten > one + 200


def test_loss_curves_custom_size_flat_line_and_missing_keys() -> None:
    history = [
        {"epoch": 1, "train/loss": 5.0},
        {"epoch": 2, "train/loss": 5.0, "valid/loss": 5.0},
        {"epoch": 3, "train/loss": 5.0},
    ]
    img = loss_curves(history, width=320, height=240)
    assert img.size == (320, 240)
    assert np.asarray(img).std() > 0
    assert _pixels_near(img, BLUE) > 20 and _pixels_near(img, VERMILLION) > 5


def test_loss_curves_tolerates_empty_and_non_finite() -> None:
    empty = loss_curves([])
    assert empty.size == (640, 400) and np.asarray(empty).std() > 0
    hist = _history(3)
    hist[1]["train/loss"] = float("nan")
    img = loss_curves(hist)
    assert np.asarray(img).std() > 0
    # A non-finite (or non-numeric) value is skipped for that key only: the same
    # picture as a history whose row lacks the key, and the other series still draws.
    skipped = _history(3)
    del skipped[1]["train/loss"]
    assert np.array_equal(np.asarray(img), np.asarray(loss_curves(skipped)))
    texty = _history(3)
    texty[1]["train/loss"] = "n/a"
    texty.append({"epoch": 4, "train/loss": float("inf"), "valid/loss": None})
    assert np.array_equal(np.asarray(img), np.asarray(loss_curves(texty)))
    assert hist[1]["train/loss"] != hist[1]["train/loss"]  # input left as it was (still NaN)


def test_loss_curves_draw_a_partial_epoch_row() -> None:
    # A run stopped by max_steps logs a row for its unfinished epoch, with the
    # trainer's other keys alongside; it is drawn like any other point.
    hist = [dict(r, complete_epoch=True, step=10 * r["epoch"]) for r in _history(3)]
    partial = hist + [{"epoch": 4, "step": 33, "complete_epoch": False, "train/loss": 150.0, "valid/loss": 151.0}]
    img = loss_curves(partial)
    assert img.size == (640, 400)
    assert not np.array_equal(np.asarray(img), np.asarray(loss_curves(hist)))


def test_loss_curves_rejects_a_size_too_small_to_draw() -> None:
    with pytest.raises(ValueError, match="too small"):
        loss_curves(_history(3), width=40, height=30)


@pytest.mark.slow
def test_matplotlib_is_imported_only_when_a_chart_is_drawn() -> None:
    # Importing the module (as the CLI does for --help) must not pay for matplotlib,
    # and drawing must not touch pyplot's global figure state.
    code = (
        "import sys; import vae_dist.images as m; "
        "assert 'matplotlib' not in sys.modules; "
        "m.loss_curves([{'epoch': 1, 'train/loss': 1.0}]); "
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
