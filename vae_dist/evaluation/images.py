"""PNG files, written atomically: grids of images, grey or colour (tiled as torchvision's make_grid, written by Pillow,
without importing torchvision's second) and the loss per epoch (matplotlib's Agg canvas, imported where used)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from vae_dist.run.fileio import atomic_write

PADDING = 2  # make_grid's gap between tiles
CURVES = {"train/loss": "#0072B2", "valid/loss": "#D55E00"}  # Okabe-Ito colours


def save_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int, row_labels: Sequence[str] = ()) -> None:
    """Tile (N, C, H, W) images in [0, 1], ``nrow`` per row with a PADDING-pixel black gap around and between
    them, into a PNG (greyscale for one channel, RGB for three); ``row_labels`` name the rows in turn, in a
    margin on their left."""
    from PIL import Image, ImageDraw, ImageFont
    tiles = images.detach().float().cpu().clamp(0.0, 1.0)
    n, c, h, w = tiles.shape
    cols, rows = min(nrow, n), math.ceil(n / min(nrow, n))
    grid = torch.zeros(c, rows * (h + PADDING) + PADDING, cols * (w + PADDING) + PADDING)
    for i, tile in enumerate(tiles):
        y, x = (PADDING + (h + PADDING) * k for k in divmod(i, cols))
        grid[:, y : y + h, x : x + w] = tile
    # Pillow takes (H, W) for greyscale and (H, W, 3) for RGB.
    picture = Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).squeeze(2).numpy())
    if row_labels:
        font = ImageFont.load_default()
        margin = max(math.ceil(font.getlength(label)) for label in row_labels) + 2 * PADDING
        labelled = Image.new(picture.mode, (margin + picture.width, picture.height))
        labelled.paste(picture, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for row in range(rows):
            label = row_labels[row % len(row_labels)]
            top, bottom = draw.textbbox((0, 0), label, font=font)[1::2]
            draw.text((PADDING, PADDING + row * (h + PADDING) + (h - top - bottom) // 2), label,
                      fill=255 if c == 1 else (255,) * 3, font=font)
        picture = labelled
    atomic_write(path, lambda f: picture.save(f, format="png"))


SIDE_BY_SIDE = ("original", "recon")  # the row labels of side_by_side's grid


def side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """The tiles of a grid of ``nrow`` columns whose rows alternate originals and their reconstructions
    (SIDE_BY_SIDE), each digit directly above its own; a short last row is filled with blank tiles."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals and reconstructions differ in shape: {tuple(originals.shape)}, "
                         f"{tuple(reconstructions.shape)}")
    blank = originals.new_zeros((-originals.shape[0] % nrow, *originals.shape[1:]))
    rows = [torch.cat([x, blank]).split(nrow) for x in (originals, reconstructions)]
    return torch.cat([tile for pair in zip(*rows) for tile in pair])


def _series(history: Sequence[dict], key: str) -> list[tuple[float, float]]:
    """Sorted (epoch, value) points of ``key``, skipping rows without it or with a non-finite value."""
    pts = [(float(row["epoch"]), float(row[key])) for row in history
           if isinstance(row.get("epoch"), (int, float)) and isinstance(row.get(key), (int, float))]
    return sorted((x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y))


def save_loss_curves(history: Sequence[dict], path: str | os.PathLike[str]) -> None:
    """A 640 x 400 chart of the losses against the epoch, titled with the dataset the rows' protocol names;
    a loss without points is in the legend as "(no data)"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(6.4, 4.0), dpi=100, facecolor="white", layout="constrained")
    ax = fig.add_subplot()
    epochs: list[float] = []
    for key, colour in CURVES.items():
        pts = _series(history, key)
        epochs += [x for x, _ in pts]
        # A marker on each point keeps a single epoch (no line segment) visible.
        ax.plot([x for x, _ in pts], [y for _, y in pts], color=colour, linewidth=2, marker="o", markersize=4.5,
                label=key if pts else f"{key} (no data)")
    lo, hi = (math.floor(min(epochs)), math.ceil(max(epochs))) if epochs else (1, 1)
    named = next((row["protocol"]["dataset"] for row in history if "dataset" in row.get("protocol", {})), None)
    # The limits keep the end markers off the axes and give one epoch a span; epochs are integers.
    ax.set(xlim=(lo - 0.5, hi + 0.5), xticks=range(lo, hi + 1, max(1, math.ceil((hi - lo + 1) / 8))), axisbelow=True,
           xlabel="epoch", ylabel="loss (nats per image)", title="Loss per epoch" + (f" ({named})" if named else ""))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="best")
    atomic_write(path, lambda f: FigureCanvasAgg(fig).print_png(f))
