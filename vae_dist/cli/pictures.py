"""Commands that use a trained model to make pictures (sample, reconstruct, interpolate).

Plain functions: vae_dist.cli registers them on its app.

Each loads the model through the Python API (vae_dist.api.load: a run folder, its
model.safetensors or a checkpoint folder; no pickle), runs on the CPU in one process,
writes one PNG and prints its path. The pictures come from the API's TrainedVAE (that
is, vae_dist.inference); this module only parses, checks and saves.
"""

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

# Beyond these the PNG gets absurd (and the decode slow) long before it gets useful.
MAX_IMAGES = 10_000
MAX_GRID_SIZE = 100
MAX_STEPS = 1_000
# torch seeds a generator with an unsigned 64-bit value; within the signed range every
# seed means one stream (no wrap-around of negative values).
MAX_SEED = 2**63 - 1

# What these commands write in a run folder by default (the only names they replace there).
PICTURES = ("samples.png", "manifold.png", "reconstructions.png", "interpolation.png")
ARTIFACT_HELP = "A folder written by `train`, its model.safetensors, or one of its checkpoints/step-N folders."
DATA_DIR_HELP = "Folder of the run's dataset (default: the one used in training)."


def _output_path(artifact_dir: Path, out: Optional[Path], default_name: str) -> Path:
    """--out as given, else ``default_name`` in the artifact folder (beside the model file
    when the argument is the file itself)."""
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
        _refuse_inside_a_run(target)
    return target


def _refuse_inside_a_run(target: Path) -> None:
    """Inside a run folder (at any depth, through links too) a picture goes only at the
    folder's top level, as one of the picture names or as a new file of another name: it
    never replaces the run's model, config, records or checkpoints, nor a user's file."""
    for path in (Path(os.path.abspath(target)), target.resolve()):
        run = next((p for p in path.parents if (p / MARKER).is_file()), None)
        if run is None:
            continue
        new_file = path.name not in RUN_NAMES and not (path.exists() or path.is_symlink())
        if path.parent != run or not (path.name in PICTURES or new_file):
            raise VaeDistError(
                f"--out {target} is inside the run folder {run}, where a picture is written only at its top level, "
                f"as one of {', '.join(PICTURES)} or under a new name; give another path"
            )


def _check_range(flag: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise VaeDistError(f"{flag} must be between {low} and {high} (got {value})")


def _save(tiles: "torch.Tensor", path: Path, nrow: int) -> None:
    from vae_dist.evaluation.images import save_grid

    try:
        save_grid(tiles, path, nrow)
    except OSError as e:
        raise VaeDistError(f"cannot write {path}: {e.strerror or e}") from None
    print_out(str(path))


def _model_and_test_images(
    artifact_dir: Path, data_dir: Optional[str], out: Optional[Path], default_name: str
) -> tuple[Any, Path, "torch.Tensor"]:
    """The model, where its picture goes, and the whole test split (as floats in [0, 1])."""
    from vae_dist.evaluation.api import load
    from vae_dist.evaluation.evaluate import test_images

    model = load(artifact_dir)
    # limit 0 = the whole test split, not the slice the model was validated on.
    return model, _output_path(artifact_dir, out, default_name), test_images(model.config, data_dir, 0).float().div(255.0)


def sample(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    num: int = typer.Option(64, "--num", help="Number of samples from the prior."),
    seed: int = typer.Option(0, "--seed", help="Seed of the latent draws (same seed, same picture)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: ARTIFACT_DIR/samples.png, or manifold.png)."),
    manifold: bool = typer.Option(False, "--manifold", help="Decode a grid over a 2-D latent space instead (needs --latent-size 2)."),
    grid_size: int = typer.Option(20, "--grid-size", help="Images per side of the --manifold grid."),
) -> None:
    """Decode random draws from the prior into a grid of digits."""
    from vae_dist.evaluation import inference
    from vae_dist.evaluation.api import load

    _check_range("--num", num, 1, MAX_IMAGES)
    _check_range("--grid-size", grid_size, 1, MAX_GRID_SIZE)
    _check_range("--seed", seed, 0, MAX_SEED)
    model = load(artifact_dir)
    if manifold:
        target = _output_path(artifact_dir, out, "manifold.png")
        _save(inference.manifold(model.model, grid_size), target, grid_size)
    else:
        target = _output_path(artifact_dir, out, "samples.png")
        _save(model.sample(num, seed), target, math.ceil(math.sqrt(num)))


def reconstruct(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    num: int = typer.Option(32, "--num", help="Number of test images (the first N)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: ARTIFACT_DIR/reconstructions.png)."),
) -> None:
    """The first N test images, each above its reconstruction (decoded posterior mean)."""
    from vae_dist.evaluation import images

    _check_range("--num", num, 1, MAX_IMAGES)
    model, target, test = _model_and_test_images(artifact_dir, data_dir, out, "reconstructions.png")
    if num > test.shape[0]:
        raise VaeDistError(f"--num {num} is more than the {test.shape[0]} test images")
    x, nrow = test[:num], min(8, num)
    _save(images.side_by_side(x, model.reconstruct(x), nrow), target, nrow)


def interpolate(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    index_from: int = typer.Option(..., "--from", help="Index of the test image to start from."),
    index_to: int = typer.Option(..., "--to", help="Index of the test image to end at."),
    steps: int = typer.Option(10, "--steps", help="Decoded points on the line, ends included."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: ARTIFACT_DIR/interpolation.png)."),
) -> None:
    """One row: test image I, the decodings along the straight latent line from I to J, image J."""
    import torch

    _check_range("--steps", steps, 2, MAX_STEPS)
    model, target, test = _model_and_test_images(artifact_dir, data_dir, out, "interpolation.png")
    n = test.shape[0]
    for flag, index in (("--from", index_from), ("--to", index_to)):
        if not 0 <= index < n:
            raise VaeDistError(f"{flag} {index} is not a test image index (0 to {n - 1})")
    ends = test[[index_from, index_to]]
    row = torch.cat([ends[:1], model.interpolate(ends[:1], ends[1:], steps), ends[1:]])
    _save(row, target, row.shape[0])
