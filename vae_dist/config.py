"""The typed config tree: each option declared once (``option``), with its default, help, flag and resume rule;
the CLI generates ``train``'s options from it and the resume check reads the resumable set off it."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, NamedTuple, Optional

import yaml
from pydantic import Field, create_model, field_validator, model_validator

from vae_dist.data.datasets import DATA_DIR_ENV, MAX_CLASSES, MAX_SIDE, DatasetName
from vae_dist.errors import ConfigError, first_line
from vae_dist.models import REGISTRY
from vae_dist.models.gaussian import ACTIVATIONS
from vae_dist.run.fileio import dumps, read_record
from vae_dist.schema import Section, option

CONFIG_FILE = "config.json"  # the run's own config, in its artifact folder
MAX_SEED = 2**32 - 1  # numpy's seed (which accelerate.set_seed also sets) is 32 bits

# JSON has no tuples: a field of numbers takes a list (strict=False on it), each item strict (no "3", no true).
Channels = Annotated[int, Field(strict=True, ge=1, le=1024)]
Beta = Annotated[float, Field(strict=True, ge=0.0, lt=1.0)]
Width = Annotated[int, Field(strict=True, ge=1, le=16384)]
Side = Annotated[int, Field(strict=True, ge=1, le=MAX_SIDE)]


def _by_kind(field: str, show: Callable[[Any], str] = str) -> str:
    """How --help shows a field's default per --model: "deep-mlp 50, conv 64, ..."."""
    return ", ".join(f"{name} {show(f.defaults[field])}" for name, f in REGISTRY.items() if field in f.defaults)


class ModelFields(Section):
    path = "model"
    kind: Literal[tuple(REGISTRY)] = option(  # type: ignore[valid-type]
        "deep-mlp", "Model: " + "; ".join(dict.fromkeys(f.help for f in REGISTRY.values())) + ".", flag="--model")
    latent_size: Optional[int] = option(None, "Latent dimensions.", shown=_by_kind("latent_size"), ge=1, le=4096)
    hidden_sizes: Optional[tuple[Width, ...]] = option(
        None, "Hidden layer widths of the MLP encoders, e.g. 512,256 (the decoders mirror them).",
        shown=_by_kind("hidden_sizes", lambda v: ",".join(map(str, v))), strict=False, min_length=1, max_length=16)
    activation: Optional[Literal[tuple(ACTIVATIONS)]] = option(  # type: ignore[valid-type]
        None, "Activation of the MLP hidden layers.", shown=_by_kind("activation"))
    conv_channels: tuple[Channels, Channels] = option((16, 32), "Channels of the conv encoder's two stride-2 layers, "
                                                      "e.g. 16,32 (the decoder mirrors them).", strict=False)
    image_shape: tuple[Side, Side, Side] = option(
        (1, 28, 28), "The images' channels, rows and columns C,H,W that the model is built for; train sets it from "
        "the training data.", strict=False)
    conditional: bool = option(False, "A conditional VAE (Sohn et al. 2015): the image's class label, one-hot, goes "
                               "to the encoder and the decoder; needs a dataset with labels.")
    num_classes: Optional[int] = option(None, "Classes of a --conditional model; train sets it from the data's labels.",
                                        shown="the data's", ge=1, le=MAX_CLASSES)

    @model_validator(mode="after")
    def _architecture_defaults(self) -> "ModelFields":
        for name, value in REGISTRY[self.kind].defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.conditional and not REGISTRY[self.kind].cls.CONDITIONAL:
            raise ValueError(f"--model {self.kind} has no conditional form: drop --conditional")
        return self


# A family's own options are the section model.<name> (model.vq_vae for vq-vae).
ModelConfig = create_model("ModelConfig", __base__=ModelFields, **{  # type: ignore[call-overload]
    name.replace("-", "_"): (f.options, Field(default_factory=f.options))
    for name, f in REGISTRY.items() if f.options is not None
})


