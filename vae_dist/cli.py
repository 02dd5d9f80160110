"""The command line: each command builds a config (or reads a model) and calls one function.

Errors the user can fix print as one line, ``error: ...``, with exit status 2 and no
traceback; that includes Typer's own usage errors.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import click
import typer

from vae_dist import cli_visual
from vae_dist.errors import VaeDistError

# typer >= 0.22 vendors click as typer._click: its usage errors and Exit/Abort are not
# click's classes, so both families are caught (else a bad flag ends in a traceback).
try:
    from typer._click.exceptions import UsageError as _TyperUsageError
    from typer.exceptions import Abort as _TyperAbort, Exit as _TyperExit
except ImportError:  # older typer: click's own classes
    _TyperUsageError, _TyperAbort, _TyperExit = click.exceptions.UsageError, click.exceptions.Abort, click.exceptions.Exit

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train and use variational autoencoders on MNIST, on one CPU or many GPUs (Accelerate).",
)


class ModelKind(str, Enum):
    conv = "conv"
    mlp = "mlp"


class ReconLoss(str, Enum):
    bce = "bce"
    mse = "mse"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Precision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, Enum):
        value = value.value
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def build_config(config_file: Optional[Path], resume: bool, flags: dict[str, Any]) -> Any:
    """Defaults <- config file (or, on --resume, the run's own config.json) <- flags."""
    from vae_dist.artifacts import CONFIG
    from vae_dist.config import TrainingConfig, merge, read_json_config

    base: dict[str, Any] = read_json_config(config_file) if config_file else {}
    artifact_dir = flags.get("artifact_dir") or base.get("artifact_dir") or TrainingConfig.artifact_dir
    saved = Path(artifact_dir).expanduser() / CONFIG
    if resume and not config_file and saved.is_file():
        base = read_json_config(saved)
    overrides: dict[str, Any] = {}
    for dotted, value in flags.items():
        _set(overrides, dotted, value)
    merged = merge(base, overrides)
    kind = overrides.get("model", {}).get("kind")
    if kind is not None and kind != base.get("model", {}).get("kind") and "latent_size" not in overrides.get("model", {}):
        merged["model"]["latent_size"] = None  # a new architecture picks its own default latent size
    return TrainingConfig.from_dict(merged)


def train(
    config: Optional[Path] = typer.Option(None, "--config", help="JSON config file (a saved config.json works as is); flags override it."),
    artifact_dir: Optional[str] = typer.Option(None, "--artifact-dir", help="Output folder (default: artifacts/vae-mnist)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the four MNIST IDX files; omit to download."),
    model: Optional[ModelKind] = typer.Option(None, "--model", help="Architecture (default: conv)."),
    latent_size: Optional[int] = typer.Option(None, "--latent-size", help="Latent dimensions (default: conv 64, mlp 20)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training set (default: 10)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch per process (default: 64)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", help="Adam learning rate (default: 1e-4)."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help="Loader workers per process (default: 4)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of weights, data order and noise (default: 42)."),
    recon_loss: Optional[ReconLoss] = typer.Option(None, "--recon-loss", help="Likelihood (default: bce)."),
    kl_weight: Optional[float] = typer.Option(None, "--kl-weight", help="Weight of the KL term (default: 1)."),
    kl_warmup_epochs: Optional[float] = typer.Option(None, "--kl-warmup-epochs", help="Linear KL warm-up length (default: 0)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    limit_train_samples: Optional[int] = typer.Option(None, "--limit-train-samples", help="Use the first N training images."),
    limit_eval_samples: Optional[int] = typer.Option(None, "--limit-eval-samples", help="Use the first N test images."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Clear a previous vae_dist run in the artifact directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint."),
    checkpoint_every_steps: Optional[int] = typer.Option(None, "--checkpoint-every-steps", help="0 = once per epoch (default: 0)."),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", help="Complete checkpoints kept (default: 2)."),
    log_every_steps: Optional[int] = typer.Option(None, "--log-every-steps", help="Train-loss logging interval (default: 50)."),
    wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="W&B project (default: vae-dist)."),
    wandb_mode: Optional[WandbMode] = typer.Option(None, "--wandb-mode", help="(default: online, offline without an API key)."),
    cpu: bool = typer.Option(False, "--cpu", help="Run on the CPU (with accelerate launch: gloo CPU ranks)."),
    mixed_precision: Optional[Precision] = typer.Option(None, "--mixed-precision", help="Autocast precision (default: no)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    flush_denormal: Optional[bool] = typer.Option(
        None, "--flush-denormal/--no-flush-denormal", help="Flush subnormal floats to zero on the CPU (default: on)."
    ),
    fused_adam: Optional[bool] = typer.Option(
        None, "--fused-adam/--no-fused-adam", help="torch's fused Adam kernel (default: on); off = the per-tensor loop."
    ),
) -> None:
    """Train a VAE; writes config.json, metrics.jsonl, checkpoints/ and model.safetensors."""
    flags = {
        "artifact_dir": artifact_dir,
        "data.data_dir": data_dir,
        "model.kind": model,
        "model.latent_size": latent_size,
        "epochs": epochs,
        "data.batch_size": batch_size,
        "optimizer.learning_rate": learning_rate,
        "data.num_workers": num_workers,
        "seed": seed,
        "loss.recon_loss": recon_loss,
        "loss.kl_weight": kl_weight,
        "loss.kl_warmup_epochs": kl_warmup_epochs,
        "max_steps": max_steps,
        "data.limit_train_samples": limit_train_samples,
        "data.limit_eval_samples": limit_eval_samples,
        "checkpoint_every_steps": checkpoint_every_steps,
        "keep_checkpoints": keep_checkpoints,
        "log_every_steps": log_every_steps,
        "wandb_project": wandb_project,
        "wandb_mode": wandb_mode,
        "cpu": True if cpu else None,
        "mixed_precision": mixed_precision,
        "compile": True if compile else None,
        "flush_denormal": flush_denormal,
        "optimizer.fused": fused_adam,
    }
    cfg = build_config(config, resume, flags)
    from vae_dist import runtime
    from vae_dist.train import train as run_training

    runtime.prepare_process(cfg.flush_denormal)  # process-wide, so here and before any tensor work

    run_training(cfg, resume=resume, overwrite=overwrite)


def evaluate(
    artifact_dir: Path = typer.Argument(..., help="A folder written by `train` (or its model.safetensors)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="MNIST folder (default: the one used in training)."),
    limit_eval_samples: Optional[int] = typer.Option(None, "--limit-eval-samples", help="Use the first N test images."),
    iw_samples: int = typer.Option(0, "--iw-samples", help="Also estimate the test NLL with K importance samples."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Test loss, reconstruction and KL of a trained model (nats per image).

    Runs on the CPU; under `accelerate launch --multi_gpu -m vae_dist evaluate ...` the
    test split is sharded across the processes (each sample counted once)."""
    from vae_dist.artifacts import load_model_file
    from vae_dist.evaluate import elbo_terms, iw_nll, test_images

    if limit_eval_samples is not None and limit_eval_samples < 1:
        raise VaeDistError(f"--limit-eval-samples must be >= 1 (got {limit_eval_samples})")
    if iw_samples < 0:
        raise VaeDistError(f"--iw-samples must be >= 0 (got {iw_samples})")
    model, cfg = load_model_file(artifact_dir)
    images = test_images(cfg, data_dir, limit_eval_samples)
    result: dict[str, Any] = elbo_terms(model, cfg, images)
    if iw_samples and _is_rank_zero():
        result["iw_nll"] = iw_nll(model, cfg, images, iw_samples)
        result["iw_samples"] = iw_samples
    if not _is_rank_zero():
        return  # under accelerate launch, one process reports
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>10}: {v:.4f}" if isinstance(v, float) else f"{k:>10}: {v}")


def _err(message: str) -> None:
    # One write per line: ranks that fail together then print whole lines, not
    # "error: xerror: x" interleaved mid-line on the shared terminal.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of `vae-dist` and `python -m vae_dist`."""
    from vae_dist.signals import Preempted

    try:
        rc = app(args=argv, prog_name="vae-dist", standalone_mode=False)
        # typer >= 0.22 turns KeyboardInterrupt (a second Ctrl-C) and typer.Exit into a
        # returned exit code when standalone_mode=False; dropping it would exit 0.
        if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
            if rc == 130:
                _err("interrupted")
            sys.exit(rc)
    except (click.exceptions.Exit, _TyperExit) as e:
        sys.exit(e.exit_code)
    except (click.exceptions.UsageError, _TyperUsageError) as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `vae-dist`: the help (rich prints it itself)
            if e.format_message():
                print(e.format_message(), file=sys.stderr)
        else:
            _err(f"error: {e.format_message()}")
        sys.exit(2)
    except VaeDistError as e:
        _err(f"error: {e}")
        sys.exit(2)
    except Preempted as e:
        if _is_rank_zero():
            print(
                f"stopped by {signal.Signals(e.signum).name}; checkpoint {e.checkpoint} is complete. "
                "Continue with the same command plus --resume.",
                file=sys.stderr,
            )
        sys.exit(128 + e.signum)
    except (KeyboardInterrupt, click.exceptions.Abort, _TyperAbort):
        _err("interrupted")
        sys.exit(130)


# Every command, in one place. The picture commands live in cli_visual (they share its
# loading and checking helpers); nothing there imports this module back.
app.command()(train)
app.command()(evaluate)
app.command()(cli_visual.sample)
app.command()(cli_visual.reconstruct)
app.command()(cli_visual.interpolate)
