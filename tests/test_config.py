"""Tests for vae_dist.config: defaults, JSON round trip, refusals that name the field,
merge and the resume compatibility check."""

from __future__ import annotations

import json

import pytest

from vae_dist.cli import build_config
from vae_dist.config import (
    RESUMABLE_FIELDS,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    TrainingConfig,
    merge,
    read_json_config,
    resume_mismatch,
)
from vae_dist.errors import ConfigError


def test_mlp_default_latent_is_20():
    assert ModelConfig(kind="mlp").latent_size == 20
    assert TrainingConfig.from_dict({"model": {"kind": "mlp"}}).model.latent_size == 20
    # An explicit size wins over the architecture's default.
    assert ModelConfig(kind="mlp", latent_size=7).latent_size == 7


# --- JSON round trip ----------------------------------------------------------------------


def _non_default() -> TrainingConfig:
    return TrainingConfig.from_dict(
        {
            "model": {"kind": "mlp", "latent_size": 12, "hidden_size": 300},
            "optimizer": {"learning_rate": 3e-3, "betas": [0.5, 0.9], "max_grad_norm": 1.5},
            "data": {"batch_size": 32, "limit_train_samples": 1024, "data_dir": "/some/where"},
            "loss": {"recon_loss": "mse", "kl_weight": 0.5, "kl_warmup_epochs": 2},
            "epochs": 3,
            "seed": 7,
            "mixed_precision": "bf16",
            "wandb_mode": "offline",
        }
    )


@pytest.mark.parametrize("make", [TrainingConfig, _non_default], ids=["defaults", "non-default"])
def test_json_round_trip(make):
    c = make()
    text = c.to_json()
    back = TrainingConfig.from_dict(json.loads(text))
    assert back == c
    assert back.to_json() == text
    # Tuples come back as tuples (JSON has only lists) and stay equal.
    assert isinstance(back.optimizer.betas, tuple)
    assert isinstance(back.model.conv_channels, tuple)


def test_non_default_values_survive(tmp_path):
    c = _non_default()
    p = tmp_path / "config.json"
    p.write_text(c.to_json())
    back = TrainingConfig.from_json_file(p)
    assert back.model.kind == "mlp" and back.model.latent_size == 12
    assert back.optimizer.betas == (0.5, 0.9)
    assert back.loss.kl_warmup_epochs == 2.0 and isinstance(back.loss.kl_warmup_epochs, float)
    assert back.mixed_precision == "bf16"
    assert back == c


def test_saved_config_loads_as_is_via_config_flag(tmp_path):
    """A config.json written by a run is a valid --config file, with no edits."""
    c = _non_default()
    p = tmp_path / "config.json"
    p.write_text(c.to_json())
    assert build_config(p, False, {}) == c
    # Flags override the file, and the rest of the file is kept.
    over = build_config(p, False, {"epochs": 5, "data.batch_size": 16})
    assert over.epochs == 5 and over.data.batch_size == 16
    assert over.model == c.model and over.optimizer == c.optimizer


