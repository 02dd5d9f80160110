"""A run's config.json retrains it bit for bit, and its banner says what it trains on (the CLI in process, on
real MNIST)."""

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


@pytest.mark.slow
@pytest.mark.parametrize("flags, said", [
    ((), "on 64 mnist images (grey-level, bce likelihood)"),
    (("--binarize", "dynamic"), "on 64 mnist images (dynamically binarized, bce likelihood)"),
    (("--binarize", "static", "--recon-loss", "mse"), "on 64 mnist images (statically binarized, mse likelihood)"),
])
def test_the_banner_names_the_data_its_binarization_and_the_likelihood(flags, said, tmp_path, data_dir, capsys):
    ran = main_in_process(small_train_args(data_dir, tmp_path / "run", "--model", "mlp", "--hidden-sizes", "8",
                                           "--limit-train-samples", "64", "--limit-eval-samples", "100",
                                           "--max-steps", "1", *flags), capsys)
    check_ok(ran)
    assert said in ran.stdout.splitlines()[0]
