"""Shared fixtures: where MNIST is, how to run the CLI (in this process, as one process or as
ranks), and a folder's snapshot."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import socket
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vae_dist.data.datasets import DATA_DIR_ENV, default_data_dir

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_finish(session: pytest.Session) -> None:
    # What the imports made lives as long as the session: out of the collector's sight (here, and before the
    # collection for torch's), each full collection scans only what the tests make.
    gc.freeze()


gc.freeze()


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


def run_ranks(args: list[str], *, timeout: float = 60, **extra: str) -> list[subprocess.CompletedProcess]:
    """`python -m vae_dist ARGS` as two ranks started by hand (no torchrun to end the other
    when one stops), each in its own session; past ``timeout`` both are killed and the test
    fails: a rank left waiting is what this catches."""
    port, procs = str(free_port()), []
    for rank in (0, 1):
        env = cli_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra)
        procs.append(subprocess.Popen([sys.executable, "-m", "vae_dist", *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        outs = None
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if outs is None:
        pytest.fail(f"a rank was still running after {timeout} s (both killed)")
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


@contextlib.contextmanager
def one_thread():
    """This process on one intra-op thread, as each process cli_env starts: the same
    rounding in the matrix products, so its weights can be compared with theirs bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def snapshot(root: Path, *, lock: bool = True) -> dict[str, bytes | None]:
    """Every path under root (links not followed) with its bytes (None for folders and links);
    without the lock file if not ``lock`` (every training that takes it writes its pid there)."""
    from vae_dist.run.folder import LOCK

    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*")) if lock or p.name != LOCK
    }


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


@dataclass
class Ran:
    """What ``main_in_process`` saw; the same attribute names as a CompletedProcess, so
    check_ok, output and one_error_line take either."""

    returncode: int
    stdout: str
    stderr: str


def main_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> Ran:
    """`vae-dist ARGS` in this process: the CLI's entry point with its exit code and output,
    without the seconds a fresh interpreter costs."""
    from vae_dist.cli.app import main

    capsys.readouterr()  # drop what came before
    try:
        main(args)
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return Ran(rc, captured.out, captured.err)


# The finished run's flags: mlp, 1 epoch of 640 images at batch 32 (20 steps), checkpoints every 5 steps.
FINISHED_RUN = ("--model", "mlp", "--batch-size", "32", "--limit-train-samples", "640", "--limit-eval-samples", "200",
                "--checkpoint-every-steps", "5", "--keep-checkpoints", "3")


@pytest.fixture(scope="session")
def finished_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished small run (FINISHED_RUN), trained once per session in this process on one
    thread, as a process cli_env starts would. Copy it (``copy_run``) before changing anything in it."""
    from vae_dist.cli.app import main

    art = tmp_path_factory.mktemp("finished") / "run"
    with one_thread():
        main(small_train_args(data_dir, art, *FINISHED_RUN))
    return art


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst, symlinks=True)
    return dst
