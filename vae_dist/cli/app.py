"""The command line: each command builds a config (or reads a model) and calls one function; a fixable
error (Typer's usage errors too) is one line, ``error: ...``, exit status 2, no traceback. The picture commands
(sample, reconstruct, interpolate) run on the CPU, write one PNG and print its path."""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer vendors click

from vae_dist.config import CONFIG_FILE, Option, TrainingConfig, options, read_config_file
from vae_dist.errors import ConfigError, VaeDistError, one_line
from vae_dist.models.protocol import MAX_GENERATOR_SEED, MAX_IMAGES, MAX_IW_SAMPLES
from vae_dist.run.fileio import checking, dumps, flush_or_silence, open_standard_streams, print_err, print_out
from vae_dist.run.folder import MARKER, RUN_NAMES

if TYPE_CHECKING:  # torch is imported where used: `--help` and usage errors stay fast
    import torch

# rich_markup_mode=None: click's plain help, whose flag column keeps every name whole (rich's table cut them
# at 80 columns) and which takes half the lines.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train and use variational autoencoders on MNIST, on one CPU or many GPUs (Accelerate).")
MAX_GRID_SIZE, MAX_STEPS = 100, 1_000  # beyond these a PNG is absurd (and slow) long before useful
# What the picture commands write in a run folder by default (the only names they replace there); a checkpoint's
# pictures go beside them, named after it (samples-step-000000016.png).
PICTURES = ("samples.png", "manifold.png", "reconstructions.png", "interpolation.png")
ARTIFACT_HELP = "A folder written by `train`, its model.safetensors, or one of its checkpoints/step-N folders."
DATA_DIR_HELP = ("Folder of the run's dataset (default: the one used in training, else $VAE_DIST_DATA_DIR, else "
                 "the download).")


def build_config(config_file: Optional[Path], resume: bool, flags: dict[str, Any]) -> TrainingConfig:
    """Defaults <- config file (or, on --resume, the run's config.json) <- ``flags`` ({dotted name: value})."""
    tree: dict[str, Any] = read_config_file(config_file) if config_file else {}
    if resume and not config_file:
        saved = Path(flags.get("artifact_dir") or TrainingConfig().artifact_dir).expanduser() / CONFIG_FILE
        with checking(saved, ConfigError, "the run's config"):
            tree = read_config_file(saved) if saved.is_file() else tree
    # Each flag sets its own field: --model keeps the file's latent_size and widths; what neither gives
    # takes the family's defaults (ModelFields).
    for dotted, value in flags.items():
        *sections, leaf = dotted.split(".")
        node = tree
        for depth, name in enumerate(sections, 1):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):  # a section given as null or a string is refused, not merged over
                raise ConfigError(f"{'.'.join(sections[:depth])}: must be a JSON object, got {node!r}")
        node[leaf] = value
    return TrainingConfig.from_dict(tree)


