"""The launch scripts and the Accelerate config files.

Nothing here starts Python or a training run: the scripts run under bash with a PATH whose
`accelerate` (and `nvidia-smi`, `srun`, `scontrol`, `scancel`) are bash fakes that record
how they were called.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


# --- Accelerate config files --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "distributed_type", "mixed_precision"),
    [(ROOT / "accelerate_config.yaml", "MULTI_GPU", "bf16"), (LAUNCH / "accelerate_cpu.yaml", "MULTI_CPU", "no")],
    ids=["accelerate_config.yaml", "accelerate_cpu.yaml"],
)
def test_accelerate_accepts_config(path: Path, distributed_type: str, mixed_precision: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    # The loader rejects unknown keys, so this also guards against typos.
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == distributed_type
    # A bare YAML `no` would load as False and crash `accelerate launch`.
    assert cfg.mixed_precision == mixed_precision


# --- running the scripts against fakes ----------------------------------------------

# Each call of a fake appends one record: tool, SLURM_NODEID, then its arguments, separated
# by \x1f (records by \x1e), so that arguments with spaces survive.
RECORDER = r"""#!/usr/bin/env bash
printf '%s\x1f' "${0##*/}" "${SLURM_NODEID:-}" "$@" >> "$FAKE_CALLS"
printf '\x1e' >> "$FAKE_CALLS"
"""


def _write_exe(path: Path, body: str) -> None:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)


@pytest.fixture
def fakebin(tmp_path: Path) -> dict:
    """A bin dir of fake tools; each call of a fake is recorded in calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "calls"
    _write_exe(bindir / "accelerate", RECORDER)
    _write_exe(bindir / "scontrol", RECORDER + 'if [[ "$1 $2" == "show hostnames" ]]; then printf "gpu-node-a\\ngpu-node-b\\n"; fi\n')
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
    # slurmstepd would, with that node's SLURM_NODEID. With FAKE_STEP it stands in for a
    # long job step instead, which the fake scancel ends.
    _write_exe(
        bindir / "srun",
        """\
        #!/usr/bin/env bash
        while [[ "$1" == -* ]]; do shift; done
        if [[ -n "${FAKE_STEP:-}" ]]; then
            echo $$ > "$FAKE_STEP"
            exec sleep 30
        fi
        for node in $(seq 0 $(( SLURM_NNODES - 1 ))); do
            SLURM_NODEID=$node "$@" || exit $?
        done
        """,
    )
    _write_exe(bindir / "scancel", RECORDER + 'if [[ -n "${FAKE_STEP:-}" ]]; then kill -TERM "$(cat "$FAKE_STEP")"; fi\n')
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path), "FAKE_CALLS": str(record)}
    return {"env": env, "record": record}


def _calls(fake: dict) -> list[dict]:
    if not fake["record"].exists():
        return []
    calls = []
    for rec in fake["record"].read_text().split("\x1e")[:-1]:
        tool, node, *args = rec.split("\x1f")[:-1]
        calls.append({"tool": tool, "node": node or None, "args": args})
    return calls


def _run(script: str, fake: dict, extra_env: dict, *args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it: by its path (its mode and shebang), slurm.sbatch by bash."""
    cmd = ["bash", str(LAUNCH / script)] if script.endswith(".sbatch") else [str(LAUNCH / script)]
    return subprocess.run([*cmd, *args], env=dict(fake["env"], **extra_env), capture_output=True, text=True, timeout=60)


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


def _slurm_env(restart: str | None = None) -> dict:
    env = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[a-b]", "SLURM_JOB_ID": "4242"}
    if restart is not None:
        env["SLURM_RESTART_COUNT"] = restart
    return env


def test_slurm_starts_one_launcher_per_node_with_its_own_rank(fakebin: dict, tmp_path: Path) -> None:
    proc = _run("slurm.sbatch", fakebin, _slurm_env(), "--epochs", "5", "--artifact-dir", "/shared/x y")
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
    proc = _run("slurm.sbatch", fakebin, _slurm_env(restart="1"), "--epochs", "5")
    assert proc.returncode == 0, proc.stderr
    calls = [c for c in _calls(fakebin) if c["tool"] == "accelerate"]
    assert len(calls) == 2
    assert all(_cli_args(c["args"]) == ["--resume", "--epochs", "5"] for c in calls)


def _traps_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (Linux's /proc status, SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_slurm_forwards_sigterm_and_requeues(fakebin: dict, tmp_path: Path) -> None:
    step = tmp_path / "step.pid"
    env = dict(fakebin["env"], **_slurm_env(), FAKE_STEP=str(step))
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "--epochs", "5"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (step.exists() and _traps_sigterm(proc.pid)):  # the job step runs; the trap is set
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls = [(c["tool"], c["args"]) for c in _calls(fakebin)]
    assert calls[-2:] == [("scancel", ["--signal=TERM", "4242"]), ("scontrol", ["requeue", "4242"])]
    assert "requeueing" in out
