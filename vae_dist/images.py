"""Turn tensors and metric histories into PNG files.

This module's one job is pictures: image grids of digits (samples and
original-vs-reconstruction comparisons), a loss-per-epoch line chart, and an
atomic PNG writer. Grids use Pillow and ``torchvision.utils.make_grid``; the
chart uses matplotlib's Agg canvas (no display, no pyplot global state),
imported only when a chart is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vae_dist.fileio import atomic_write

__all__ = ["image_grid", "side_by_side", "save_png", "loss_curves"]

# make_grid's gap between tiles; the tests rely on this value to predict sizes.
PADDING = 2

# Distinct, colour-blind-friendly line colours (Okabe-Ito palette); cycled if
# more keys than colours are asked for.
_COLOURS: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#000000",  # black
)


def _as_image_batch(images: torch.Tensor) -> torch.Tensor:
    """Return a detached float CPU tensor shaped (N, 1, H, W) with values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(images).__name__}")
    # Model outputs may be bf16/fp16 (mixed precision) and live on a GPU; PIL
    # needs plain float32 on the CPU, and autograd history must not leak.
    x = images.detach().to(device="cpu", dtype=torch.float32)
    if x.dim() == 2:
        # Flattened (N, 784) batches come straight out of an MLP decoder.
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(f"cannot reshape {x.shape[1]} features into a square image")
        x = x.reshape(x.shape[0], 1, side, side)
    elif x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() != 4:
        raise ValueError(f"expected (N,1,H,W), (N,H,W) or (N,H*W) images, got shape {tuple(images.shape)}")
    if x.shape[0] == 0:
        raise ValueError("cannot draw a grid of zero images")
    # Decoder logits passed through sigmoid can overshoot by rounding, and
    # NaNs from a diverged run must not crash the PNG conversion.
    return torch.nan_to_num(x, nan=0.0).clamp_(0.0, 1.0)


def _grid_to_pil(grid: torch.Tensor) -> Image.Image:
    # Same rounding as torchvision.utils.save_image, so our PNGs match it.
    arr = grid[0].mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="L")


def image_grid(images: torch.Tensor, nrow: int) -> Image.Image:
    """Tile a batch of [0,1] greyscale images into one "L" image, ``nrow`` per row."""
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    x = _as_image_batch(images)
    # make_grid repeats a single channel to three; channel 0 is the grey value.
    from torchvision.utils import make_grid  # here: importing torchvision costs ~1 s per process

    grid = make_grid(x, nrow=nrow, padding=PADDING, pad_value=0.0)
    return _grid_to_pil(grid)


def side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor, nrow: int = 8) -> Image.Image:
    """Grid whose rows alternate originals and their reconstructions.

    Row 2k holds originals ``k*nrow .. k*nrow+nrow-1`` and row 2k+1 the
    reconstructions of exactly those images, so each digit sits directly
    above its reconstruction.
    """
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    orig = _as_image_batch(originals)
    recon = _as_image_batch(reconstructions)
    if orig.shape != recon.shape:
        raise ValueError(
            f"originals and reconstructions must have the same shape, got {tuple(orig.shape)} and {tuple(recon.shape)}"
        )
    tiles: list[torch.Tensor] = []
    for start in range(0, orig.shape[0], nrow):
        o = orig[start : start + nrow]
        r = recon[start : start + nrow]
        missing = nrow - o.shape[0]
        if missing:
            # make_grid fills rows left to right, so a short last chunk would
            # shift every later tile; blank tiles keep the pairs aligned.
            blank = torch.zeros((missing, *o.shape[1:]), dtype=o.dtype)
            o = torch.cat([o, blank])
            r = torch.cat([r, blank])
        tiles.extend([o, r])
    from torchvision.utils import make_grid

    grid = make_grid(torch.cat(tiles), nrow=nrow, padding=PADDING, pad_value=0.0)
    return _grid_to_pil(grid)


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` as PNG at ``path`` atomically; create parent directories."""
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def _series(history: Sequence[dict], key: str) -> list[tuple[float, float]]:
    """Sorted (epoch, value) points of ``key``; rows without it, or with a value that
    is not a finite number (a diverged epoch), are skipped for this key only."""
    pts: list[tuple[float, float]] = []
    for row in history:
        if key not in row or "epoch" not in row:
            continue
        try:
            x, y = float(row["epoch"]), float(row[key])
        except (TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            pts.append((x, y))
    return sorted(pts)


def loss_curves(
    history: Sequence[dict],
    keys: Sequence[str] = ("train/loss", "valid/loss"),
    width: int = 640,
    height: int = 400,
) -> Image.Image:
    """Line chart of ``history[i][key]`` against ``history[i]["epoch"]`` for each key, as
    an RGB image of exactly ``width`` x ``height`` pixels.

    Rows without a key (or with a non-finite value) are skipped for that key only, so a
    validation curve logged every other epoch still draws; a key with no points at all is
    listed in the legend as "(no data)".
    """
    if width < 120 or height < 90:
        raise ValueError(f"chart size {width}x{height} is too small to draw")
    # Imported here: matplotlib costs ~0.3 s to import and only this function needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    # Text scales with the picture, within readable bounds.
    fs = max(7.5, min(11.0, 10.0 * min(width / 640, height / 400)))
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white", layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    all_x: list[float] = []
    for i, key in enumerate(keys):
        pts = _series(history, key)
        colour = _COLOURS[i % len(_COLOURS)]
        label = key if pts else f"{key} (no data)"
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        all_x.extend(xs)
        # A marker on each point keeps a single epoch (no line segment) visible.
        ax.plot(xs, ys, color=colour, linewidth=2, marker="o", markersize=max(3.0, fs * 0.45), label=label)

    if all_x:
        lo, hi = math.floor(min(all_x)), math.ceil(max(all_x))
    else:
        lo, hi = 1, 1
    # Half an epoch of slack keeps end markers off the axes and gives one epoch a span.
    ax.set_xlim(lo - 0.5, hi + 0.5)
    # Epochs are integers: a fractional tick label would be meaningless.
    ax.set_xticks(range(lo, hi + 1, max(1, math.ceil((hi - lo + 1) / 8))))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=fs * 0.9)
    ax.set_xlabel("epoch", fontsize=fs)
    ax.set_ylabel("loss (nats per image)", fontsize=fs)
    ax.set_title("Loss per epoch", fontsize=fs * 1.15)
    if keys:
        ax.legend(fontsize=fs * 0.9, frameon=True, framealpha=0.9, edgecolor="0.75", loc="best")

    canvas.draw()
    img = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
    if img.size != (width, height):
        # figsize * dpi can round one pixel short for some sizes; callers rely on the size.
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return img
