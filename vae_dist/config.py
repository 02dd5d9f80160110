"""The typed config tree: defaults, validation at construction, JSON in and out.

Every section is a dataclass whose fields carry their type, default and a one-line doc;
construction checks types and ranges and names the offending field, so a bad value is
refused before anything is created or trained.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from vae_dist.errors import ConfigError


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__} of {_describe(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``name``.

    JSON has no tuples and no int/float distinction, so ints are accepted for floats and
    lists for tuples; bools are never accepted as numbers (``True`` is an int in Python).
    """
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) is str:
            return value
    elif origin in (list, tuple):
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, (list, tuple)):
            return origin(_coerce(v, item, name) for v in value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return _from_dict(tp, value, prefix=f"{name}.")
    raise ConfigError(f"{name} must be {_describe(tp)} (got {value!r})")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a JSON object (got {data!r})")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(_prefix=prefix, **kwargs) if "_prefix" in names else cls(**kwargs)


class _Section:
    """Base of every config section: checks field types, then the section's own ranges."""

    def __post_init__(self) -> None:
        prefix = getattr(self, "_prefix", "")
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name.startswith("_"):
                continue
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], prefix + f.name))
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden where there are ranges
        pass

    def _require(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            prefix = getattr(self, "_prefix", "")
            raise ConfigError(f"{prefix}{name} must be {what} (got {getattr(self, name)!r})")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, _Section) else (list(v) if isinstance(v, tuple) else v)
        return out


def _prefix_field(name: str) -> Any:
    # Where the section sits in the tree, so errors say "optimizer.learning_rate".
    return field(default=name, repr=False, compare=False)


@dataclass
class ModelConfig(_Section):
    kind: Literal["conv", "mlp"] = "conv"
    """conv: the original's 1->16->32 stride-2 encoder; mlp: 784-400-20 as in the PyTorch example."""
    latent_size: Optional[int] = None
    """Latent dimensions; None picks the architecture's default (conv 64, mlp 20)."""
    hidden_size: int = 400
    """Width of the mlp's hidden layer (unused by conv)."""
    conv_channels: tuple[int, ...] = (16, 32)
    """Channels of the conv encoder's two stride-2 layers (the decoder mirrors them)."""
    _prefix: str = _prefix_field("model.")

    def validate(self) -> None:
        if self.latent_size is None:
            self.latent_size = 64 if self.kind == "conv" else 20
        self._require(self.latent_size >= 1, "latent_size", ">= 1")
        self._require(self.hidden_size >= 1, "hidden_size", ">= 1")
        self._require(
            len(self.conv_channels) == 2 and min(self.conv_channels) >= 1,
            "conv_channels",
            "two positive channel counts",
        )


@dataclass
class OptimizerConfig(_Section):
    learning_rate: float = 1e-4
    """Adam step size."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """Adam's moment decay rates."""
    eps: float = 1e-8
    """Adam's denominator guard."""
    weight_decay: float = 0.0
    """L2 penalty added to the gradient (torch.optim.Adam semantics)."""
    max_grad_norm: Optional[float] = None
    """Clip the global gradient norm to this value; None disables clipping."""
    fused: bool = True
    """Use torch's fused Adam kernel (one pass over all parameters instead of a handful of
    ops per tensor): on the 2-core CPU an MLP step takes 3.7 ms instead of 5.0. Runs at
    different process counts stay as close with it as with the per-tensor loop (both
    agree to rounding; see tests/test_distributed.py)."""
    _prefix: str = _prefix_field("optimizer.")

    def validate(self) -> None:
        self._require(self.learning_rate > 0, "learning_rate", "> 0")
        self._require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two values in [0, 1)")
        self._require(self.eps > 0, "eps", "> 0")
        self._require(self.weight_decay >= 0, "weight_decay", ">= 0")
        self._require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "> 0 or null")


@dataclass
class DataConfig(_Section):
    data_dir: Optional[str] = None
    """Folder with the four MNIST IDX files (gzipped or not, flat or under MNIST/raw/); None downloads."""
    cache_dir: str = "~/.cache/vae_dist"
    """Where MNIST is downloaded when no data_dir is given."""
    batch_size: int = 64
    """Training batch per process; the global batch is batch_size x processes."""
    eval_batch_size: int = 1000
    """Validation batch per process (changes speed only, never the numbers)."""
    num_workers: int = 4
    """DataLoader worker processes per rank (0 fetches in the training process)."""
    limit_train_samples: Optional[int] = None
    """Use only the first N training images."""
    limit_eval_samples: Optional[int] = None
    """Use only the first N test images."""
    _prefix: str = _prefix_field("data.")

    def validate(self) -> None:
        self._require(self.batch_size >= 1, "batch_size", ">= 1")
        self._require(self.eval_batch_size >= 1, "eval_batch_size", ">= 1")
        self._require(self.num_workers >= 0, "num_workers", ">= 0")
        for name in ("limit_train_samples", "limit_eval_samples"):
            v = getattr(self, name)
            self._require(v is None or v >= 1, name, ">= 1 or null")


