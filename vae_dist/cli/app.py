"""The command line: each command builds a config (or reads a model) and calls one function.

Errors the user can fix print as one line, ``error: ...``, with exit status 2 and no
traceback; that includes Typer's own usage errors.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer vendors click

from vae_dist.cli import pictures
from vae_dist.config import CONFIG_FILE, Option, TrainingConfig, merge, options, read_config_file, read_json_config
from vae_dist.errors import ConfigError, VaeDistError
from vae_dist.models import REGISTRY
from vae_dist.run.fileio import checking, flush_or_silence, open_standard_streams, print_err, print_out

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train and use variational autoencoders on MNIST, on one CPU or many GPUs (Accelerate).",
)


def build_config(config_file: Optional[Path], resume: bool, flags: dict[str, Any]) -> TrainingConfig:
    """Defaults <- config file (or, on --resume, the run's own config.json) <- flags.

    ``flags`` maps dotted field names to values; None means "not given"."""
    base: dict[str, Any] = read_config_file(config_file) if config_file else {}
    overrides: dict[str, Any] = {}
    for dotted, value in flags.items():
        if value is not None:
            *parents, leaf = dotted.split(".")
            tree = overrides
            for p in parents:
                tree = tree.setdefault(p, {})
            tree[leaf] = value.value if isinstance(value, Enum) else value
    artifact_dir = overrides.get("artifact_dir") or base.get("artifact_dir") or TrainingConfig().artifact_dir
    saved = Path(str(artifact_dir)).expanduser() / CONFIG_FILE
    if resume and not config_file:
        with checking(saved, ConfigError, "the run's config"):
            found = saved.is_file()
        if found:
            base = read_json_config(saved)
    for name, value in base.items():  # a section given as null or a string is refused, not merged over
        if name in overrides and isinstance(overrides[name], dict) and not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a JSON object, got {value!r}")
    merged = merge(base, overrides)
    kind = overrides.get("model", {}).get("kind")
    if kind is not None and kind != base.get("model", {}).get("kind"):
        for name in REGISTRY[kind].defaults:  # a new architecture brings its own defaults
            if name not in overrides["model"]:
                merged["model"][name] = None
    return TrainingConfig.from_dict(merged)


# --- `train`'s options, generated from the config tree -----------------------------------


def _param_name(o: Option) -> str:
    return o.dotted.replace(".", "__")


def _listed(o: Option, text: str) -> list[float] | str:
    """'16,32' -> [16, 32] for the fields that hold a tuple of numbers; a tuple of names
    (report_to) splits its own text, as it does from a config file."""
    inner = typing.get_args(_bare(o))[0]
    if typing.get_origin(inner) is typing.Literal:
        return text
    item = typing.get_args(inner)[0]  # tuple[Annotated[int, ...], ...] -> int
    try:
        return [item(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{o.flag} takes {item.__name__}s separated by commas (got {text!r})") from None


class Command(typer.core.TyperCommand):
    """A flag takes no value: no <bool> after any, Typer's own --help included."""

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False):
                p.metavar = ""
        return params


def _bare(o: Option) -> Any:
    """The field's type without Optional."""
    ann = o.annotation
    if typing.get_origin(ann) is typing.Union:
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    return ann


def _cli_type(o: Option) -> tuple[Any, list[str], dict[str, Any]]:
    """(annotation, option declarations, extra typer.Option arguments) for one field."""
    ann = _bare(o)
    if ann is bool:
        return Optional[bool], [f"{o.flag}/--no-{o.flag[2:]}"], {}
    if typing.get_origin(ann) is typing.Literal:
        choices = Enum(o.dotted.title().replace(".", ""), {v: v for v in typing.get_args(ann)}, type=str)  # type: ignore[misc]
        return Optional[choices], [o.flag], {}
    if typing.get_origin(ann) is tuple:
        return Optional[str], [o.flag], {"metavar": "A,B,..." if Ellipsis in typing.get_args(ann) else "A,B"}
    return Optional[ann], [o.flag], {}


def _config_parameters() -> list[inspect.Parameter]:
    """One option per field, whose default is the field's own, so --help shows it as is."""
    params = []
    for o in options():
        ann, decls, extra = _cli_type(o)
        default = ",".join(map(str, o.default)) if isinstance(o.default, tuple) else o.default
        shown = o.shown if o.shown is not None else default is not None
        option = typer.Option(default, *decls, help=o.help, show_default=shown, **extra)
        params.append(inspect.Parameter(_param_name(o), inspect.Parameter.KEYWORD_ONLY, default=option, annotation=ann))
    return params