def _keyword(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _parameter(o: Option) -> inspect.Parameter:
    """A field's option, whose default is the field's own, so that --help shows it as it is."""
    ann, decls, extra = o.annotation, [o.flag], {}
    default = ",".join(map(str, o.default)) if isinstance(o.default, tuple) else o.default
    if ann is bool:
        decls = [f"{o.flag}/--no-{o.flag[2:]}"]
    elif typing.get_origin(ann) is tuple:  # "16,32"
        inner = typing.get_args(ann)[0]
        extra = {"metavar": "A,B,..." if Ellipsis in typing.get_args(ann) else "A,B"}
        if typing.get_origin(inner) is not typing.Literal:  # a tuple of names (report_to) splits its own text
            extra["parser"] = functools.partial(_numbers, o.flag, typing.get_args(inner)[0])  # Annotated[int, ...]
        ann = str
    shown = o.shown if o.shown is not None else default is not None
    option = typer.Option(default, *decls, help=o.help, show_default=shown, **extra)
    return _keyword(o.dotted.replace(".", "__"), Optional[ann], option)


def _numbers(flag: str, item: type, text: str) -> list[Any]:
    """"16,32" -> [16, 32]."""
    try:
        return [item(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} takes {item.__name__}s separated by commas (got {text!r})") from None


def with_config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``fn(config, resume, overwrite)`` a Typer signature: --config, --resume, --overwrite and one option per
    config field, from which ``build_config`` makes the config."""
    params = [
        _keyword("ctx", typer.Context),
        _keyword("config_file", Optional[Path], typer.Option(None, "--config", help=(
            "JSON or YAML (.yaml, .yml) config file (a saved config.json works as is); flags override it."))),
        _keyword("resume", bool, typer.Option(
            False, "--resume", help="Continue from the newest complete checkpoint.", show_default=False)),
        _keyword("overwrite", bool, typer.Option(False, "--overwrite", show_default=False, help=(
            "Start again: a previous vae_dist run in the artifact directory is renamed to DIR.previous-<its id>."))),
        *map(_parameter, options()),
    ]

    @functools.wraps(fn)
    def command(ctx: typer.Context, config_file: Optional[Path], resume: bool, overwrite: bool, **values: Any) -> Any:
        # An option left at its default is not given, so the config file's value, or the resumed run's, stays.
        flags = {name.replace("__", "."): value for name, value in values.items()
                 if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
        return fn(build_config(config_file, resume, flags), resume, overwrite)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@with_config_options
def train(cfg: TrainingConfig, resume: bool, overwrite: bool) -> None:
    """Train a VAE; writes config.json, metrics.jsonl, checkpoints/ and model.safetensors."""
    from vae_dist.training import runtime, trainer
    runtime.prepare_process(cfg.flush_denormal)  # process-wide, so here and before any tensor work
    trainer.train(cfg, resume=resume, overwrite=overwrite)


@functools.cache
def _config_parser() -> Any:  # built once: a parse is then a fraction of the build's cost
    parser = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    parser.command()(with_config_options(lambda config, resume, overwrite: config))
    return typer.main.get_command(parser)


def parse_train_args(args: list[str]) -> TrainingConfig:
    """The config that ``train ARGS`` would run, for benchmarks and tools that take the trainer's flags."""
    return _config_parser().main(args=args, prog_name="train", standalone_mode=False)


def evaluate(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    limit_eval_samples: Optional[int] = typer.Option(None, "--limit-eval-samples", min=1,
                                                     help="Use the first N test images."),
    iw_samples: int = typer.Option(
        0, "--iw-samples", min=0, max=MAX_IW_SAMPLES, help="Also estimate the test NLL with K importance samples."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Test loss, reconstruction and KL of a trained model (nats per image), and with --iw-samples K the
    importance-weighted NLL (K = 5000 is the literature's). On the CPU; under `accelerate launch --multi_gpu
    -m vae_dist evaluate ...` the test split is sharded across the processes (each sample counted once)."""
    from vae_dist.evaluation.api import load
    from vae_dist.evaluation.evaluate import score, test_split
    from vae_dist.training.distributed import launch_env
    model = load(artifact_dir)
    images, labels, _ = test_split(model.config, data_dir, limit_eval_samples)
    result = score(model.model, model.config, images, iw_samples=iw_samples, labels=labels)
    if launch_env()[0] != 0:
        return  # under accelerate launch, one process reports
    if as_json:
        return print_out(dumps(result))  # one line; a diverged model's NaN: null
    for k, v in result.items():
        v = "; ".join(f"{name} {value}" for name, value in v.items()) if isinstance(v, dict) else v
        print_out(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")


def _output_path(artifact_dir: Path, out: Optional[Path], default_name: str) -> Path:
    """--out as given, else ``default_name`` in the artifact folder (beside the model file when given the file; for a
    checkpoint, named after it at the top of its run folder, or beside it outside one)."""
    from vae_dist.run.checkpoint import MANIFEST
    if out is not None:
        target = out.expanduser()
        with checking(target, VaeDistError, "--out"):
            if target.is_dir():
                raise VaeDistError(f"--out {target} is a directory; give a file name such as {target / default_name}")
    else:
        src = artifact_dir.expanduser()
        with checking(src, VaeDistError, "artifact path"):
            folder = src if src.is_dir() else src.parent
            if (folder / MANIFEST).is_file():  # never among a checkpoint's files: rotation deletes them
                checkpoint = Path(os.path.abspath(folder))
                default_name = f"{Path(default_name).stem}-{checkpoint.name}.png"
                folder = next((p for p in checkpoint.parents if (p / MARKER).is_file()), checkpoint.parent)
            if folder.is_symlink():  # as train refuses it: a write would land where the link points
                raise VaeDistError(f"{folder} is a symbolic link; vae_dist does not write through links (give --out)")
        target = folder / default_name
    with checking(target, VaeDistError, "--out" if out is not None else "picture path"):
        # Inside a run folder (at any depth, through links too) a picture goes only at its top level, as a
        # picture name or a new name: never over the run's model, config, records or checkpoints, nor a user's file.
        for path in (Path(os.path.abspath(target)), target.resolve()):
            run = next((p for p in path.parents if (p / MARKER).is_file()), None)
            new_file = path.name not in RUN_NAMES and not (path.exists() or path.is_symlink())
            picture = re.sub(r"-step-\d+(?=\.png$)", "", path.name) in PICTURES
            if run is not None and (path.parent != run or not (picture or new_file)):
                raise VaeDistError(f"{'--out' if out is not None else 'the picture path'} {target} is inside the run "
                                   f"folder {run}, where a picture is written only at its top level, as one of "
                                   f"{', '.join(PICTURES)} (or a checkpoint's, samples-step-N.png) or under a new "
                                   f"name; give {'another path' if out is not None else '--out'}")
    return target


def _save(tiles: "torch.Tensor", path: Path, nrow: int, row_labels: tuple[str, ...] = ()) -> None:
    from vae_dist.evaluation.images import save_grid
    try:
        save_grid(tiles, path, nrow, row_labels)
    except OSError as e:
        raise VaeDistError(f"cannot write {path}: {e.strerror or e}") from None
    print_out(str(path))


def _model_and_test_images(artifact_dir: Path, data_dir: Optional[str], out: Optional[Path],
                           default_name: str) -> tuple[Any, Path, "torch.Tensor", Optional["torch.Tensor"]]:
    """The model, where its picture goes, the whole test split (floats in [0, 1]) and a conditional model's labels."""
    from vae_dist.evaluation.api import load
    from vae_dist.evaluation.evaluate import test_split
    model = load(artifact_dir)
    images, labels, _ = test_split(model.config, data_dir, 0)  # 0: the whole split, not the slice validated on
    return model, _output_path(artifact_dir, out, default_name), images.float().div(255.0), labels


def sample(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    num: int = typer.Option(64, "--num", min=1, max=MAX_IMAGES, help="Number of samples from the prior."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_GENERATOR_SEED,
                             help="Seed of the draws (same seed, same image)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write [ARTIFACT_DIR/samples.png or manifold.png]."),
    manifold: bool = typer.Option(False, "--manifold", help="Decode a grid over a 2-D latent space (--latent-size 2)."),
    grid_size: int = typer.Option(20, "--grid-size", min=1, max=MAX_GRID_SIZE, help="Images per side of the manifold."),
    label: Optional[int] = typer.Option(None, "--label", help="A conditional model's class to draw (default: each "
                                        "class in turn, one row per class)."),
) -> None:
    """Decode random draws from the prior into a grid of digits."""
    from vae_dist.evaluation.api import load
    from vae_dist.evaluation.evaluate import class_row
    model = load(artifact_dir)
    if manifold:
        _save(model.manifold(grid_size, label), _output_path(artifact_dir, out, "manifold.png"), grid_size)
    else:
        per_class = model.model.num_classes and label is None
        _save(model.sample(num, seed, label), _output_path(artifact_dir, out, "samples.png"),
              class_row(model.model, num) if per_class else math.ceil(math.sqrt(num)))


def reconstruct(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    num: int = typer.Option(32, "--num", min=1, max=MAX_IMAGES, help="Number of test images (the first N)."),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: ARTIFACT_DIR/reconstructions.png)."),
) -> None:
    """The first N test images, each above its reconstruction (decoded posterior mean)."""
    from vae_dist.evaluation.images import SIDE_BY_SIDE, side_by_side
    model, target, test, labels = _model_and_test_images(artifact_dir, data_dir, out, "reconstructions.png")
    if num > test.shape[0]:
        raise VaeDistError(f"--num {num} is more than the {test.shape[0]} test images")
    x, nrow = test[:num], min(8, num)
    decoded = model.reconstruct(x, None if labels is None else labels[:num])
    _save(side_by_side(x, decoded, nrow), target, nrow, SIDE_BY_SIDE)


def interpolate(
    artifact_dir: Path = typer.Argument(..., help=ARTIFACT_HELP),
    index_from: int = typer.Option(..., "--from", help="Index of the test image to start from."),
    index_to: int = typer.Option(..., "--to", help="Index of the test image to end at."),
    steps: int = typer.Option(10, "--steps", min=2, max=MAX_STEPS, help="Decoded points on the line, ends included."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="PNG to write (default: ARTIFACT_DIR/interpolation.png)."),
) -> None:
    """One row: test image I, the decodings along the straight latent line from I to J, image J (a conditional
    model's within image I's class)."""
    import torch
    model, target, test, labels = _model_and_test_images(artifact_dir, data_dir, out, "interpolation.png")
    for flag, index in (("--from", index_from), ("--to", index_to)):
        if not 0 <= index < test.shape[0]:
            raise VaeDistError(f"{flag} {index} is not a test image index (0 to {test.shape[0] - 1})")
    ends = test[[index_from, index_to]]
    label = None if labels is None else int(labels[index_from])
    _save(torch.cat([ends[:1], model.interpolate(ends[:1], ends[1:], steps, label), ends[1:]]), target, steps + 2)


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of `vae-dist` and `python -m vae_dist`."""
    from vae_dist.training.distributed import Preempted, launch_env, lost_process_line
    from vae_dist.training.runtime import out_of_memory_line
    open_standard_streams()
    try:
        # standalone_mode=False returns typer.Exit's code (a second Ctrl-C's 130) instead of raising it.
        if rc := app(args=argv, prog_name="vae-dist", standalone_mode=False):
            if rc == 130:
                print_err("interrupted")
            sys.exit(rc)
    except (UsageError, VaeDistError) as e:  # a bare `vae-dist` (NoArgsIsHelpError) prints the help
        message = e.format_message() if isinstance(e, UsageError) else str(e)
        print_err(message if isinstance(e, NoArgsIsHelpError) else f"error: {one_line(message)}")
        sys.exit(2)
    except Preempted as e:
        if launch_env()[0] == 0:  # checked when the run started
            print_err(str(e))
        sys.exit(128 + e.signum)
    except (KeyboardInterrupt, typer.Abort):
        print_err("interrupted")
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:  # torch's: a lost peer or memory is one line, anything else its traceback
        line = lost_process_line(e) or out_of_memory_line(e)
        if line is None:
            raise
        print_err(f"error: {one_line(line)}")
        sys.exit(2)
    finally:
        for stream in (sys.stdout, sys.stderr):
            flush_or_silence(stream)


for _command in (train, evaluate, sample, reconstruct, interpolate):
    app.command()(_command)
