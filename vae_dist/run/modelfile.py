"""The model file: final weights as safetensors with the training config in the metadata,
so the one file rebuilds the model with no pickle and no config.json beside it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save

from vae_dist.config import TrainingConfig
from vae_dist.errors import ArtifactError, ConfigError, VaeDistError, first_line
from vae_dist.models import build, parameter_count
from vae_dist.models.protocol import Model
from vae_dist.run.fileio import checking, dumps, loads_record
from vae_dist.run.folder import MODEL, write_run_file

MAX_PARAMETERS = 1_000_000_000  # larger models are refused before any memory is allocated for them


def save_model_file(path: Path, state_dict: dict[str, torch.Tensor], config: TrainingConfig,
                    results: Optional[dict[str, Any]] = None) -> None:
    """``results`` (the last validation, with its protocol) ride along: a number says what it was measured on."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": "pt", "vae_dist_config": config.to_json()}
    if results is not None:
        metadata["vae_dist_results"] = dumps(results, sort_keys=True)
    write_run_file(path, save(tensors, metadata=metadata))


def strip_compile_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """Parameter names without torch.compile's ``_orig_mod.`` wrapper segment."""
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def check_model_size(config: TrainingConfig, where: str, error: type[VaeDistError] = ConfigError) -> None:
    """Refuse a model too large to build, from its config alone (nothing allocated)."""
    try:
        n = parameter_count(config)
    except (ValueError, TypeError, OverflowError) as e:
        raise error(f"{where}: the model cannot be sized ({e})") from None
    if n > MAX_PARAMETERS:
        raise error(f"{where}: the model would have {n:,} parameters, more than the {MAX_PARAMETERS:,} vae_dist builds")


@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[tuple[Path, Any]]:
    """The model file at ``path`` or in the folder ``path``, open; one that is not a readable one is one line."""
    p = Path(path).expanduser()
    with checking(p, ArtifactError, "model path"):
        p = p / MODEL if p.is_dir() else p
        if not p.is_file():
            raise ArtifactError(f"no trained model at {p} (train first, or give the artifact directory)")
    try:
        str(p).encode()
    except UnicodeEncodeError:  # a name's bytes that are not UTF-8, which safetensors cannot open
        raise ArtifactError(f"model file {p} cannot be opened: its path is not UTF-8, and safetensors opens only "
                            "UTF-8 paths (rename it, or the folder that holds it)") from None
    try:
        with safe_open(str(p), framework="pt") as f:
            yield p, f
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = first_line(e) or type(e).__name__
        raise ArtifactError(f"model file {p} is not a readable safetensors file: {why}") from None


def load_model_file(path: str | Path, config: Optional[TrainingConfig] = None) -> tuple[Model, TrainingConfig]:
    """The model, on the CPU, and its config from a model.safetensors file or its folder. ``config``: the file's own
    when None; a checkpoint's weights file (Accelerate's) carries none: its manifest gives it."""
    with _reading(path) as (p, f):
        meta = f.metadata() or {}
        if config is None:
            if "vae_dist_config" not in meta:
                raise ArtifactError(f"model file {p} was not written by vae_dist (no config in its metadata)")
            try:
                config = TrainingConfig.from_dict(loads_record(meta["vae_dist_config"]))
            except (ValueError, ConfigError, RecursionError) as e:  # JSONDecodeError is a ValueError
                why = first_line(e) or type(e).__name__
                raise ArtifactError(f"model file {p} carries an unreadable config: {why}") from None
            check_model_size(config, f"model file {p}", ArtifactError)
        # Built on the meta device first: a config declaring a far larger model than the file is refused unallocated.
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in build(config).state_dict().items()}
        got = strip_compile_prefix({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        if want != got:
            name = min(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            why = (f"{name} is missing" if name not in got else f"{name} is not in the model" if name not in want
                   else f"{name} has shape {list(got[name])} where the model has {list(want[name])}")
            raise ArtifactError(f"model file {p} does not match its config: {why}")
        state = strip_compile_prefix({k: f.get_tensor(k) for k in f.keys()})
    # A diverged run's weights (NaN, inf) would draw black pictures and score NaN without a word.
    if bad := sorted(k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()):
        raise ArtifactError(f"model file {p} holds non-finite weights ({bad[0]}): its training diverged")
    model = build(config)
    model.load_state_dict(state)  # the names and shapes were checked above
    return model.eval(), config


def model_results(path: str | Path) -> dict[str, Any]:
    """The results a model file records (its last validation and protocol; {} if none)."""
    with _reading(path) as (p, f):
        text = (f.metadata() or {}).get("vae_dist_results", "{}")
    try:
        results = loads_record(text)
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"model file {p} carries unreadable results: {first_line(e)}") from None
    return results
