"""Tests for vae_dist.images: grid geometry, pairing, PNG writing, loss charts."""

from __future__ import annotations

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


@pytest.mark.parametrize("epochs", [1, 5])
def test_loss_curves_size_and_not_blank(epochs: int) -> None:
    img = loss_curves(_history(epochs), width=640, height=400)
    assert img.mode == "RGB"
    assert img.size == (640, 400)
    arr = np.asarray(img)
    assert arr.std() > 0
    # Both series are drawn in colour (not just black axes and text).
    colourful = (arr.max(axis=2).astype(int) - arr.min(axis=2).astype(int)) > 60
    assert colourful.sum() > 20


def test_loss_curves_custom_size_flat_line_and_missing_keys() -> None:
    history = [
        {"epoch": 1, "train/loss": 5.0},
        {"epoch": 2, "train/loss": 5.0, "valid/loss": 5.0},
        {"epoch": 3, "train/loss": 5.0},
    ]
    img = loss_curves(history, width=320, height=240)
    assert img.size == (320, 240)
    assert np.asarray(img).std() > 0


def test_loss_curves_tolerates_empty_and_non_finite() -> None:
    assert loss_curves([]).size == (640, 400)
    hist = _history(3)
    hist[1]["train/loss"] = float("nan")
    assert np.asarray(loss_curves(hist)).std() > 0
