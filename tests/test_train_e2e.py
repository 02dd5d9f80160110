"""One-process end-to-end runs: reproducibility from a saved config, short runs are complete runs."""

from __future__ import annotations

import pytest

import json

import torch
from safetensors.torch import load_file

from conftest import run_cli, small_train_args

# Real processes (the CLI, accelerate launch, launch scripts): the slow tier.
pytestmark = pytest.mark.slow


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_saved_config_retrains_bit_identically(tmp_path, data_dir):
    first = tmp_path / "first"
    r = run_cli(small_train_args(data_dir, first, "--max-steps", "12"))
    assert r.returncode == 0, r.stderr
    again = tmp_path / "again"
    r = run_cli(["train", "--config", str(first / "config.json"), "--artifact-dir", str(again)])
    assert r.returncode == 0, r.stderr
    a, b = _weights(first), _weights(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "retraining from config.json changed the weights"
    # The control: another seed must give other weights, or the check above proves nothing.
    other = tmp_path / "other"
    r = run_cli(["train", "--config", str(first / "config.json"), "--artifact-dir", str(other), "--seed", "7"])
    assert r.returncode == 0, r.stderr
    c = _weights(other)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_max_steps_inside_an_epoch_is_a_complete_run(tmp_path, data_dir):
    art = tmp_path / "art"
    # 1024 samples / 64 = 16 steps per epoch; stop after 5.
    r = run_cli(small_train_args(data_dir, art, "--max-steps", "5", "--epochs", "3"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["epoch"] == 1 and rows[0]["step"] == 5 and rows[0]["complete_epoch"] is False
    assert rows[0]["train/samples"] == 5 * 64
    assert rows[0]["valid/samples"] == 500
    for key in ("train/loss", "valid/loss", "valid/recon", "valid/kl", "epoch_seconds", "samples_per_second"):
        assert key in rows[0]
    assert abs(rows[0]["valid/loss"] - rows[0]["valid/recon"] - rows[0]["valid/kl"]) < 1e-6 * rows[0]["valid/loss"]
    manifests = list((art / "checkpoints").glob("*/MANIFEST.json"))
    assert len(manifests) == 1
    state = json.loads(manifests[0].read_text())["state"]
    assert state["global_step"] == 5 and state["batches_done"] == 5 and state["epoch"] == 0
    assert (art / "model.safetensors").is_file()
    # The summary table is printed at the end.
    assert "Summary" in r.stdout and "valid/loss" in r.stdout
