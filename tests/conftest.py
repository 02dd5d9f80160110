"""Shared fixtures: where MNIST is, and how to run the real CLI (one process or launched)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vae_dist.data import DATA_DIR_ENV, default_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = default_data_dir()
    if not (d / "t10k-images-idx3-ubyte.gz").exists() and not (d / "t10k-images-idx3-ubyte").exists():
        pytest.fail(f"MNIST not found in {d}; set {DATA_DIR_ENV} to a folder holding the four IDX files")
    return d


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": "disabled",
            "WANDB_SILENT": "true",
            "PYTHONUNBUFFERED": "1",
            # Two ranks on two cores: one intra-op thread each keeps them from fighting.
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        }
    )
    env.update(extra)
    return env


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`python -m vae_dist ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "vae_dist", *args], cwd=REPO, env=env or cli_env(), capture_output=True,
        text=True, timeout=timeout, **kw,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(num_processes: int, args: list[str], port: int | None = None) -> list[str]:
    """The real `accelerate launch --multi_gpu --num_processes N -m vae_dist ARGS` (gloo on the CPU)."""
    base = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        base += ["--multi_gpu"]
    base += [
        "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port or free_port()),
    ]
    return base + ["-m", "vae_dist", *args]


def run_launch(num_processes: int, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        launch_cmd(num_processes, args), cwd=REPO, env=env or cli_env(), capture_output=True, text=True,
        timeout=timeout,
    )


def small_train_args(data_dir: Path, artifact_dir: Path, *more: str) -> list[str]:
    """A run that takes seconds: a slice of MNIST, no workers, no W&B."""
    return [
        "train", "--cpu", "--data-dir", str(data_dir), "--artifact-dir", str(artifact_dir),
        "--limit-train-samples", "1024", "--limit-eval-samples", "500", "--num-workers", "0",
        "--wandb-mode", "disabled", "--epochs", "1", *more,
    ]


def output(proc: subprocess.CompletedProcess) -> str:
    """stdout + stderr, with a live progress bar's carriage returns as line breaks."""
    return (proc.stdout + "\n" + proc.stderr).replace("\r", "\n")


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one `error: ...` line (exit 2) and no traceback."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = re.findall(r"error: [^\r\n]*", proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]