class OptimizerConfig(Section):
    path = "optimizer"
    learning_rate: float = option(2e-3, "Adam step size (the peak of a schedule).", gt=0.0)
    betas: tuple[Beta, Beta] = option((0.9, 0.999), "Adam's moment decay rates, e.g. 0.9,0.999.", strict=False)
    eps: float = option(1e-8, "Adam's denominator guard.", gt=0.0)
    weight_decay: float = option(0.0, "L2 penalty added to the gradient (torch.optim.Adam semantics).", ge=0.0)
    max_grad_norm: Optional[float] = option(None, "Clip the global gradient norm to this.", shown="no clipping", gt=0.0)
    fused: bool = option(True, "torch's fused Adam kernel (one pass over all parameters); off = the per-tensor loop.",
                         flag="--fused-adam", resumable=True)
    schedule: Literal["constant", "cosine", "burda"] = option(
        "cosine", "Learning-rate schedule, a function of the epochs done: constant; cosine = linear warm-up, then "
        "cosine decay to 0 at the last step; burda = Burda et al.'s 3^i epochs at lr x 10^(-i/7), i = 0..7.",
        flag="--lr-schedule")
    warmup_epochs: float = option(0.1, "Linear learning-rate warm-up of the cosine schedule, in epochs.", ge=0.0)


class DataConfig(Section):
    path = "data"
    dataset: DatasetName = option("mnist", "The images: IDX files from --data-dir, else downloaded by torchvision; "
                                  "npy = your own train.npy and test.npy in --data-dir (see README).")
    data_dir: Optional[str] = option(None, "Folder with the dataset's four IDX files (gzipped or not, flat or under "
                                     "torchvision's <Name>/raw/, e.g. MNIST/raw/).", shown=f"${DATA_DIR_ENV}, else "
                                     "download", resumable=True, min_length=1, validate_default=True)
    cache_dir: str = option("~/.cache/vae_dist", "Where the dataset is downloaded without a data folder.",
                            resumable=True)
    batch_size: int = option(64, "Training batch per process; the global batch is batch size x processes.", ge=1,
                             le=1 << 20)
    eval_batch_size: int = option(
        1000, "Validation batch per process (changes speed only, never the numbers).", ge=1, le=1 << 20, resumable=True)
    num_workers: int = option(0, "DataLoader worker processes per process (0 = batches are taken in the training "
                              "process).", ge=0, le=256, resumable=True)
    limit_train_samples: Optional[int] = option(None, "Use only the first N training images.", shown="all", ge=1)
    binarize: Literal["none", "dynamic", "static"] = option(
        "none", "none = grey levels in [0, 1]; dynamic = a fresh Bernoulli image per sample per epoch (as the "
        "literature trains); static = one fixed draw. Any binarization evaluates on one fixed draw of the test set.")
    limit_eval_samples: Optional[int] = option(None, "Use only the first N test images.", shown="all", ge=1,
                                               resumable=True)

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: Optional[str]) -> Optional[str]:
        # Unset, the environment's folder (else the download); absolute, so that config.json leads evaluate and
        # the pictures to it from any working directory.
        value = value or os.environ.get(DATA_DIR_ENV) or None
        return str(Path(os.path.expanduser(value)).absolute()) if value else None


class LossConfig(Section):
    path = "loss"
    recon_loss: Literal["bce", "mse"] = option(
        "bce", "Likelihood: bce = Bernoulli; mse = Gaussian with unit variance (up to a constant).")
    kl_weight: float = option(1.0, "Weight of the KL term (1 is the true ELBO; beta-VAE uses > 1).", ge=0.0)
    kl_warmup_epochs: Optional[float] = option(
        None, "Ramp the KL weight linearly from 0 over this many epochs (keeps latent units from collapsing early).",
        shown="2 for the ELBO, 0 for the importance-weighted bound", ge=0.0)
    iw_samples: int = option(1, "Train on the importance-weighted bound with K samples per image (IWAE); 1 = the ELBO.",
                             flag="--iw-train-samples", ge=1, le=5000)

    @model_validator(mode="after")
    def _iw_is_unweighted(self) -> "LossConfig":
        if self.kl_warmup_epochs is None:
            self.kl_warmup_epochs = 0.0 if self.iw_samples > 1 else 2.0
        if self.iw_samples > 1 and (self.kl_weight != 1.0 or self.kl_warmup_epochs > 0):
            raise ValueError(
                "the importance-weighted bound has no KL weight: use --kl-weight 1 and --kl-warmup-epochs 0")
        return self


class TrainingConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    artifact_dir: str = option("artifacts/vae-mnist", "Where config.json, metrics, checkpoints and the model go.",
                               min_length=1, resumable=True)
    epochs: int = option(10, "Passes over the training set.", ge=1, le=1_000_000, resumable=True)
    seed: int = option(42, "Seeds weights, data order and the reparameterisation noise.", ge=0, le=MAX_SEED)
    max_steps: Optional[int] = option(None, "Stop after this many optimizer steps in total (the run still validates "
                                      "and saves).", shown="no limit", ge=1, resumable=True)
    checkpoint_every_steps: int = option(0, "Also checkpoint every N optimizer steps (0 = only at each epoch's end).",
                                         ge=0, resumable=True)
    keep_checkpoints: int = option(2, "How many complete checkpoints to keep.", ge=1, resumable=True)
    log_every_steps: int = option(50, "Log the running train loss every N steps (each log is one host sync).", ge=1,
                                  resumable=True)
    cpu: bool = option(
        False, "Train on the CPU even where a GPU exists (with accelerate launch: gloo CPU ranks).", resumable=True)
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = option(
        None, "Autocast precision; config.json records the one actually used.", shown="the launcher's, else no",
        resumable=True)
    compile: bool = option(False, "Run the model through torch.compile.", resumable=True)
    flush_denormal: bool = option(True, "Flush subnormal floats to zero in CPU arithmetic (see vae_dist.runtime).",
                                  resumable=True)
    report_to: tuple[Literal["wandb", "tensorboard", "none"], ...] = option(
        ("wandb",), "Where metrics and pictures go besides metrics.jsonl: wandb, tensorboard (event files under the "
        "artifact folder's tensorboard/), both as wandb,tensorboard, or none.", resumable=True, strict=False,
        min_length=1)
    wandb_project: str = option("vae-dist", "W&B project name.", resumable=True)
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = option(
        None, "W&B mode; online falls back to offline without an API key.", shown="$WANDB_MODE, else online",
        resumable=True)

    @field_validator("report_to", mode="wrap")
    @classmethod
    def _report_to(cls, value: Any, handler: Callable[[Any], tuple[str, ...]]) -> tuple[str, ...]:
        # "wandb,tensorboard" as the HF Trainer takes it, in a file or a flag
        value = handler(tuple(v.strip() for v in value.split(",")) if isinstance(value, str) else value)
        if len(set(value)) < len(value):
            raise ValueError(f"names a tracker twice: {','.join(value)}")
        if "none" in value and len(value) > 1:
            raise ValueError(f"none cannot go with a tracker: {','.join(value)}")
        return value

    @classmethod
    def from_dict(cls, data: Any) -> "TrainingConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object (got {type(data).__name__})")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TrainingConfig":
        return cls.from_dict(read_config_file(path))

    def to_json(self) -> str:
        return dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file, JSON or (by its suffix, .yaml/.yml) YAML, as a dict; the usual mistakes are one-line errors."""
    p = Path(path)
    is_yaml = p.suffix.lower() in (".yaml", ".yml")
    try:
        raw = read_record(p)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e}") from None
    except ValueError as e:
        raise ConfigError(f"config file {p} is {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} cannot be read: {e}") from None
    try:
        data = yaml.load(text, Loader=StrictLoader) if is_yaml else json.loads(  # noqa: S506 (a SafeLoader)
            text, object_pairs_hook=functools.partial(_unique_keys, p))
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {p} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except ValueError:  # json and yaml read digits with int(), which refuses more than Python's limit
        raise ConfigError(f"config file {p} holds an integer of more than {sys.get_int_max_str_digits()} digits") \
            from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML: {e.problem or e.context}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {first_line(e)}") from None
    if not isinstance(data, dict):
        mapping = "YAML mapping (key: value lines)" if is_yaml else "JSON object"
        raise ConfigError(f"config file {p} must hold a {mapping}")
    return data


def _unique_keys(path: Path, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: json keeps a repeated key's last value without a word."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ConfigError(f"config file {path} gives the key {key!r} twice")
        seen.add(key)
    return dict(pairs)


class StrictLoader(yaml.SafeLoader):
    """YAML read as JSON would be: numbers only in JSON's forms (``1e-3`` a float; ``0123``, ``1:30``, ``0x1F``,
    ``1_000``, ``.inf`` and dates are strings, which the schema refuses where it wants a number), only true/false
    booleans (``wandb_mode: off`` a string), unique string keys, no tags (``!!int 0123``), anchors or aliases
    (a config needs none; aliases let a small file expand into a huge tree)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) or getattr(event, "tag", None):
            what = "tags" if getattr(event, "tag", None) else "anchors and aliases"
            raise yaml.constructor.ConstructorError(None, None, f"{what} are not allowed in a config", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str) or key in seen:
                problem = "is not a string" if not isinstance(key, str) else "is given twice"
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} {problem}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# The class's own resolver table: YAML's null, and JSON's booleans and numbers; any other plain scalar is a string.
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:null"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _form in [("bool", r"true|True|TRUE|false|False|FALSE"), ("int", r"-?(?:0|[1-9][0-9]*)"),
                    ("float", r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")]:  # int first: "5" is an int
    StrictLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_form})$"),
                                       list("tTfF" if _tag == "bool" else "-0123456789"))


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (e.g. command-line flags) into ``base`` (e.g. a config file)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"batch_size": 64}} -> {"data.batch_size": 64}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


