"""A run's config.json retrains it bit for bit (the CLI in process, on real MNIST)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import check_ok, main_in_process, small_train_args


@pytest.mark.slow
def test_saved_config_retrains_bit_identically(tmp_path, data_dir, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    check_ok(main_in_process(small_train_args(data_dir, first, "--model", "mlp", "--max-steps", "12"), capsys))
    check_ok(main_in_process(["train", "--config", str(first / "config.json"), "--artifact-dir", str(again)], capsys))
    # The file, not the defaults, made the second run (the same config but for its folder).
    configs = [json.loads((art / "config.json").read_text()) for art in (first, again)]
    assert [{**c, "artifact_dir": ""} for c in configs] == [{**configs[0], "artifact_dir": ""}] * 2
    assert configs[0]["max_steps"] == 12
    a, b = (load_file(str(art / "model.safetensors")) for art in (first, again))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "retraining from config.json changed the weights"
