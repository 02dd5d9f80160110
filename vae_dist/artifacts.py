"""The artifact directory: create and guard it, write its small files, export the model.

vae_dist only ever deletes what it made: a marker file proves a directory is ours, and
``--overwrite`` removes only the entries vae_dist writes, never anything else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from vae_dist.config import TrainingConfig
from vae_dist.errors import ArtifactError, ConfigError
from vae_dist.fileio import atomic_write
from vae_dist.model import VAE

MARKER = ".vae_dist"
CONFIG = "config.json"
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
IMAGES = "images"
LOSS_CURVES = "loss_curves.png"
WANDB = "wandb"
# Everything a run writes; --overwrite removes these and nothing else.
OWNED = (
    CONFIG, MODEL, METRICS, CHECKPOINTS, IMAGES, LOSS_CURVES, WANDB,
    # written by the sample / reconstruct / interpolate commands
    "samples.png", "manifold.png", "reconstructions.png", "interpolation.png",
)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that a kill never leaves half a file."""
    atomic_write(path, lambda f: f.write(text.encode()))


def prepare_artifact_dir(path: str | Path, *, overwrite: bool, resume: bool) -> Path:
    """Create or check the artifact directory; called on the main process only.

    - missing or empty: created and marked as ours;
    - ours, with a previous run: refused unless --resume (keep) or --overwrite (clear ours);
    - not ours and not empty: refused, even with --overwrite, and left untouched.
    """
    if overwrite and resume:
        raise ArtifactError("--overwrite and --resume cannot be used together")
    root = Path(path).expanduser()
    if root.exists() and not root.is_dir():
        raise ArtifactError(f"artifact directory {root} exists and is not a directory")
    ours = (root / MARKER).is_file()
    entries = [p for p in root.iterdir()] if root.is_dir() else []
    if entries and not ours:
        raise ArtifactError(
            f"artifact directory {root} is not empty and was not created by vae_dist; "
            "choose another --artifact-dir (nothing in it was touched)"
        )
    previous_run = ours and any(p.name != MARKER for p in entries)
    if resume and not previous_run:
        raise ArtifactError(f"--resume given but {root} holds no previous run")
    if previous_run and not (resume or overwrite):
        raise ArtifactError(
            f"artifact directory {root} holds a previous vae_dist run; "
            "pass --resume to continue it or --overwrite to start again"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in OWNED:
                p = root / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        atomic_write_text(root / MARKER, json.dumps({"created_by": "vae_dist"}) + "\n")
        # Prove now that the run's outputs can be written, not after an hour of training.
        probe = root / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ArtifactError(f"artifact directory {root} is not writable: {e.strerror or e}") from None
    return root


def write_config(root: Path, config: TrainingConfig) -> None:
    atomic_write_text(root / CONFIG, config.to_json())


def write_metrics(root: Path, history: Iterable[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the run's history (one row per epoch).

    Rewriting the whole file, rather than appending, is what keeps epochs from being
    duplicated when a run is resumed from a checkpoint older than the file.
    """
    atomic_write_text(root / METRICS, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


def read_metrics(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_model_file(path: Path, state_dict: dict[str, torch.Tensor], config: TrainingConfig) -> None:
    """Final weights as safetensors with the config JSON in the metadata, so the one
    file rebuilds the model with no pickle and no config.json beside it."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={"format": "pt", "vae_dist_config": config.to_json()})
    atomic_write(path, lambda f: f.write(blob))


def load_model_file(path: str | Path) -> tuple[VAE, TrainingConfig]:
    """Rebuild the model and its training config from a model.safetensors file (or its folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MODEL
    if not p.is_file():
        raise ArtifactError(f"no trained model at {p} (train first, or give the artifact directory)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"model file {p} is not a readable safetensors file: {e}") from None
    if "vae_dist_config" not in meta:
        raise ArtifactError(f"model file {p} was not written by vae_dist (no config in its metadata)")
    try:
        config = TrainingConfig.from_dict(json.loads(meta["vae_dist_config"]))
    except (json.JSONDecodeError, ConfigError) as e:
        raise ArtifactError(f"model file {p} carries an unreadable config: {e}") from None
    model = VAE.from_config(config.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"model file {p} does not match its config: {str(e).splitlines()[0]}") from None
    return model.eval(), config
