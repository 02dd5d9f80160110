"""The config tree: the JSON round trip, one-line refusals that name the field, the
config file reader, merge and the resume compatibility check."""

from __future__ import annotations

import json
import os
import re
import threading
import typing
from pathlib import Path

import pytest

from vae_dist.config import RESUMABLE_FIELDS, DataConfig, TrainingConfig, merge, options, read_config_file, resume_mismatch
from vae_dist.data.datasets import DATA_DIR_ENV
from vae_dist.errors import ConfigError

NON_DEFAULT = {
    "model": {"kind": "mlp", "latent_size": 12, "hidden_sizes": [300, 100]},
    "optimizer": {"learning_rate": 3e-3, "betas": [0.5, 0.9], "max_grad_norm": 1.5},
    "data": {"batch_size": 32, "limit_train_samples": 1024, "data_dir": "/some/where"},
    "loss": {"recon_loss": "mse", "kl_weight": 0.5, "kl_warmup_epochs": 2},
    "epochs": 3,
    "seed": 7,
    "mixed_precision": "bf16",
    "wandb_mode": "offline",
}


@pytest.mark.parametrize("data", [{}, NON_DEFAULT], ids=["defaults", "non-default"])
def test_json_round_trip(data, tmp_path):
    c = TrainingConfig.from_dict(data)
    p = tmp_path / "config.json"
    p.write_text(c.to_json())
    back = TrainingConfig.from_json_file(p)
    assert back == c and back.to_json() == c.to_json()
    # JSON has only lists: pairs and widths come back as the tuples they were.
    assert isinstance(back.optimizer.betas, tuple) and isinstance(back.model.hidden_sizes, tuple)


def test_the_data_folder_is_kept_absolute_and_unset_is_the_environments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # config.json leads evaluate and the pictures to it from any folder
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert TrainingConfig.from_dict({"data": {"data_dir": "mnist"}}).data.data_dir == str(tmp_path / "mnist")
    assert TrainingConfig().data.data_dir is None  # the download
    monkeypatch.setenv(DATA_DIR_ENV, "shared/mnist")
    for data in ({}, {"data": {"data_dir": None}}):  # a new run, and one trained on the download
        assert TrainingConfig.from_dict(data).data.data_dir == str(tmp_path / "shared" / "mnist")
    assert TrainingConfig.from_dict({"data": {"data_dir": "/given"}}).data.data_dir == "/given"


def test_read_config_file_refusals(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        read_config_file(bad)
    bad.write_text(" " * (1 << 20) + "{}")  # bounded: a device file would never end
    with pytest.raises(ConfigError, match="larger than"):
        read_config_file(bad)


@pytest.mark.parametrize("text", ['{"seed": 1, "seed": 2}', '{"data": {"batch_size": 8, "batch_size": 16}}'])
def test_a_json_key_given_twice_is_refused_as_yaml_refuses_it(text, tmp_path):
    p = tmp_path / "c.json"
    p.write_text(text)  # json keeps the last value without a word
    with pytest.raises(ConfigError, match=r"gives the key '(seed|batch_size)' twice$"):
        read_config_file(p)


@pytest.mark.parametrize("name", ["c.json", "c.yaml"])
def test_an_integer_past_pythons_digit_limit_is_one_line(name, tmp_path):
    p = tmp_path / name
    p.write_text(json.dumps({"data": {"batch_size": 0}}).replace("0", "9" * 5000))  # a ValueError inside the parser
    with pytest.raises(ConfigError, match=r"holds an integer of more than \d+ digits$"):
        read_config_file(p)


def test_a_config_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "c.json"
    os.mkfifo(fifo)  # open() would wait for a writer for ever: read in a thread, so a hang fails the test
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(ConfigError, read_config_file, fifo).value),
                              daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert outcome and str(outcome[0]) == f"config file {fifo} is not a regular file"


# --- refusals: one line that names the field ------------------------------------------------

