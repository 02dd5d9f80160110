"""Checks for the launch scripts and Accelerate config files.

Nothing here starts a real training run: the scripts are executed with a PATH
whose `accelerate` (and `nvidia-smi`, `srun`, `scontrol`, `scancel`) are fakes
that record how they were called.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]

# Real processes (bash, fake launchers): the slow tier.
pytestmark = [pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash"), pytest.mark.slow]


# --- syntax -------------------------------------------------------------------------


def test_there_is_one_script_per_topology() -> None:
    names = {p.name for p in SCRIPTS}
    assert names == {"single_gpu.sh", "multi_gpu.sh", "multi_node.sh", "cpu_processes.sh", "slurm.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_valid_bash(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")), ids=lambda p: p.name)
def test_shell_script_is_executable_and_strict(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    assert "set -euo pipefail" in script.read_text()


# --- Accelerate config files --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "distributed_type", "num_processes", "mixed_precision", "use_cpu"),
    [
        (ROOT / "accelerate_config.yaml", "MULTI_GPU", 8, "bf16", False),
        (LAUNCH / "accelerate_cpu.yaml", "MULTI_CPU", 2, "no", True),
    ],
    ids=["accelerate_config.yaml", "accelerate_cpu.yaml"],
)
def test_accelerate_accepts_config(path: Path, distributed_type, num_processes, mixed_precision, use_cpu) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    assert isinstance(yaml.safe_load(path.read_text()), dict)
    # The loader rejects unknown keys, so this also guards against typos.
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == distributed_type
    assert cfg.num_processes == num_processes
    assert cfg.num_machines == 1 and cfg.machine_rank == 0
    # A bare YAML `no` would load as False and crash `accelerate launch`.
    assert cfg.mixed_precision == mixed_precision
    assert cfg.use_cpu is use_cpu


def test_gpu_config_uses_all_gpus() -> None:
    raw = yaml.safe_load((ROOT / "accelerate_config.yaml").read_text())
    assert raw["gpu_ids"] == "all"
    assert raw["rdzv_backend"] == "static" and raw["same_network"] is True
    assert raw["main_training_function"] == "main"


# --- running the scripts against fakes ----------------------------------------------


def _write_exe(path: Path, body: str) -> None:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)


@pytest.fixture
def fakebin(tmp_path: Path) -> dict:
    """A bin dir of fake tools; each call of a fake is appended to calls.jsonl."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "calls.jsonl"
    recorder = textwrap.dedent(
        f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(record)!r}, "a") as fh:
            fh.write(json.dumps({{"tool": os.path.basename(sys.argv[0]), "args": sys.argv[1:],
                                  "node": os.environ.get("SLURM_NODEID")}}) + "\\n")
        """
    )
    _write_exe(bindir / "accelerate", recorder)
    _write_exe(bindir / "scancel", recorder)
    _write_exe(
        bindir / "scontrol",
        recorder
        + textwrap.dedent(
            """\
            if sys.argv[1:3] == ["show", "hostnames"]:
                print("gpu-node-a\\ngpu-node-b")
            """
        ),
    )
    _write_exe(
        bindir / "nvidia-smi",
        """\
        #!/usr/bin/env bash
        echo "GPU 0: NVIDIA H100 (UUID: GPU-0)"
        echo "GPU 1: NVIDIA H100 (UUID: GPU-1)"
        echo "  MIG 1g.10gb Device 0: (UUID: MIG-0)"
        echo "GPU 2: NVIDIA H100 (UUID: GPU-2)"
        """,
    )
    # srun: drop its own options, then run the command once per node, the way
    # slurmstepd would, with that node's SLURM_NODEID.
    _write_exe(
        bindir / "srun",
        """\
        #!/usr/bin/env bash
        while [[ "$1" == -* ]]; do shift; done
        if [[ -n "${FAKE_SRUN_SLEEP:-}" ]]; then
            # Stand in for a long training step that ends a while after SIGTERM.
            touch "$FAKE_SRUN_SLEEP.started"
            sleep 2
            exit 0
        fi
        for node in $(seq 0 $(( SLURM_NNODES - 1 ))); do
            SLURM_NODEID=$node "$@" || exit $?
        done
        """,
    )
    env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
    }
    return {"env": env, "record": record}


def _calls(fake: dict) -> list[dict]:
    if not fake["record"].exists():
        return []
    return [json.loads(line) for line in fake["record"].read_text().splitlines()]


def _run(script: str, fake: dict, extra_env: dict, *args: str) -> subprocess.CompletedProcess:
    env = dict(fake["env"], **extra_env)
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], env=env, capture_output=True, text=True, timeout=60
    )


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _cli_args(args: list[str]) -> list[str]:
    """What follows `-m vae_dist train`, i.e. what our CLI receives."""
    i = args.index("-m")
    assert args[i + 1 : i + 3] == ["vae_dist", "train"]
    return args[i + 3 :]


MULTI_NODE_ENV = {
    "NUM_MACHINES": "2",
    "MACHINE_RANK": "1",
    "MAIN_PROCESS_IP": "10.0.0.1",
    "GPUS_PER_NODE": "8",
}


@pytest.mark.parametrize("missing", sorted(MULTI_NODE_ENV))
def test_multi_node_fails_in_one_line_when_a_variable_is_missing(fakebin: dict, missing: str) -> None:
    env = {k: v for k, v in MULTI_NODE_ENV.items() if k != missing}
    proc = _run("multi_node.sh", fakebin, env, "--epochs", "3")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and missing in lines[0], proc.stderr
    assert _calls(fakebin) == []  # nothing was launched


def test_multi_node_passes_topology_and_cli_args(fakebin: dict) -> None:
    proc = _run("multi_node.sh", fakebin, MULTI_NODE_ENV, "--epochs", "3", "--artifact-dir", "/shared/a b")
    assert proc.returncode == 0, proc.stderr
    (call,) = _calls(fakebin)
    args = call["args"]
    assert args[0] == "launch" and "--multi_gpu" in args
    assert _flag(args, "--machine_rank") == "1"
    assert _flag(args, "--main_process_ip") == "10.0.0.1"
    assert _flag(args, "--main_process_port") == "29500"
    assert _flag(args, "--num_machines") == "2"
    assert _flag(args, "--num_processes") == "16"
    assert _cli_args(args) == ["--epochs", "3", "--artifact-dir", "/shared/a b"]


def test_multi_node_port_override_and_bad_rank(fakebin: dict) -> None:
    proc = _run("multi_node.sh", fakebin, dict(MULTI_NODE_ENV, MAIN_PROCESS_PORT="12345"))
    assert proc.returncode == 0, proc.stderr
    assert _flag(_calls(fakebin)[0]["args"], "--main_process_port") == "12345"
    bad = _run("multi_node.sh", fakebin, dict(MULTI_NODE_ENV, MACHINE_RANK="2"))
    assert bad.returncode != 0 and "MACHINE_RANK" in bad.stderr


def test_single_gpu(fakebin: dict) -> None:
    proc = _run("single_gpu.sh", fakebin, {}, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    (call,) = _calls(fakebin)
    assert call["args"] == [
        "launch", "--num_processes", "1", "--mixed_precision", "bf16", "-m", "vae_dist", "train", "--epochs", "1"
    ]


def test_multi_gpu_counts_gpus_not_mig_lines(fakebin: dict) -> None:
    proc = _run("multi_gpu.sh", fakebin, {}, "--batch-size", "64")
    assert proc.returncode == 0, proc.stderr
    (call,) = _calls(fakebin)
    assert "--multi_gpu" in call["args"]
    assert _flag(call["args"], "--num_processes") == "3"
    assert _cli_args(call["args"]) == ["--batch-size", "64"]


def test_multi_gpu_num_gpus_override(fakebin: dict) -> None:
    assert _run("multi_gpu.sh", fakebin, {"NUM_GPUS": "8"}).returncode == 0
    assert _run("multi_gpu.sh", fakebin, {"NUM_GPUS": "1"}).returncode == 0
    many, one = _calls(fakebin)
    assert _flag(many["args"], "--num_processes") == "8" and "--multi_gpu" in many["args"]
    # Accelerate rejects --multi_gpu with one process, so the script drops it.
    assert _flag(one["args"], "--num_processes") == "1" and "--multi_gpu" not in one["args"]
    bad = _run("multi_gpu.sh", fakebin, {"NUM_GPUS": "x"})
    assert bad.returncode != 0 and "NUM_GPUS" in bad.stderr


def test_cpu_processes_uses_multi_process_launcher_and_our_cpu_flag(fakebin: dict) -> None:
    assert _run("cpu_processes.sh", fakebin, {}, "--epochs", "1").returncode == 0
    assert _run("cpu_processes.sh", fakebin, {"NUM_PROCS": "4"}).returncode == 0
    two, four = _calls(fakebin)
    for call, n in ((two, "2"), (four, "4")):
        launcher_args = call["args"][: call["args"].index("-m")]
        assert "--multi_gpu" in launcher_args
        assert "--cpu" not in launcher_args  # Accelerate's --cpu would start one process
        assert _flag(call["args"], "--num_processes") == n
        assert _cli_args(call["args"])[0] == "--cpu"
    assert _cli_args(two["args"]) == ["--cpu", "--epochs", "1"]


def _slurm_env(tmp_path: Path, restart: str | None = None) -> dict:
    env = {
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[a-b]",
        "SLURM_JOB_ID": "4242",
    }
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = restart
    return env


def test_slurm_starts_one_launcher_per_node_with_its_own_rank(fakebin: dict, tmp_path: Path) -> None:
    proc = _run("slurm.sbatch", fakebin, _slurm_env(tmp_path), "--epochs", "5", "--artifact-dir", "/shared/x y")
    assert proc.returncode == 0, proc.stderr
    calls = [c for c in _calls(fakebin) if c["tool"] == "accelerate"]
    assert [c["node"] for c in calls] == ["0", "1"]
    for call in calls:
        args = call["args"]
        # SLURM_NODEID is expanded on each node, not once by the batch shell.
        assert _flag(args, "--machine_rank") == call["node"]
        assert _flag(args, "--main_process_ip") == "gpu-node-a"
        assert _flag(args, "--main_process_port") == "29500"
        assert _flag(args, "--num_machines") == "2"
        assert _flag(args, "--num_processes") == "16"
        assert _flag(args, "--rdzv_backend") == "static" and "--same_network" in args
        assert _cli_args(args) == ["--epochs", "5", "--artifact-dir", "/shared/x y"]


def test_slurm_adds_resume_after_a_requeue(fakebin: dict, tmp_path: Path) -> None:
    proc = _run("slurm.sbatch", fakebin, _slurm_env(tmp_path, restart="1"), "--epochs", "5")
    assert proc.returncode == 0, proc.stderr
    calls = [c for c in _calls(fakebin) if c["tool"] == "accelerate"]
    assert len(calls) == 2
    assert all(_cli_args(c["args"]) == ["--resume", "--epochs", "5"] for c in calls)


def test_slurm_header_asks_for_requeue_and_a_warning_signal() -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    for directive in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:TERM@120",
    ):
        assert directive in text
    assert "shared" in text.lower()  # the artifact-dir warning


def test_slurm_forwards_sigterm_and_requeues(fakebin: dict, tmp_path: Path) -> None:
    import signal
    import time

    marker = tmp_path / "srun"
    env = dict(fakebin["env"], **_slurm_env(tmp_path), FAKE_SRUN_SLEEP=str(marker))
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), "--epochs", "5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 20
    while not Path(f"{marker}.started").exists():
        assert time.monotonic() < deadline, "fake srun never started"
        time.sleep(0.05)
    time.sleep(0.2)  # let the batch shell reach `wait`
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = [(c["tool"], c["args"]) for c in _calls(fakebin)]
    assert ("scancel", ["--signal=TERM", "4242"]) in calls
    assert calls[-1] == ("scontrol", ["requeue", "4242"])
    assert "requeueing" in out
