"""The model file (vae_dist.modelfile): one safetensors file rebuilds the model and its
config; a file that is not one, or that declares a model it does not hold or one too large
to build, is one error line, decided before the model is allocated."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import check_ok, main_in_process, small_train_args
from vae_dist.config import ModelConfig, TrainingConfig
from vae_dist.errors import ArtifactError, ConfigError
from vae_dist import models
from vae_dist.models import build, parameter_count
from vae_dist.run.modelfile import check_model_size, load_model_file, save_model_file
from vae_dist.run.folder import MODEL


@pytest.mark.parametrize("kind, latent", [("conv", 8), ("mlp", 5)])
def test_model_file_round_trip_from_file_alone(tmp_path, kind, latent):
    cfg = TrainingConfig.from_dict({"model": {"kind": kind, "latent_size": latent}, "seed": 3, "epochs": 2})
    torch.manual_seed(0)
    model = build(cfg)
    with torch.no_grad():  # not just a fresh default init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    save_model_file(tmp_path / MODEL, model.state_dict(), cfg)
    for where in (tmp_path / MODEL, tmp_path):  # the file or its folder
        loaded, loaded_cfg = load_model_file(where)
        assert loaded_cfg == cfg and not loaded.training
        a, b = model.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, eps = torch.rand(2, 1, 28, 28), torch.randn(2, latent)
    assert torch.equal(model.eval()(x, eps).terms["loss"], loaded(x, eps).terms["loss"])


def test_a_diverged_result_is_recorded_as_json_null(tmp_path):
    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8]}})
    save_model_file(tmp_path / MODEL, build(cfg).state_dict(), cfg, results={"valid/loss": float("nan"), "step": 3})
    with safe_open(str(tmp_path / MODEL), "pt") as f:
        text = f.metadata()["vae_dist_results"]
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {"valid/loss": None, "step": 3}


def _foreign(p):
    save_file({"w": torch.zeros(3)}, str(p), metadata={"format": "pt"})


def _garbage(p):
    p.write_bytes(os.urandom(1000))


def _truncated(p):
    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8]}})
    save_model_file(p, build(cfg).state_dict(), cfg)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _other_config(p):
    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8], "latent_size": 8}})
    other = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8], "latent_size": 9}})
    save_model_file(p, build(cfg).state_dict(), other)


def _unreadable_config(p):
    save_file({"w": torch.zeros(3)}, str(p), metadata={"format": "pt", "vae_dist_config": "[1, 2"})


def _diverged(p):
    # A weight turned NaN by a last step, the rest finite: nothing should be drawn from it.
    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8]}})
    state = build(cfg).state_dict()
    state["decoder.2.weight"][3, 0] = float("nan")
    save_model_file(p, state, cfg)


@pytest.mark.parametrize("make, message", [
    (None, "no trained model"),
    (_foreign, "not written by vae_dist"),
    (_garbage, "not a readable safetensors file"),
    (_truncated, "not a readable safetensors file"),
    (_other_config, "does not match its config"),
    (_unreadable_config, "carries an unreadable config"),
    (_diverged, "holds non-finite weights"),
], ids=["missing", "foreign", "garbage", "truncated", "other-config", "unreadable-config", "diverged"])
def test_a_file_that_is_not_a_vae_dist_model_is_one_line(tmp_path, make, message):
    p = tmp_path / MODEL
    if make is not None:
        make(p)
    with pytest.raises(ArtifactError) as e:
        load_model_file(p)
    text = str(e.value)
    assert message in text and str(p) in text and "\n" not in text


def test_model_size_is_bounded_from_the_config_alone() -> None:
    """Whatever the config's own ranges allow, a model over the bound is refused from its
    sizes, before a byte is allocated (built unvalidated, as a future range could allow)."""
    for model in (ModelConfig(), ModelConfig(kind="mlp", latent_size=3, hidden_sizes=(17,)),
                  ModelConfig(kind="conv", latent_size=5, conv_channels=(3, 7))):
        cfg = TrainingConfig(model=model)
        assert parameter_count(cfg) == sum(p.numel() for p in build(cfg).parameters())
    huge = ModelConfig(kind="mlp").model_copy(update={"latent_size": 10**6, "hidden_sizes": (10**6,)})
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="parameters, more than the"):
        check_model_size(TrainingConfig().model_copy(update={"model": huge}), "config")
    assert time.monotonic() - t0 < 1
    check_model_size(TrainingConfig(), "config")  # the default is fine


# About 956M parameters: under the bound, but gigabytes to allocate.
HUGE = {"kind": "mlp", "hidden_sizes": [16384, 16384, 12000]}


def test_a_file_declaring_a_huge_model_is_refused_unallocated(tmp_path, monkeypatch):
    tiny = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8]}})
    p = tmp_path / MODEL
    config = {**tiny.to_dict(), "model": HUGE}
    state = build(tiny).state_dict()
    save_file(state, str(p), metadata={"format": "pt", "vae_dist_config": json.dumps(config)})
    built = models.build

    def build_checked(config):
        assert config.model.hidden_sizes == (8,) or torch.empty(0).device.type == "meta"
        return built(config)

    monkeypatch.setattr(models, "build", build_checked)
    monkeypatch.setattr("vae_dist.run.modelfile.build", build_checked)
    with pytest.raises(ArtifactError, match=r"does not match its config: decoder\..* has shape"):
        load_model_file(p)


def test_compiled_model_names_load(tmp_path):
    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8], "latent_size": 3}})
    model = build(cfg)
    # What a torch.compile'd model's state_dict names look like.
    save_model_file(tmp_path / MODEL, {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, cfg)
    loaded, _ = load_model_file(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="--compile needs a C++ compiler")
def test_a_compiled_run_writes_the_plain_model(data_dir, tmp_path, capsys):
    art = tmp_path / "run"
    check_ok(main_in_process(small_train_args(data_dir, art, "--model", "mlp", "--limit-train-samples", "256",
                                              "--limit-eval-samples", "100", "--compile"), capsys))
    assert not [k for k in load_file(str(art / MODEL)) if "_orig_mod" in k]
    check_ok(main_in_process(["sample", str(art), "--num", "4"], capsys))