def test_changing_model_kind_by_flag_picks_new_default_latent(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(TrainingConfig().to_json())  # conv, latent 64
    assert build_config(p, False, {"model.kind": "mlp"}).model.latent_size == 20


def test_read_json_config_refusals(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_json_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_json_config(bad)
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_json_config(arr)


# --- refusals name the field --------------------------------------------------------------


def _refuse(data: dict) -> str:
    with pytest.raises(ConfigError) as ei:
        TrainingConfig.from_dict(data)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "data, name",
    [
        ({"epoch": 3}, "epoch"),
        ({"optimizer": {"lr": 1e-3}}, "optimizer.lr"),
        ({"data": {"batchsize": 3}}, "data.batchsize"),
        ({"model": {"latent": 3}}, "model.latent"),
        ({"loss": {"beta": 3.0}}, "loss.beta"),
    ],
)
def test_unknown_key_is_named(data, name):
    msg = _refuse(data)
    assert "unknown" in msg
    assert name in msg


@pytest.mark.parametrize(
    "data, name",
    [
        ({"epochs": "10"}, "epochs"),  # string for int
        ({"data": {"batch_size": "64"}}, "data.batch_size"),
        ({"data": {"batch_size": True}}, "data.batch_size"),  # bool for int
        ({"seed": False}, "seed"),
        ({"epochs": 2.5}, "epochs"),  # float for int
        ({"optimizer": {"learning_rate": [1e-3]}}, "optimizer.learning_rate"),  # list for float
        ({"optimizer": {"learning_rate": True}}, "optimizer.learning_rate"),
        ({"loss": {"kl_weight": "1"}}, "loss.kl_weight"),
        ({"optimizer": {"betas": 0.9}}, "optimizer.betas"),
        ({"cpu": "yes"}, "cpu"),
        ({"model": "conv"}, "model"),
    ],
)
def test_wrong_type_is_named(data, name):
    msg = _refuse(data)
    assert name in msg
    assert "must be" in msg


@pytest.mark.parametrize(
    "data, name",
    [
        ({"data": {"batch_size": 0}}, "data.batch_size"),
        ({"data": {"batch_size": -3}}, "data.batch_size"),
        ({"data": {"eval_batch_size": 0}}, "data.eval_batch_size"),
        ({"optimizer": {"learning_rate": 0}}, "optimizer.learning_rate"),
        ({"optimizer": {"learning_rate": -1e-3}}, "optimizer.learning_rate"),
        ({"epochs": 0}, "epochs"),
        ({"data": {"num_workers": -1}}, "data.num_workers"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"loss": {"kl_weight": -0.1}}, "loss.kl_weight"),
        ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas"),
        ({"optimizer": {"betas": [-0.1, 0.9]}}, "optimizer.betas"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas"),
        ({"data": {"limit_train_samples": 0}}, "data.limit_train_samples"),
        ({"data": {"limit_eval_samples": 0}}, "data.limit_eval_samples"),
        ({"model": {"latent_size": 0}}, "model.latent_size"),
        ({"seed": -1}, "seed"),
        ({"max_steps": 0}, "max_steps"),
        ({"log_every_steps": 0}, "log_every_steps"),
    ],
)
def test_out_of_range_is_named(data, name):
    msg = _refuse(data)
    assert name in msg


@pytest.mark.parametrize(
    "data, name",
    [
        ({"model": {"kind": "resnet"}}, "model.kind"),
        ({"loss": {"recon_loss": "l1"}}, "loss.recon_loss"),
        ({"wandb_mode": "sometimes"}, "wandb_mode"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
    ],
)
def test_bad_choice_is_named(data, name):
    msg = _refuse(data)
    assert name in msg


def test_direct_construction_also_validates_with_section_prefix():
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"optimizer\.learning_rate"):
        OptimizerConfig(learning_rate=0.0)
    with pytest.raises(ConfigError, match=r"loss\.kl_weight"):
        LossConfig(kl_weight=-1.0)
    with pytest.raises(ConfigError, match="epochs"):
        TrainingConfig(epochs=0)


def test_boundaries_accepted():
    c = TrainingConfig.from_dict(
        {
            "data": {"batch_size": 1, "eval_batch_size": 1, "num_workers": 0, "limit_train_samples": 1},
            "optimizer": {"betas": [0.0, 0.999999]},
            "loss": {"kl_weight": 0},
            "epochs": 1,
            "keep_checkpoints": 1,
            "mixed_precision": None,
        }
    )
    assert c.loss.kl_weight == 0.0 and isinstance(c.loss.kl_weight, float)
    assert c.optimizer.betas == (0.0, 0.999999)


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


def test_resume_mismatch_names_batch_size():
    saved = TrainingConfig()
    given = TrainingConfig.from_dict({"data": {"batch_size": 128}})
    msg = resume_mismatch(saved, given)
    assert msg is not None
    assert "data.batch_size" in msg
    assert "128" in msg and "64" in msg


@pytest.mark.parametrize(
    "change, name",
    [
        ({"seed": 1}, "seed"),
        ({"model": {"latent_size": 8}}, "model.latent_size"),
        ({"optimizer": {"learning_rate": 1e-3}}, "optimizer.learning_rate"),
        ({"loss": {"recon_loss": "mse"}}, "loss.recon_loss"),
        ({"data": {"limit_train_samples": 100}}, "data.limit_train_samples"),
    ],
)
def test_resume_mismatch_names_model_and_data_fields(change, name):
    msg = resume_mismatch(TrainingConfig(), TrainingConfig.from_dict(change))
    assert msg is not None and name in msg


def test_resume_allows_driving_fields():
    saved = TrainingConfig()
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
    assert resume_mismatch(saved, given) is None
    assert resume_mismatch(saved, TrainingConfig()) is None
    assert "epochs" in RESUMABLE_FIELDS and "data.batch_size" not in RESUMABLE_FIELDS