def _flags(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave, as {dotted field name: value} (pairs parsed). An option
    left at its default is not a flag: the config file, or the resumed run's config, wins."""
    out = {}
    for o in options():
        source = ctx.get_parameter_source(_param_name(o))
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        v = values[_param_name(o)]
        out[o.dotted] = _listed(o, v) if isinstance(v, str) and typing.get_origin(_bare(o)) is tuple else v
    return out


def with_config_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``fn(config_file, resume, overwrite, flags)`` a Typer signature: --config,
    --resume, --overwrite and one option per config field."""
    run_params = [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--config", help="JSON or YAML (.yaml, .yml) config file (a saved config.json works as is); flags override it.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--resume", help="Continue from the newest complete checkpoint.", show_default=False)),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--overwrite", help="Start again: a previous vae_dist run in the artifact directory is renamed to DIR.previous-<its id>.", show_default=False)),
    ]
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    params = [context, *run_params, *_config_parameters()]

    @functools.wraps(fn)
    def command(ctx: typer.Context, **values: Any) -> Any:
        return fn(values.pop("config_file"), values.pop("resume"), values.pop("overwrite"), _flags(ctx, values))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


@with_config_options
def train(config_file: Optional[Path], resume: bool, overwrite: bool, flags: dict[str, Any]) -> None:
    """Train a VAE; writes config.json, metrics.jsonl, checkpoints/ and model.safetensors."""
    cfg = build_config(config_file, resume, flags)
    from vae_dist.training import runtime
    from vae_dist.training.trainer import train as run_training

    runtime.prepare_process(cfg.flush_denormal)  # process-wide, so here and before any tensor work
    run_training(cfg, resume=resume, overwrite=overwrite)


def parse_train_args(args: list[str]) -> TrainingConfig:
    """The config that ``train ARGS`` would run: for benchmarks and tools that take the
    same flags as the trainer without training."""
    parser = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    parser.command()(with_config_options(lambda config_file, resume, overwrite, flags: build_config(config_file, resume, flags)))
    return parser(args=args, prog_name="train", standalone_mode=False)


# Burda et al. report k = 5000; beyond this an estimate takes days on a CPU for no gain.
MAX_IW_SAMPLES = 100_000


def evaluate(
    artifact_dir: Path = typer.Argument(..., help=pictures.ARTIFACT_HELP),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=pictures.DATA_DIR_HELP),
    limit_eval_samples: Optional[int] = typer.Option(None, "--limit-eval-samples", min=1, help="Use the first N test images."),
    iw_samples: int = typer.Option(
        0, "--iw-samples", min=0, max=MAX_IW_SAMPLES, help="Also estimate the test NLL with K importance samples.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Test loss, reconstruction and KL of a trained model (nats per image), and with
    --iw-samples K the importance-weighted NLL (K = 5000 is the literature's).

    Runs on the CPU; under `accelerate launch --multi_gpu -m vae_dist evaluate ...` the
    test split is sharded across the processes (each sample counted once)."""
    from vae_dist.evaluation.api import load
    from vae_dist.evaluation.evaluate import json_result, score, test_images

    model = load(artifact_dir)
    images = test_images(model.config, data_dir, limit_eval_samples)
    result = score(model.model, model.config, images, iw_samples=iw_samples)
    if not _is_rank_zero():
        return  # under accelerate launch, one process reports
    if as_json:
        print_out(json_result(result))
        return
    for k, v in result.items():
        if isinstance(v, dict):
            v = "; ".join(f"{name} {value}" for name, value in v.items())
        print_out(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")


def _err(message: str) -> None:
    # A stderr that cannot take the line costs the line; the exit status stays the caller's.
    print_err(message)


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of `vae-dist` and `python -m vae_dist`."""
    from vae_dist.training.signals import Preempted

    open_standard_streams()
    try:
        rc = app(args=argv, prog_name="vae-dist", standalone_mode=False)
        # With standalone_mode=False typer returns typer.Exit's code (KeyboardInterrupt, a
        # second Ctrl-C, becomes 130) instead of raising it; dropping it would exit 0.
        if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
            if rc == 130:
                _err("interrupted")
            sys.exit(rc)
    except UsageError as e:
        if isinstance(e, NoArgsIsHelpError):  # bare `vae-dist`: the help (rich prints it itself)
            if e.format_message():
                print_err(e.format_message())
        else:
            _err(f"error: {e.format_message()}")
        sys.exit(2)
    except VaeDistError as e:
        _err(f"error: {e}")
        sys.exit(2)
    except Preempted as e:
        if _is_rank_zero():
            _err(e.line)
        sys.exit(128 + e.signum)
    except (KeyboardInterrupt, typer.Abort):
        _err("interrupted")
        sys.exit(130)
    except RuntimeError as e:
        # Only torch raises these (the collectives load it): a dead peer is one line, any
        # other RuntimeError keeps its traceback.
        from vae_dist.training.distributed import lost_process, lost_process_line

        if not lost_process(e):
            raise
        _err(f"error: {lost_process_line(e)}")
        sys.exit(2)
    finally:
        for stream in (sys.stdout, sys.stderr):
            flush_or_silence(stream)


# Every command, in one place. The picture commands live in cli_visual (they share its
# loading and checking helpers); nothing there imports this module back.
app.command(cls=Command)(train)
app.command(cls=Command)(evaluate)
app.command(cls=Command)(pictures.sample)
app.command(cls=Command)(pictures.reconstruct)
app.command(cls=Command)(pictures.interpolate)