# One row per kind of pydantic error that ``explain`` words.
REFUSALS = [
    ({"epoch": 3}, "unknown config key epoch"),
    ({"optimizer": {"lr": 1e-3}}, "unknown config key optimizer.lr"),
    ({"epochs": "10"}, "epochs: must be an integer, got '10'"),
    ({"data": {"batch_size": True}}, "data.batch_size: must be an integer, got True"),
    ({"epochs": 2.5}, "epochs: must be an integer, got 2.5"),
    ({"optimizer": {"learning_rate": [1e-3]}}, "optimizer.learning_rate: must be a number, got [0.001]"),
    ({"cpu": "yes"}, "cpu: must be true or false, got 'yes'"),
    ({"model": "conv"}, "model: must be a JSON object, got 'conv'"),
    ({"model": {"conv_channels": 3}}, "model.conv_channels: must be a list, got 3"),
    ({"model": {"hidden_sizes": [8, "9"]}}, "model.hidden_sizes: must be an integer, got '9'"),
    ({"data": {"batch_size": 0}}, "data.batch_size: must be ≥ 1, got 0"),
    ({"optimizer": {"learning_rate": 0}}, "optimizer.learning_rate: must be > 0.0, got 0"),
    ({"seed": 2**32}, "seed: must be ≤ 4294967295, got 4294967296"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas: must be < 1.0, got 1.0"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas: must have exactly 2 items"),
    ({"optimizer": {"betas": [1e-40, 0.9]}}, "optimizer.betas: 1e-40 is below float32's smallest normal number"),
    ({"model": {"hidden_sizes": []}}, "model.hidden_sizes: must have at least 1 item(s), got []"),
    ({"model": {"hidden_sizes": [8] * 17}}, "model.hidden_sizes: must have at most 16 items, got [8"),
    ({"model": {"kind": "resnet"}}, "model.kind: must be one of 'deep-mlp', 'conv', 'mlp', 'burda', 'burda-2layer' or 'vq-vae', got 'resnet'"),
    ({"artifact_dir": ""}, "artifact_dir: must not be empty"),
    ({"data": {"data_dir": ""}}, "data.data_dir: must not be empty"),
    ({"loss": {"iw_samples": 5, "kl_weight": 0.5}}, "loss: the importance-weighted bound has no KL weight"),
    ({"artifact_dir": "run-\udcff"}, "artifact_dir: must be text (a name whose bytes are not UTF-8"),  # from argv
    ({"seed": "7" * 100_000}, "seed: must be an integer, got '" + "7" * 79 + "…"),  # a file's worth: its start
]


@pytest.mark.parametrize("data, message", REFUSALS, ids=[m.split(",")[0] for _, m in REFUSALS])
def test_refusal_is_one_line_naming_the_field(data, message):
    with pytest.raises(ConfigError) as ei:
        TrainingConfig.from_dict(data)
    assert str(ei.value).startswith(message) and "\n" not in str(ei.value) and len(str(ei.value)) < 200