@dataclass
class LossConfig(_Section):
    recon_loss: Literal["bce", "mse"] = "bce"
    """bce: Bernoulli likelihood; mse: Gaussian with unit variance (up to a constant)."""
    kl_weight: float = 1.0
    """Weight of the KL term (1 is the true ELBO; beta-VAE uses > 1)."""
    kl_warmup_epochs: float = 0.0
    """Ramp the KL weight linearly from 0 over this many epochs (0 = no warm-up)."""
    _prefix: str = _prefix_field("loss.")

    def validate(self) -> None:
        self._require(self.kl_weight >= 0, "kl_weight", ">= 0")
        self._require(self.kl_warmup_epochs >= 0, "kl_warmup_epochs", ">= 0")


@dataclass
class TrainingConfig(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    artifact_dir: str = "artifacts/vae-mnist"
    """Where config.json, metrics, checkpoints and model.safetensors go."""
    epochs: int = 10
    """Passes over the training set."""
    seed: int = 42
    """Seeds weights, data order and the reparameterisation noise."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps in total (the run still validates and saves)."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimizer steps (0 = only at the end of each epoch)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep."""
    log_every_steps: int = 50
    """Log the running train loss every N steps (each log is one host sync)."""
    cpu: bool = False
    """Train on the CPU even where a GPU exists."""
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    """Autocast precision; None follows the launcher (accelerate config), else no. The
    precision actually used is what config.json records."""
    compile: bool = False
    """Run the model through torch.compile."""
    flush_denormal: bool = True
    """Flush subnormal floats to zero in CPU arithmetic (see vae_dist.runtime): Adam's
    estimates for rarely-seen border pixels decay through the subnormal range, where the
    CPU is slow. Values below 1.2e-38 move no weight measurably (the same test losses to
    0.01 nats after 8 epochs)."""
    wandb_project: str = "vae-dist"
    """W&B project name."""
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """online falls back to offline when no API key is set; disabled writes nothing."""

    def validate(self) -> None:
        self._require(self.epochs >= 1, "epochs", ">= 1")
        self._require(self.seed >= 0, "seed", ">= 0")
        self._require(self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1 or null")
        self._require(self.checkpoint_every_steps >= 0, "checkpoint_every_steps", ">= 0")
        self._require(self.keep_checkpoints >= 1, "keep_checkpoints", ">= 1")
        self._require(self.log_every_steps >= 1, "log_every_steps", ">= 1")
        self._require(bool(self.artifact_dir), "artifact_dir", "a non-empty path")

    # --- JSON in and out -------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingConfig":
        return _from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TrainingConfig":
        return cls.from_dict(read_json_config(path))


def read_json_config(path: str | Path) -> dict[str, Any]:
    """Read a JSON config file into a dict, with one-line errors for the usual mistakes."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {p} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a JSON object")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (e.g. command-line flags) into ``base`` (e.g. a config file)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Fields that may differ between a run and its resumption: they change how the run is
# driven, logged or stored, never which samples it sees or what the model is.
RESUMABLE_FIELDS = frozenset(
    {
        "artifact_dir",
        "epochs",
        "max_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "log_every_steps",
        "cpu",
        "mixed_precision",
        "compile",
        "flush_denormal",
        "optimizer.fused",
        "wandb_project",
        "wandb_mode",
        "data.data_dir",
        "data.cache_dir",
        "data.num_workers",
        "data.eval_batch_size",
        "data.limit_eval_samples",
    }
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def resume_mismatch(saved: TrainingConfig, given: TrainingConfig) -> Optional[str]:
    """Name the first field that shapes the model or data and differs, else None."""
    a, b = _flatten(saved.to_dict()), _flatten(given.to_dict())
    for key in sorted(a):
        if key not in RESUMABLE_FIELDS and a[key] != b.get(key):
            return f"{key} is {b.get(key)!r} but the run being resumed used {a[key]!r}"
    return None
