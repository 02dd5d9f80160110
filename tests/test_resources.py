"""What the machine must provide: memory for the tables the config asks for (a K-sample noise
table can be tens of GB), refused in one line before the run starts; a compiler for
--compile, whose lack is one line at the first step, the previous run safe beside it."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, cli_env, copy_run, main_in_process, one_error_line, run_cli, small_train_args
from test_rundir import snapshot
from vae_dist.training import runtime
from vae_dist.config import TrainingConfig
from vae_dist.errors import ConfigError
from vae_dist.run.folder import marker_run_id, previous_run_folder

CPU = torch.device("cpu")
AVAILABLE = 16e9  # bytes, as if the machine had this much free


def test_a_run_that_does_not_fit_in_memory_is_refused_naming_the_option_and_both_sizes(monkeypatch):
    monkeypatch.setattr(runtime, "available_memory", lambda device: AVAILABLE)
    burda = {"model": {"kind": "burda"}}
    huge = TrainingConfig.from_dict({**burda, "loss": {"iw_samples": 5000}})
    with pytest.raises(ConfigError, match=r"needs about (\d+\.\d) GB .* but 16\.0 GB is available: lower --iw-train-samples") as e:
        runtime.check_memory(huge, 60_000, 10_000, CPU)
    assert float(e.value.args[0].split("about ")[1].split(" GB")[0]) * 1e9 >= 60_000 * 5000 * 50 * 4  # the table alone
    # A table that fits once, on the CPU, does not fit once per process of the machine.
    k50 = TrainingConfig.from_dict({**burda, "loss": {"iw_samples": 50}})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    runtime.check_memory(k50, 60_000, 10_000, CPU)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    with pytest.raises(ConfigError, match="for its 64 processes on this machine"):
        runtime.check_memory(k50, 60_000, 10_000, CPU)


def test_the_noise_table_is_sized_by_the_familys_own_noise(monkeypatch):
    # burda-2layer draws noise for both stochastic layers (100 + 50 per sample), not latent_size's 50.
    monkeypatch.setattr(runtime, "available_memory", lambda device: 1.5e9)
    two = TrainingConfig.from_dict({"model": {"kind": "burda-2layer"}, "loss": {"iw_samples": 50}})
    with pytest.raises(ConfigError, match=r"\(1\.8 GB for the noise table\)"):
        runtime.check_memory(two, 60_000, 10_000, CPU)


def address_space_limit(monkeypatch, above_mapped: float) -> int:
    """As if `ulimit -v` allowed this process ``above_mapped`` bytes more than it has mapped; returns the limit."""
    limit = psutil.Process().memory_info().vms + int(above_mapped)
    real = psutil.Process.rlimit
    monkeypatch.setattr(psutil.Process, "rlimit", lambda self, which, *new: (limit, limit)
                        if which == psutil.RLIMIT_AS and not new else real(self, which, *new))
    return limit


def test_an_address_space_limit_counts_in_the_memory_check(monkeypatch):
    address_space_limit(monkeypatch, 0.1e9)
    with pytest.raises(ConfigError, match=r"but 0\.1 GB is available: lower --limit-train-samples"):
        runtime.check_memory(TrainingConfig(), 60_000, 10_000, CPU)


@pytest.mark.parametrize("failure", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 188160000 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["MemoryError", "torch"])
def test_an_allocation_that_fails_is_one_line_naming_the_limit(failure, tmp_path, capsys, monkeypatch):
    from vae_dist.training import trainer

    limit = address_space_limit(monkeypatch, 1e9)

    def loading(accelerator, config):
        raise failure

    monkeypatch.setattr(trainer, "load_images", loading)
    art = tmp_path / "run"
    line = one_error_line(main_in_process(small_train_args(tmp_path / "mnist", art), capsys))
    assert f"out of memory under an address-space limit (ulimit -v) of {limit / 1e9:.1f} GB" in line, line
    assert not art.exists()


@pytest.mark.slow  # processes under a real `ulimit -v`
def test_a_run_under_ulimit_v_that_cannot_fit_is_one_line_and_creates_nothing(data_dir, tmp_path):
    """The limit counts what a process has mapped (torch's libraries: gigabytes); the run's noise table (2.4 GB) does
    not fit in the 1.5 GB left, which only the allocation itself used to find, in a traceback."""
    mapped = subprocess.run([sys.executable, "-c", "import psutil, vae_dist.cli.app; "
                             "print(psutil.Process().memory_info().vms)"], env=cli_env(), capture_output=True,
                            text=True, check=True, cwd=REPO)
    limit = int(mapped.stdout) + int(1.5e9)
    art = tmp_path / "run"
    ran = run_cli(small_train_args(data_dir, art, "--limit-train-samples", "60000", "--model", "burda",
                                   "--iw-train-samples", "200"),
                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert "lower --iw-train-samples" in one_error_line(ran)
    assert not art.exists()


@pytest.mark.slow  # a real run folder and the real MNIST files
def test_a_run_that_does_not_fit_is_one_line_before_overwrite_moves_the_previous_run(
    finished_run, data_dir, tmp_path, capsys, monkeypatch
):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(runtime, "available_memory", lambda device: AVAILABLE)
    more = ["--iw-train-samples", "5000", "--limit-train-samples", "60000"]
    line = one_error_line(main_in_process(small_train_args(data_dir, run, "--overwrite", *more), capsys))
    assert "lower --iw-train-samples" in line, line
    assert snapshot(tmp_path) == before


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one AcceleratorState per process, with the first Accelerator's dynamo
    backend in it: without a fresh one, an in-process --compile after another run compiles nothing."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()  # and no later run compiles


@pytest.mark.slow  # inductor's import and first compile
def test_compile_without_a_compiler_is_one_line_at_the_first_step_and_the_previous_run_is_kept(
    finished_run, data_dir, tmp_path, capsys, monkeypatch, fresh_accelerator_state
):
    from torch._inductor import config as inductor_config

    run = copy_run(finished_run, tmp_path)
    before, aside = snapshot(run, lock=False), previous_run_folder(run, marker_run_id(run))
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-g++")))  # CXX at nothing
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cached graph needs no compiler
    line = one_error_line(main_in_process(small_train_args(data_dir, run, "--overwrite", "--compile"), capsys))
    assert line.startswith("error: --compile failed at step 1 (InvalidCxxCompiler: ") and "drop --compile" in line, line
    assert snapshot(aside, lock=False) == before