def test_a_section_built_directly_names_its_path():
    with pytest.raises(ConfigError, match=r"^data\.batch_size: must be ≥ 1"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        TrainingConfig.from_dict([1])


def _set(dotted: str, value: typing.Any) -> dict[str, typing.Any]:
    *sections, leaf = dotted.split(".")
    tree: dict[str, typing.Any] = {leaf: value}
    for name in reversed(sections):
        tree = {name: tree}
    return tree


def _is(o, kind: type) -> bool:
    return o.annotation is kind or kind in typing.get_args(o.annotation)


FLOATS = [o.dotted for o in options() if _is(o, float)]
STRINGS = [o.dotted for o in options() if _is(o, str)]


def test_the_float_and_string_options_are_found():
    # Else the two tables below would test nothing.
    assert {"optimizer.learning_rate", "optimizer.warmup_epochs", "loss.kl_weight", "loss.kl_warmup_epochs"} <= set(FLOATS)
    assert {"artifact_dir", "data.data_dir", "data.cache_dir", "wandb_project"} <= set(STRINGS)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("dotted", FLOATS)
def test_every_float_option_refuses_non_finite_values(dotted, value):
    # An infinite rate, weight or warm-up passed every bound: it trained nothing, or
    # diverged after --overwrite had cleared the previous run.
    with pytest.raises(ConfigError, match=rf"^{dotted}: must be a finite number"):
        TrainingConfig.from_dict(_set(dotted, value))


@pytest.mark.parametrize("value, where", [(1e-40, "below float32's smallest normal"), (1e39, "above float32's")])
@pytest.mark.parametrize("dotted", FLOATS)
def test_every_float_option_refuses_what_float32_cannot_hold(dotted, value, where):
    # Rates and weights are applied in float32 and subnormals are flushed: --eps 1e-40 trained on an eps of 0.
    with pytest.raises(ConfigError, match=rf"^{re.escape(dotted)}: {re.escape(repr(value))} is {where}"):
        TrainingConfig.from_dict(_set(dotted, value))
    assert TrainingConfig.from_dict(_set(dotted, 1.2e-38))  # float32's smallest normal is 1.1754944e-38


@pytest.mark.parametrize("dotted", STRINGS)
def test_every_string_option_refuses_a_nul_byte(dotted):
    with pytest.raises(ConfigError, match=rf"^{dotted}: must not contain a NUL byte"):
        TrainingConfig.from_dict(_set(dotted, "a\x00b"))


# --- merge and resume ----------------------------------------------------------------------


def test_merge_is_deep_and_does_not_mutate():
    base = {"epochs": 3, "data": {"batch_size": 8, "num_workers": 2}, "model": {"kind": "mlp"}}
    snapshot = json.loads(json.dumps(base))
    out = merge(base, {"data": {"batch_size": 16}, "seed": 1})
    assert out == {"epochs": 3, "data": {"batch_size": 16, "num_workers": 2}, "model": {"kind": "mlp"}, "seed": 1}
    assert base == snapshot
    # A non-dict override replaces; a dict over a missing key is inserted whole.
    assert merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}
    assert merge({}, {"a": {"b": 1}}) == {"a": {"b": 1}}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"batch_size": 128}}, "data.batch_size is 128 but the run being resumed used 64"),
        ({"seed": 1}, "seed is 1"),
        ({"optimizer": {"learning_rate": 1e-3}}, "optimizer.learning_rate is 0.001"),
        ({"loss": {"recon_loss": "mse"}}, "loss.recon_loss is 'mse'"),
        ({"data": {"limit_train_samples": 100}}, "data.limit_train_samples is 100"),
        # The architecture is named first; what follows from it is listed after.
        ({"model": {"kind": "mlp"}}, "model.kind is 'mlp' but the run being resumed used 'deep-mlp' (and model.activation, model.hidden_sizes"),
    ],
)
def test_resume_mismatch_names_what_shapes_the_model_or_data(change, message):
    assert (resume_mismatch(TrainingConfig(), TrainingConfig.from_dict(change)) or "").startswith(message)


def test_resume_allows_driving_fields():
    given = TrainingConfig.from_dict(
        {
            "epochs": 20,
            "max_steps": 5,
            "keep_checkpoints": 4,
            "wandb_mode": "disabled",
            "artifact_dir": "elsewhere",
            "data": {"num_workers": 0, "eval_batch_size": 10, "data_dir": "/x"},
        }
    )
    assert resume_mismatch(TrainingConfig(), given) is None
    assert "data.batch_size" not in RESUMABLE_FIELDS