class Option(NamedTuple):
    """One leaf field of the tree, as the CLI and the resume check see it."""

    dotted: str  # "data.batch_size"
    flag: str  # "--batch-size"
    help: str
    default: Any
    annotation: Any  # the field's type, without Optional
    resumable: bool
    shown: Optional[str]


def options(cls: type[Section] = TrainingConfig, prefix: str = "") -> Iterator[Option]:
    for name, info in cls.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
            yield from options(info.annotation, f"{prefix}{name}.")
            continue
        extra: dict[str, Any] = info.json_schema_extra  # type: ignore[assignment]  (option()'s)
        args = typing.get_args(info.annotation)
        bare = args[0] if type(None) in args else info.annotation  # Optional[X] -> X
        yield Option(prefix + name, extra["flag"] or "--" + name.replace("_", "-"), info.description or "",
                     info.get_default(call_default_factory=True), bare, extra["resumable"], extra["shown"])


RESUMABLE_FIELDS = frozenset(o.dotted for o in options() if o.resumable)


def resume_mismatch(saved: TrainingConfig, given: TrainingConfig,
                    saved_as: str = "the run being resumed used") -> Optional[str]:
    """The fields that shape the model or data and differ, in one line, else None (config.json against the flags,
    a checkpoint's config against config.json)."""
    a, b = flatten(saved.to_dict()), flatten(given.to_dict())
    differ = [key for key in sorted(a) if key not in RESUMABLE_FIELDS and a[key] != b.get(key)]
    if not differ:
        return None
    first, *rest = sorted(differ, key=lambda k: not k.endswith(".kind"))  # the architecture explains the rest
    also = f" (and {', '.join(rest)} with it)" if rest else ""
    return f"{first} is {b.get(first)!r} but {saved_as} {a[first]!r}{also}"
