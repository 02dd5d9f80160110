"""What the machine must provide, refused before the artifact folder is touched: memory for
the tables the config asks for (a K-sample noise table can be tens of GB), and a working
compiler for --compile. Both used to fail at step 1, after --overwrite had cleared the
previous run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import copy_run, main_in_process, one_error_line, small_train_args
from vae_dist.training import resources
from vae_dist.config import TrainingConfig
from vae_dist.errors import ConfigError

CPU = torch.device("cpu")
AVAILABLE = 16e9  # bytes, as if the machine had this much free


def test_a_run_that_does_not_fit_in_memory_is_refused_naming_the_option_and_both_sizes(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device: AVAILABLE)
    burda = {"model": {"kind": "burda"}}
    huge = TrainingConfig.from_dict({**burda, "loss": {"iw_samples": 5000}})
    with pytest.raises(ConfigError, match=r"needs about (\d+\.\d) GB .* but 16\.0 GB is available: lower --iw-train-samples") as e:
        resources.check_memory(huge, 60_000, 10_000, CPU)
    assert float(e.value.args[0].split("about ")[1].split(" GB")[0]) * 1e9 >= 60_000 * 5000 * 50 * 4  # the table alone
    # A table that fits once, on the CPU, does not fit once per process of the machine.
    k50 = TrainingConfig.from_dict({**burda, "loss": {"iw_samples": 50}})
    resources.check_memory(k50, 60_000, 10_000, CPU, local_processes=1)
    with pytest.raises(ConfigError, match="for its 64 processes on this machine"):
        resources.check_memory(k50, 60_000, 10_000, CPU, local_processes=64)


@pytest.mark.slow  # a real run folder, the real MNIST files, and inductor's import
@pytest.mark.parametrize("lacking", ["memory", "compiler"])
def test_what_the_machine_lacks_is_one_line_before_overwrite_touches_the_previous_run(
    lacking, finished_run, data_dir, tmp_path, capsys, monkeypatch
):
    run = copy_run(finished_run, tmp_path)
    before = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    if lacking == "memory":
        monkeypatch.setattr(resources, "available_memory", lambda device: AVAILABLE)
        more, named = ["--iw-train-samples", "5000", "--limit-train-samples", "60000"], "--iw-train-samples"
    else:
        from torch._inductor import config as inductor_config

        monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))  # CXX at nothing
        more, named = ["--compile"], "--compile"
    line = one_error_line(main_in_process(small_train_args(data_dir, run, "--overwrite", *more), capsys))
    assert named in line, line
    after = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before