def test_yaml_config_reads_as_json_would_and_refuses_in_one_line(tmp_path):

    good = tmp_path / "run.yml"
    good.write_text("optimizer:\n  learning_rate: 1e-3\n  betas: [0.5, 0.9]\ncpu: true\n")
    c = TrainingConfig.from_dict(read_config_file(good))  # YAML 1.1 would read 1e-3 as a string
    assert (c.optimizer.learning_rate, c.optimizer.betas, c.cpu) == (1e-3, (0.5, 0.9), True)
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("epochs: 2\nseed: [1\n", "not valid YAML: .* at line 3"),
        ("epochs: 2\nepochs: 3\n", "key 'epochs' is given twice at line 2"),
        ("- 1\n- 2\n", "must hold a YAML mapping"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_config_file(bad)
    bad.write_text("cpu: yes\n")  # YAML 1.1's yes is not a boolean here: strict validation refuses it
    with pytest.raises(ConfigError, match="cpu: must be true or false, got 'yes'"):
        TrainingConfig.from_dict(read_config_file(bad))


# YAML 1.1 reads these as numbers JSON would not: 0123 octal (83), 1:30 base 60 (90), hex, octal, binary,
# underscores, a leading +, .inf. Here they are strings, refused where the schema wants a number.
@pytest.mark.parametrize("line, message", [
    ("seed: 0123", "seed: must be an integer, got '0123'"),
    ("epochs: 1:30", "epochs: must be an integer, got '1:30'"),
    ("seed: 0x1F", "seed: must be an integer, got '0x1F'"),
    ("seed: 0o17", "seed: must be an integer, got '0o17'"),
    ("seed: 0b101", "seed: must be an integer, got '0b101'"),
    ("epochs: 1_000", "epochs: must be an integer, got '1_000'"),
    ("epochs: +3", "epochs: must be an integer, got '+3'"),
    ("optimizer: {learning_rate: .inf}", "optimizer.learning_rate: must be a number, got '.inf'"),
    ("optimizer: {learning_rate: 1_0.5}", "optimizer.learning_rate: must be a number, got '1_0.5'"),
    ("optimizer: {learning_rate: 1:30.5}", "optimizer.learning_rate: must be a number, got '1:30.5'"),
])
def test_yaml_numbers_only_in_jsons_forms(line, message, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(line + "\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        TrainingConfig.from_dict(read_config_file(p))


def test_yaml_reads_what_json_would_and_refuses_tags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 7\nepochs: -0\nwandb_project: 2024-01-01\nartifact_dir: 0123\n"
                 "optimizer: {learning_rate: 2.5E-3, betas: [0.5, 0.9]}\n")
    assert read_config_file(p) == {"seed": 7, "epochs": 0, "wandb_project": "2024-01-01", "artifact_dir": "0123",
                                   "optimizer": {"learning_rate": 2.5e-3, "betas": [0.5, 0.9]}}
    p.write_text("seed: !!int 0123\n")  # an explicit tag would bring YAML 1.1's octal back
    with pytest.raises(ConfigError, match="not valid YAML: tags are not allowed in a config at line 1"):
        read_config_file(p)


def test_every_recipe_in_configs_is_a_quality_recipe_and_builds_its_config(monkeypatch):
    """configs/NAME.yaml is the one source of quality.py's recipe NAME: the config the
    benchmark runs is the file's, with only the benchmark's own flags on top."""
    import importlib
    import sys

    from vae_dist.cli.app import parse_train_args

    root = Path(__file__).resolve().parent.parent
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    quality = importlib.import_module("quality")
    assert sorted(p.stem for p in (root / "configs").glob("*.yaml")) == sorted(quality.RECIPES)
    kinds = set()
    for name in quality.RECIPES:
        path = str(root / "configs" / f"{name}.yaml")
        ran = parse_train_args(["--config", path, *quality.BASE])
        file_only = parse_train_args(["--config", path])
        assert ran.to_dict() | {"epochs": 0, "wandb_mode": None} == file_only.to_dict() | {"epochs": 0, "wandb_mode": None}
        kinds.add(ran.to_json())
    assert len(kinds) == len(quality.RECIPES)  # no two recipes train the same thing
    sys.modules.pop("quality", None)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")))
def test_every_recipe_in_configs_trains_through_config(recipe, data_dir, tmp_path, capsys):
    from conftest import check_ok, main_in_process
    from vae_dist.cli.app import parse_train_args

    path = Path(__file__).resolve().parent.parent / "configs" / f"{recipe}.yaml"
    art = tmp_path / "run"
    ran = main_in_process(["train", "--config", str(path), "--cpu", "--data-dir", str(data_dir), "--artifact-dir", str(art),
                           "--limit-train-samples", "128", "--limit-eval-samples", "100", "--batch-size", "32",
                           "--max-steps", "2", "--wandb-mode", "disabled"], capsys)
    check_ok(ran)
    saved, recipe_config = TrainingConfig.from_json_file(art / "config.json"), parse_train_args(["--config", str(path)])
    assert (saved.model, saved.loss, saved.optimizer, saved.data.binarize) == (
        recipe_config.model, recipe_config.loss, recipe_config.optimizer, recipe_config.data.binarize)
    assert (art / "model.safetensors").is_file()
