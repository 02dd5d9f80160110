"""The picture commands (sample, reconstruct, interpolate), registered by cli.app: each loads a model
through the Python API (vae_dist.load), runs on the CPU, writes one PNG and prints its path."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from vae_dist.errors import VaeDistError
from vae_dist.run.fileio import checking, print_out
from vae_dist.run.folder import MARKER, RUN_NAMES

if TYPE_CHECKING:  # torch is imported where used: `--help` and usage errors stay fast
    import torch

MAX_IMAGES, MAX_GRID_SIZE, MAX_STEPS = 10_000, 100, 1_000  # beyond these a PNG is absurd (and slow) long before useful
# What these commands write in a run folder by default (the only names they replace there).
PICTURES = ("samples.png", "manifold.png", "reconstructions.png", "interpolation.png")
ARTIFACT_HELP = "A folder written by `train`, its model.safetensors, or one of its checkpoints/step-N folders."
DATA_DIR_HELP = "Folder of the run's dataset (default: the one used in training)."


def _output_path(artifact_dir: Path, out: Optional[Path], default_name: str) -> Path:
    """--out as given, else ``default_name`` in the artifact folder (beside the model file when given the file)."""
    if out is not None:
        target = out.expanduser()
        with checking(target, VaeDistError, "--out"):
            if target.is_dir():
                raise VaeDistError(f"--out {target} is a directory; give a file name such as {target / default_name}")
    else:
        src = artifact_dir.expanduser()
        with checking(src, VaeDistError, "artifact path"):
            folder = src if src.is_dir() else src.parent
            if folder.is_symlink():  # as train refuses it: a write would land where the link points
                raise VaeDistError(f"{folder} is a symbolic link; vae_dist does not write through links (give --out)")
        target = folder / default_name
    with checking(target, VaeDistError, "--out" if out is not None else "picture path"):
        # Inside a run folder (at any depth, through links too) a picture goes only at its top level, as a
        # picture name or a new name: never over the run's model, config, records or checkpoints, nor a user's file.
        for path in (Path(os.path.abspath(target)), target.resolve()):
            run = next((p for p in path.parents if (p / MARKER).is_file()), None)
            new_file = path.name not in RUN_NAMES and not (path.exists() or path.is_symlink())
            if run is not None and (path.parent != run or not (path.name in PICTURES or new_file)):
                raise VaeDistError(f"--out {target} is inside the run folder {run}, where a picture is written only at "
                                   f"its top level, as one of {', '.join(PICTURES)} or under a new name; give another path")
    return target


def _save(tiles: "torch.Tensor", path: Path, nrow: int) -> None:
    from vae_dist.evaluation.images import save_grid

    try:
        save_grid(tiles, path, nrow)
    except OSError as e:
        raise VaeDistError(f"cannot write {path}: {e.strerror or e}") from None
    print_out(str(path))


def _model_and_test_images(artifact_dir: Path, data_dir: Optional[str], out: Optional[Path],
                           default_name: str) -> tuple[Any, Path, "torch.Tensor"]:
    """The model, where its picture goes, and the whole test split (floats in [0, 1])."""
    from vae_dist.evaluation.api import load
    from vae_dist.evaluation.evaluate import test_images

    model = load(artifact_dir)
    # limit 0 = the whole test split, not the slice the model was validated on.
    return model, _output_path(artifact_dir, out, default_name), test_images(model.config, data_dir, 0).float().div(255.0)


def sample(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    num: int = typer.Option(64, "--num", min=1, max=MAX_IMAGES, help="Number of samples from the prior."),
    # torch seeds a generator with 64 bits; within the signed range every seed is one stream
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the latent draws (same seed, same image)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: ARTIFACT_DIR/samples.png, or manifold.png)."),
    manifold: bool = typer.Option(False, "--manifold", help="Decode a grid over a 2-D latent space instead (needs --latent-size 2)."),
    grid_size: int = typer.Option(20, "--grid-size", min=1, max=MAX_GRID_SIZE, help="Images per side of the manifold."),
) -> None:
    """Decode random draws from the prior into a grid of digits."""
    from vae_dist.evaluation.api import load

    model = load(artifact_dir)
    if manifold:
        _save(model.manifold(grid_size), _output_path(artifact_dir, out, "manifold.png"), grid_size)
    else:
        _save(model.sample(num, seed), _output_path(artifact_dir, out, "samples.png"), math.ceil(math.sqrt(num)))


def reconstruct(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    num: int = typer.Option(32, "--num", min=1, max=MAX_IMAGES, help="Number of test images (the first N)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: ARTIFACT_DIR/reconstructions.png)."),
) -> None:
    """The first N test images, each above its reconstruction (decoded posterior mean)."""
    from vae_dist.evaluation.images import side_by_side

    model, target, test = _model_and_test_images(artifact_dir, data_dir, out, "reconstructions.png")
    if num > test.shape[0]:
        raise VaeDistError(f"--num {num} is more than the {test.shape[0]} test images")
    x, nrow = test[:num], min(8, num)
    _save(side_by_side(x, model.reconstruct(x), nrow), target, nrow)


def interpolate(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    index_from: int = typer.Option(..., "--from", help="Index of the test image to start from."),
    index_to: int = typer.Option(..., "--to", help="Index of the test image to end at."),
    steps: int = typer.Option(10, "--steps", min=2, max=MAX_STEPS, help="Decoded points on the line, ends included."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: ARTIFACT_DIR/interpolation.png)."),
) -> None:
    """One row: test image I, the decodings along the straight latent line from I to J, image J."""
    import torch

    model, target, test = _model_and_test_images(artifact_dir, data_dir, out, "interpolation.png")
    for flag, index in (("--from", index_from), ("--to", index_to)):
        if not 0 <= index < test.shape[0]:
            raise VaeDistError(f"{flag} {index} is not a test image index (0 to {test.shape[0] - 1})")
    ends = test[[index_from, index_to]]
    row = torch.cat([ends[:1], model.interpolate(ends[:1], ends[1:], steps), ends[1:]])
    _save(row, target, row.shape[0])
