"""Turn tensors and metric histories into PNG files.

This module's one job is pictures: image grids of digits (samples and
original-vs-reconstruction comparisons), a loss-per-epoch line chart, and an
atomic PNG writer. It uses only Pillow and ``torchvision.utils.make_grid`` so
that the trainer does not depend on matplotlib or on a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from vae_dist.fileio import atomic_write

__all__ = ["image_grid", "side_by_side", "save_png", "loss_curves"]

# make_grid's gap between tiles; the tests rely on this value to predict sizes.
PADDING = 2

# Distinct, colour-blind-friendly line colours (Okabe-Ito palette); cycled if
# more keys than colours are asked for.
_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermillion
    (0, 158, 115),  # bluish green
    (204, 121, 167),  # reddish purple
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (0, 0, 0),  # black
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


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _padded_range(values: Iterable[float], rel: float, min_pad: float) -> tuple[float, float]:
    vals = list(values)
    lo, hi = min(vals), max(vals)
    span = hi - lo
    # A flat line (or a single point) has zero span; widen it so the mapping
    # below never divides by zero and the line sits mid-plot.
    pad = span * rel if span > 0 else max(abs(lo) * 0.05, min_pad)
    return lo - pad, hi + pad


def _x_ticks(lo_epoch: int, hi_epoch: int, max_ticks: int = 8) -> list[int]:
    # Epochs are integers; a fractional tick label would be meaningless.
    step = max(1, math.ceil((hi_epoch - lo_epoch + 1) / max_ticks))
    return list(range(lo_epoch, hi_epoch + 1, step))


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def loss_curves(
    history: Sequence[dict],
    keys: Sequence[str] = ("train/loss", "valid/loss"),
    width: int = 640,
    height: int = 400,
) -> Image.Image:
    """Line chart of ``history[i][key]`` against ``history[i]["epoch"]`` for each key.

    Rows without a key (or with a non-finite value) are skipped for that key
    only, so a validation curve logged every other epoch still draws.
    """
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    series: dict[str, list[tuple[float, float]]] = {}
    for key in keys:
        pts: list[tuple[float, float]] = []
        for row in history:
            if key not in row or "epoch" not in row:
                continue
            try:
                x, y = float(row["epoch"]), float(row[key])
            except (TypeError, ValueError):
                continue
            # A diverged epoch (nan/inf) would wreck the y range for the rest.
            if math.isfinite(x) and math.isfinite(y):
                pts.append((x, y))
        series[key] = sorted(pts)

    title = "loss per epoch (nats/image)"
    tw, th = _text_size(draw, title, font)
    draw.text(((width - tw) // 2, 6), title, fill="black", font=font)

    all_pts = [p for pts in series.values() for p in pts]
    if all_pts:
        y_lo, y_hi = _padded_range((p[1] for p in all_pts), rel=0.05, min_pad=1.0)
        ep_lo = int(math.floor(min(p[0] for p in all_pts)))
        ep_hi = int(math.ceil(max(p[0] for p in all_pts)))
    else:
        y_lo, y_hi, ep_lo, ep_hi = 0.0, 1.0, 1, 1
    # Half an epoch of slack on each side keeps end markers off the axes and
    # gives a single epoch a non-zero x span.
    x_lo, x_hi = ep_lo - 0.5, ep_hi + 0.5

    y_ticks = [y_lo + (y_hi - y_lo) * i / 4 for i in range(5)]
    label_w = max(_text_size(draw, _fmt(v), font)[0] for v in y_ticks)
    left = 12 + label_w
    right = width - 16
    top = 12 + th + 10
    legend_h = (_text_size(draw, "Ag", font)[1] + 6) * max(1, len(keys))
    # Room under the plot for the tick labels and, below them, the axis name.
    bottom = height - 2 * th - 24
    if right - left < 20 or bottom - top < 20:
        raise ValueError(f"chart size {width}x{height} is too small to draw")

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
        py = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
        return px, py

    # Axes and ticks.
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)
    for v in y_ticks:
        _, py = to_px(x_lo, v)
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.line([(left + 1, py), (right, py)], fill=(230, 230, 230))
        lw, lh = _text_size(draw, _fmt(v), font)
        draw.text((left - 6 - lw, py - lh / 2 - 1), _fmt(v), fill="black", font=font)
    for ep in _x_ticks(ep_lo, ep_hi):
        px, _ = to_px(ep, y_lo)
        draw.line([(px, bottom), (px, bottom + 4)], fill="black")
        lw, _ = _text_size(draw, str(ep), font)
        draw.text((px - lw / 2, bottom + 6), str(ep), fill="black", font=font)
    ew, _ = _text_size(draw, "epoch", font)
    draw.text(((left + right - ew) / 2, bottom + th + 14), "epoch", fill=(90, 90, 90), font=font)

    # Curves: a line through the points plus a marker on each, so a single
    # epoch (no line segment) is still visible.
    for i, key in enumerate(keys):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = [to_px(x, y) for x, y in series[key]]
        if len(pts) >= 2:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour, outline=colour)

    # Legend in the top-right corner of the plot area.
    labels = [key if series[key] else f"{key} (no data)" for key in keys]
    row_h = legend_h // max(1, len(keys))
    text_w = max((_text_size(draw, lab, font)[0] for lab in labels), default=0)
    lx = right - text_w - 34
    ly = top + 6
    if keys:
        draw.rectangle([lx - 6, ly - 4, right - 4, ly + legend_h], fill="white", outline=(160, 160, 160))
    for i, label in enumerate(labels):
        colour = _COLOURS[i % len(_COLOURS)]
        cy = ly + i * row_h + row_h / 2
        draw.line([(lx, cy), (lx + 20, cy)], fill=colour, width=3)
        _, lh = _text_size(draw, label, font)
        draw.text((lx + 26, cy - lh / 2 - 1), label, fill="black", font=font)
    return img
