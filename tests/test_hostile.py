"""Hostile input found after the first hardening pass: each case a class, tested as one."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from conftest import REPO, check_ok, cli_env, one_error_line, small_train_args
from vae_dist import cli_visual
from vae_dist.artifacts import CONFIG, MARKER, METRICS, MODEL
from vae_dist.cli import build_config
from vae_dist.config import TrainingConfig, options
from vae_dist.data import load_split
from vae_dist.errors import ConfigError, DataError, OutputError, VaeDistError
from vae_dist.fileio import atomic_write, print_out


def _set(dotted: str, value: typing.Any) -> dict[str, typing.Any]:
    out: dict[str, typing.Any] = {}
    node = out
    *sections, leaf = dotted.split(".")
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = value
    return out


def _is(o, kind: type) -> bool:
    return o.annotation is kind or kind in typing.get_args(o.annotation)


FLOATS = [o.dotted for o in options() if _is(o, float)]
STRINGS = [o.dotted for o in options() if _is(o, str)]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dotted", FLOATS)
def test_every_float_option_refuses_non_finite_values(dotted, value):
    # An infinite rate, weight or warm-up passed every bound: it trained nothing, or
    # diverged after --overwrite had cleared the previous run.
    with pytest.raises(ConfigError, match=rf"^{dotted}: must be a finite number"):
        TrainingConfig.from_dict(_set(dotted, value))


def test_the_float_options_are_found():
    assert {"optimizer.learning_rate", "optimizer.warmup_epochs", "loss.kl_weight"} <= set(FLOATS)
    assert {"artifact_dir", "data.cache_dir", "wandb_project"} <= set(STRINGS)


@pytest.mark.parametrize("dotted", STRINGS)
def test_every_string_option_refuses_a_nul_byte(dotted):
    with pytest.raises(ConfigError, match=rf"^{dotted}: must not contain a NUL byte"):
        TrainingConfig.from_dict(_set(dotted, "a\x00b"))


@pytest.mark.parametrize("section", [None, "conv", 3, []])
def test_a_section_that_is_not_an_object_is_one_line_even_with_flags(tmp_path, section):
    config = tmp_path / "c.json"
    config.write_text('{"model": %s}' % ("null" if section is None else repr(section).replace("'", '"')))
    with pytest.raises(ConfigError, match="^model: must be a JSON object"):
        build_config(config, False, {"model.kind": "conv"})
    with pytest.raises(ConfigError, match="^model: must be a JSON object"):
        build_config(config, False, {})


@pytest.mark.parametrize("count, message", [(0, "at least 1 item"), (17, "at most 16 items")])
def test_list_length_errors_give_the_real_bounds(count, message):
    with pytest.raises(ConfigError, match=message):
        TrainingConfig.from_dict({"model": {"hidden_sizes": [8] * count}})


def test_atomic_write_never_replaces_a_fifo(tmp_path):
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(fifo, lambda f: f.write(b"x"))
    assert fifo.exists() and not fifo.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp file left


def _run_folder(root: Path) -> Path:
    root.mkdir()
    (root / MARKER).write_text("{}")
    (root / MODEL).write_bytes(b"weights")
    return root


@pytest.mark.parametrize("name", [MODEL, CONFIG, METRICS, MARKER])
def test_a_picture_never_replaces_the_runs_own_files(tmp_path, name):
    run = _run_folder(tmp_path / "run")
    with pytest.raises(VaeDistError, match="one of the run's own files"):
        cli_visual._output_path(run, run / name, "samples.png")
    # an earlier picture may be replaced, and a file of that name elsewhere is not the run's
    assert cli_visual._output_path(run, run / "samples.png", "samples.png") == run / "samples.png"
    assert cli_visual._output_path(run, tmp_path / name, "samples.png") == tmp_path / name


def test_a_picture_is_not_written_through_a_linked_run_folder(tmp_path):
    run = _run_folder(tmp_path / "run")
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(VaeDistError, match="symbolic link"):
        cli_visual._output_path(link, None, "samples.png")
    assert cli_visual._output_path(run, None, "samples.png") == run / "samples.png"


def test_output_that_stdout_cannot_take(monkeypatch):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        with pytest.raises(OutputError, match="cannot write to standard output"):
            print_out("result")
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        print_out("status", required=False)  # a run's status line: dropped


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DataError, match="is not a directory"):
        load_split(f, "test")
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "missing", "test")


def test_evaluate_with_an_unreadable_accelerate_variable_is_one_line(monkeypatch):
    from vae_dist.evaluate import score
    from vae_dist.model import VAE

    cfg = TrainingConfig.from_dict({"model": {"kind": "mlp", "hidden_sizes": [8], "latent_size": 2}})
    monkeypatch.setenv("ACCELERATE_USE_CPU", "garbage")
    with pytest.raises(VaeDistError, match="cannot set up the accelerator"):
        score(VAE.from_config(cfg.model), cfg, torch.rand(4, 1, 28, 28))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_costs_no_run_and_fails_a_result_in_one_line(tmp_path, data_dir):
    def to_full(args: list[str]) -> subprocess.CompletedProcess:
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "vae_dist", *args], cwd=REPO, env=cli_env(), stdout=full,
                               stderr=subprocess.PIPE, text=True, timeout=300)
        r.stdout = ""
        return r

    art = tmp_path / "run"
    check_ok(to_full(small_train_args(data_dir, art, "--model", "mlp", "--hidden-sizes", "8", "--latent-size", "2")))
    assert (art / MODEL).is_file() and (art / METRICS).is_file()
    assert "cannot write to standard output" in one_error_line(to_full(["evaluate", str(art), "--json"]))
