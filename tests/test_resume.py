"""Never lose a run: kills at chosen moments, exact resume, preemption, corrupt checkpoints.

Every test drives the real CLI in subprocesses (one process, or `accelerate launch` with
two gloo CPU ranks). The base config has 20 optimizer steps per epoch (640 images, batch
32), a checkpoint every 5 steps, 2 epochs and the 2 newest checkpoints kept, so a kill
can land between checkpoints, right after one, at an epoch boundary or inside a write.
A resumed run must end with weights bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, check_ok, cli_env, launch_cmd, one_error_line, output, run_cli, run_launch, small_train_args
from vae_dist.checkpoint import MANIFEST, TMP_PREFIX, read_manifest

# Real processes (the CLI, accelerate launch, launch scripts): the slow tier.
pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 20  # one process; 10 with two
BASE = (
    "--epochs", "2", "--checkpoint-every-steps", "5", "--batch-size", "32",
    "--limit-train-samples", "640", "--keep-checkpoints", "2",
)
# Long enough to be signalled while it trains: 50 steps per epoch at the default batch of 64
# (25 with two processes, which agree on a stop every 10 steps).
LONG = ("--limit-train-samples", "3200", "--epochs", "2", "--limit-eval-samples", "200", "--model", "conv")


# ----------------------------------------------------------------------- helpers


def base_args(data_dir: Path, art: Path, *more: str) -> list[str]:
    return small_train_args(data_dir, art, *BASE, *more)


def weights(art: Path) -> dict[str, torch.Tensor]:
    return load_file(str(art / "model.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def assert_identical_weights(art: Path, ref: Path) -> None:
    wa, wr = weights(art), weights(ref)
    assert wa.keys() == wr.keys()
    different = [k for k in wr if not torch.equal(wa[k], wr[k])]
    assert not different, f"tensors differ from the uninterrupted run: {different} (max abs {max_weight_diff(art, ref):.3g})"


def metrics(art: Path) -> list[dict]:
    return [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_metrics(art: Path, ref: Path, samples_per_epoch: int = 640) -> None:
    rows, ref_rows = metrics(art), metrics(ref)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref_rows] == list(range(1, len(ref_rows) + 1))
    for row, want in zip(rows, ref_rows):
        assert row["step"] == want["step"]
        # Every image of the epoch counted once: a re-taken step would add 32, a skipped one remove 32.
        assert row["train/samples"] == samples_per_epoch
        for key in ("train/loss", "train/recon", "train/kl", "valid/loss"):
            assert row[key] == pytest.approx(want[key], rel=1e-9, abs=0), (row["epoch"], key)


def checkpoint_dirs(art: Path) -> list[str]:
    d = art / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def complete_checkpoints(art: Path) -> dict[str, dict]:
    out = {}
    for name in checkpoint_dirs(art):
        m = read_manifest(art / "checkpoints" / name)
        if m is not None and not name.startswith(TMP_PREFIX):
            out[name] = m
    return out


def assert_final_state(art: Path, epochs: int = 2, steps_per_epoch: int = STEPS_PER_EPOCH) -> None:
    """The newest manifest is at the end of the run, with one history row per epoch."""
    complete = complete_checkpoints(art)
    newest = complete[max(complete)]["state"]
    assert newest["global_step"] == epochs * steps_per_epoch
    assert (newest["epoch"], newest["batches_done"]) == (epochs, 0)
    assert [r["epoch"] for r in newest["history"]] == list(range(1, epochs + 1))  # no duplicates
    assert not [n for n in checkpoint_dirs(art) if n.startswith(TMP_PREFIX)]


def resumed_from(proc: subprocess.CompletedProcess) -> tuple[str, str, str, str]:
    found = re.findall(r"resumed from (\S+): epoch (\d+), batch (\d+)/\d+, step (\d+)", output(proc))
    assert len(found) == 1, output(proc)[-3000:]
    return found[0]


def checkpoint_seconds(proc: subprocess.CompletedProcess) -> list[float]:
    return [float(s) for s in re.findall(r"checkpoint \S+ written in ([0-9.]+) s", output(proc))]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_manifest_size(folder: Path, rel: str) -> None:
    """Make the manifest agree with a file we replaced (its size and SHA-256), so only
    loading can catch it."""
    m = json.loads((folder / MANIFEST).read_text())
    assert rel in m["files"]
    m["files"][rel] = (folder / rel).stat().st_size
    if "sha256" in m:
        m["sha256"][rel] = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(m))


# ----------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def ref(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted one-process run."""
    art = tmp_path_factory.mktemp("ref") / "run"
    proc = run_cli(base_args(data_dir, art))
    check_ok(proc)
    secs = checkpoint_seconds(proc)
    print(f"\n[figure] conv, 1 process: {len(secs)} checkpoints, written in {min(secs):.3f}-{max(secs):.3f} s "
          f"(median {sorted(secs)[len(secs) // 2]:.3f} s)")
    return art


@pytest.fixture(scope="module")
def ref2(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted two-process run (10 steps per epoch)."""
    art = tmp_path_factory.mktemp("ref2") / "run"
    proc = run_launch(2, base_args(data_dir, art))
    check_ok(proc)
    secs = checkpoint_seconds(proc)
    print(f"\n[figure] conv, 2 processes: {len(secs)} checkpoints, written in {min(secs):.3f}-{max(secs):.3f} s "
          f"(median {sorted(secs)[len(secs) // 2]:.3f} s)")
    return art


def test_reference_rotation_keeps_two_newest(ref: Path) -> None:
    assert checkpoint_dirs(ref) == ["step-000000035", "step-000000040"]
    assert_final_state(ref)
    assert len(metrics(ref)) == 2


# ----------------------------------------------------------------------- kill + resume


def kill_then_resume(data_dir: Path, art: Path, hook: dict[str, str], *more: str, env_extra: dict | None = None):
    args = base_args(data_dir, art, *more)
    killed = run_cli(args, env=cli_env(**(env_extra or {}), **hook))
    assert killed.returncode == -signal.SIGKILL, f"exit {killed.returncode}\n{killed.stderr[-2000:]}"
    assert not (art / "model.safetensors").exists()
    before = checkpoint_dirs(art)
    resumed = run_cli([*args, "--resume"], env=cli_env(**(env_extra or {})))
    check_ok(resumed)
    return killed, before, resumed


KILL_POINTS = {
    # name: (hook env, checkpoint resumed from, (epoch, batch, step) in the resume line)
    "mid-epoch": ({"VAE_DIST_TEST_FAIL_AT": "0:13:kill"}, "step-000000010", ("1", "10", "10")),
    # Right after the epoch-end checkpoint, before step 21: nothing may be re-taken or skipped.
    "right-after-checkpoint": ({"VAE_DIST_TEST_FAIL_AT": "0:20:kill"}, "step-000000020", ("2", "0", "20")),
    "inside-checkpoint-write": ({"VAE_DIST_TEST_KILL_IN_CHECKPOINT": "2"}, "step-000000005", ("1", "5", "5")),
    # The 4th write is the epoch-end checkpoint of step 20 (a step checkpoint that falls on
    # an epoch end is left to it, not written twice); the resume starts from step 15.
    "inside-epoch-end-write": ({"VAE_DIST_TEST_KILL_IN_CHECKPOINT": "4"}, "step-000000015", ("1", "15", "15")),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_run_resumes_bit_identical(point: str, ref: Path, data_dir: Path, tmp_path: Path) -> None:
    hook, folder, position = KILL_POINTS[point]
    art = tmp_path / "run"
    _, before, resumed = kill_then_resume(data_dir, art, hook)
    if "VAE_DIST_TEST_KILL_IN_CHECKPOINT" in hook:
        # The torn write is there, beside the older complete checkpoints, and must be ignored.
        assert [n for n in before if n.startswith(TMP_PREFIX)], before
    assert resumed_from(resumed) == (folder, *position)
    assert TMP_PREFIX not in re.search(r"resumed from \S+", output(resumed)).group(0)
    assert_identical_weights(art, ref)
    assert_same_metrics(art, ref)
    assert_final_state(art)
    assert checkpoint_dirs(art) == checkpoint_dirs(ref)  # rotation also holds across a resume


def test_two_process_kill_resume_matches(ref2: Path, data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    args = base_args(data_dir, art)
    # 10 steps per epoch with two processes: rank 1 dies before step 18 (torchrun then ends
    # rank 0), so the newest checkpoint is step-15, mid-way through epoch 2.
    killed = run_launch(2, args, env=cli_env(VAE_DIST_TEST_FAIL_AT="1:17:kill"))
    assert killed.returncode != 0
    assert not (art / "model.safetensors").exists()
    assert max(complete_checkpoints(art)) == "step-000000015"
    # Mid-epoch, the position counts batches of 2 x 32: one process cannot take it over.
    line = one_error_line(run_cli([*args, "--resume"]))
    assert "step-000000015" in line and "written by 2" in line, line
    resumed = run_launch(2, [*args, "--resume"])
    check_ok(resumed)
    assert resumed_from(resumed) == ("step-000000015", "2", "5", "15")
    diff = max_weight_diff(art, ref2)
    print(f"\n[figure] 2 processes, killed rank 1 at step 17 and resumed: max abs weight diff {diff:.3g}")
    assert diff <= 1e-6
    assert_same_metrics(art, ref2)
    assert_final_state(art, steps_per_epoch=10)


# ----------------------------------------------------------------------- --resume arguments


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [("--batch-size", "64", "data.batch_size"), ("--model", "mlp", "model.kind"), ("--seed", "7", "seed")],
)
def test_resume_refuses_a_changed_field(flag, value, field, ref: Path, data_dir: Path, tmp_path: Path) -> None:
    art = copy_run(ref, tmp_path / "run")
    config_before = (art / "config.json").read_text()
    line = one_error_line(run_cli([*base_args(data_dir, art, flag, value), "--resume"]))
    assert field in line and "resume" in line, line
    assert (art / "config.json").read_text() == config_before
    assert checkpoint_dirs(art) == checkpoint_dirs(ref)


def test_resume_with_more_epochs_continues(ref: Path, data_dir: Path, tmp_path: Path) -> None:
    art = copy_run(ref, tmp_path / "run")
    proc = run_cli([*base_args(data_dir, art, "--epochs", "3"), "--resume"])
    check_ok(proc)
    assert resumed_from(proc) == ("step-000000040", "3", "0", "40")
    rows, ref_rows = metrics(art), metrics(ref)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row, want in zip(rows[:2], ref_rows):
        assert row["train/loss"] == want["train/loss"] and row["valid/loss"] == want["valid/loss"]
    assert rows[2]["step"] == 60 and rows[2]["train/samples"] == 640
    assert json.loads((art / "config.json").read_text())["epochs"] == 3
    assert_final_state(art, epochs=3)
    assert max_weight_diff(art, ref) > 0  # it really trained on


def test_resume_without_a_previous_run_is_one_line(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "empty"
    art.mkdir()
    line = one_error_line(run_cli([*base_args(data_dir, art), "--resume"]))
    assert "--resume" in line and "no previous run" in line, line
    assert list(art.iterdir()) == []  # nothing was written


# ----------------------------------------------------------------------- corrupt checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(os.urandom(size))


@pytest.mark.parametrize(
    ("damage", "file"),
    # (An optimizer.bin that fails to load is covered by the unpickling test below.)
    [(_truncate, "optimizer.bin"), (_garbage, "model.safetensors")],
    ids=["truncated-optimizer", "garbage-model"],
)
def test_corrupt_newest_checkpoint_falls_back(damage, file, ref: Path, data_dir: Path, tmp_path: Path) -> None:
    art = copy_run(ref, tmp_path / "run")
    newest = art / "checkpoints" / "step-000000040"
    size = (newest / file).stat().st_size
    damage(newest / file)
    assert ((newest / file).stat().st_size == size) == (damage is _garbage)
    proc = run_cli([*base_args(data_dir, art), "--resume"])
    check_ok(proc)
    said = [line for line in output(proc).splitlines() if "step-000000040" in line and "unusable" in line]
    assert len(said) == 1, output(proc)[-3000:]
    assert resumed_from(proc) == ("step-000000035", "2", "15", "35")
    # Steps 36-40 are taken again from step 35: the same model as the uninterrupted run.
    assert_identical_weights(art, ref)
    assert_same_metrics(art, ref)
    assert_final_state(art)


def test_all_checkpoints_corrupt_is_one_line_error(ref: Path, data_dir: Path, tmp_path: Path) -> None:
    art = copy_run(ref, tmp_path / "run")
    _garbage(art / "checkpoints" / "step-000000040" / "model.safetensors")
    _truncate(art / "checkpoints" / "step-000000035" / "model.safetensors")
    line = one_error_line(run_cli([*base_args(data_dir, art), "--resume"]))
    assert "no usable checkpoint" in line, line
    # Nothing was started over: the old outputs are as they were.
    assert checkpoint_dirs(art) == checkpoint_dirs(ref)
    assert (art / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()


# ----------------------------------------------------------------------- unpickling


class _Marker:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_resume_never_unpickles_code(ref: Path, data_dir: Path, tmp_path: Path) -> None:
    # The payload works: unpickling it here creates a marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Marker(probe)))
    assert probe.exists()

    art = copy_run(ref, tmp_path / "run")
    marker = tmp_path / "PWNED"
    ckpts = art / "checkpoints"
    # The newest one's optimizer state and the older one's RNG states are booby-trapped:
    # the first must be refused (-> fall back), the second is then read as well.
    for folder, file in (("step-000000040", "optimizer.bin"), ("step-000000035", "random_states_0.pkl")):
        (ckpts / folder / file).write_bytes(pickle.dumps(_Marker(marker)))
        set_manifest_size(ckpts / folder, file)
    proc = run_cli([*base_args(data_dir, art), "--resume"])
    check_ok(proc)
    assert not marker.exists(), "a checkpoint file was unpickled as code"
    said = [line for line in output(proc).splitlines() if "step-000000040" in line and "unusable" in line]
    assert len(said) == 1 and "falling back to step-000000035" in said[0], output(proc)[-3000:]
    assert resumed_from(proc)[0] == "step-000000035"
    # The data order and noise do not depend on the RNG states, so the result is exact anyway.
    assert_identical_weights(art, ref)
    assert_same_metrics(art, ref)


# ----------------------------------------------------------------------- non-finite loss


def test_huge_learning_rate_is_a_one_line_error(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    proc = run_cli(base_args(data_dir, art, "--learning-rate", "1e30", "--log-every-steps", "1"))
    line = one_error_line(proc)
    m = re.search(r"non-finite at step (\d+)", line)
    assert m and 1 <= int(m.group(1)) <= 5, line
    assert not (art / "model.safetensors").exists()


def test_nan_step_keeps_the_last_good_checkpoint(ref: Path, data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    args = base_args(data_dir, art)
    # Step 8's batch is NaN; the check before the step-10 checkpoint catches it.
    line = one_error_line(run_cli(args, env=cli_env(VAE_DIST_TEST_NAN_AT="8")))
    assert "non-finite at step 8" in line and "step-000000005" in line, line
    assert list(complete_checkpoints(art)) == ["step-000000005"]
    assert not [n for n in checkpoint_dirs(art) if n != "step-000000005"]  # nothing NaN was written
    proc = run_cli([*args, "--resume"])
    check_ok(proc)
    assert resumed_from(proc) == ("step-000000005", "1", "5", "5")
    assert_identical_weights(art, ref)
    assert_same_metrics(art, ref)


# ----------------------------------------------------------------------- W&B continuity


def test_wandb_run_id_survives_kill_and_resume(ref: Path, data_dir: Path, tmp_path: Path) -> None:
    wandb_dir = tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir)}
    art = tmp_path / "run"
    # A kill in the second epoch, between checkpoints.
    killed, _, resumed = kill_then_resume(
        data_dir, art, {"VAE_DIST_TEST_FAIL_AT": "0:27:kill"}, "--wandb-mode", "offline", env_extra=env
    )
    assert resumed_from(resumed) == ("step-000000025", "2", "5", "25")
    ids = [re.findall(r"W&B run \S+ \(id (\w+),", output(p)) for p in (killed, resumed)]
    assert ids[0] and ids[0] == ids[1], ids
    runs = sorted(p.name for p in wandb_dir.rglob("offline-run-*") if p.is_dir())
    assert len(runs) == 2, runs
    assert {name.rsplit("-", 1)[1] for name in runs} == {ids[0][0]}, runs
    assert_identical_weights(art, ref)
    assert_same_metrics(art, ref)


# ----------------------------------------------------------------------- preemption


def _start(cmd: list[str], out_dir: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, err = out_dir / "stdout.txt", out_dir / "stderr.txt"
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=out.open("w"), stderr=err.open("w"))
    return proc, out, err


def _wait_training(proc: subprocess.Popen, err: Path, timeout: float = 120) -> None:
    """Until the first progress line of the first epoch shows (the signal handlers are in place)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be signalled (exit {proc.returncode}): {err.read_text()[-2000:]}")
        if re.search(r"epoch 1/2: [1-9]\d*/", err.read_text()):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail("training never started")


def _wait_exit(proc: subprocess.Popen, limit: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"still running {limit} s after the signal")
    return rc, time.monotonic() - t0


def test_sigterm_checkpoints_and_resume_finishes(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    args = small_train_args(data_dir, art, *LONG)
    proc, _, err = _start([sys.executable, "-m", "vae_dist", *args], tmp_path)
    _wait_training(proc, err)
    proc.send_signal(signal.SIGTERM)
    rc, seconds = _wait_exit(proc, 15)
    stderr = err.read_text()
    print(f"\n[figure] 1 process: exit {rc} {seconds:.1f} s after SIGTERM")
    assert rc == 128 + signal.SIGTERM, stderr[-2000:]
    assert "--resume" in stderr and "SIGTERM" in stderr
    complete = complete_checkpoints(art)
    assert complete, checkpoint_dirs(art)
    state = complete[max(complete)]["state"]
    # Stopped after a step: mid-epoch, with the finished epochs (if any) in its history.
    assert state["batches_done"] >= 1 and state["global_step"] == 50 * state["epoch"] + state["batches_done"]
    assert [r["epoch"] for r in state["history"]] == list(range(1, state["epoch"] + 1))
    resumed = run_cli([*args, "--resume"])
    check_ok(resumed)
    assert resumed_from(resumed)[0] == max(complete)
    assert [r["train/samples"] for r in metrics(art)] == [3200, 3200]
    assert_final_state(art, steps_per_epoch=50)


def test_sigterm_to_the_launcher_stops_two_processes(data_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "run"
    args = small_train_args(data_dir, art, *LONG)
    proc, out, err = _start(launch_cmd(2, args), tmp_path)
    _wait_training(proc, err)
    time.sleep(0.5)  # rank 1 has its handlers too
    proc.send_signal(signal.SIGTERM)  # torchrun's agent forwards SIGTERM to both ranks
    rc, seconds = _wait_exit(proc, 30)
    stderr = err.read_text()
    print(f"\n[figure] accelerate launch, 2 processes: launcher exit {rc} {seconds:.1f} s after SIGTERM")
    assert rc != 0
    assert "--resume" in stderr, stderr[-3000:]
    complete = complete_checkpoints(art)
    assert complete, checkpoint_dirs(art)
    assert not [n for n in checkpoint_dirs(art) if n.startswith(TMP_PREFIX)]
    resumed = run_launch(2, [*args, "--resume"])
    check_ok(resumed)
    assert resumed_from(resumed)[0] == max(complete)
    assert [r["train/samples"] for r in metrics(art)] == [3200, 3200]
    assert_final_state(art, steps_per_epoch=25)


def test_second_sigint_stops_at_once(data_dir: Path, tmp_path: Path) -> None:
    """Two quick Ctrl-Cs end the run promptly with 130, by whichever path wins the race:
    the second one raising at once ("interrupted"), or -- when CPython merged the two
    signals during one long C call, or the first stop was already done -- the graceful
    stop ("stopped by SIGINT")."""
    art = tmp_path / "run"
    proc, _, err = _start([sys.executable, "-m", "vae_dist", *small_train_args(data_dir, art, *LONG)], tmp_path)
    _wait_training(proc, err)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    rc, seconds = _wait_exit(proc, 15)
    stderr = err.read_text()
    path = "interrupted" if "interrupted" in stderr else "graceful" if "stopped by SIGINT" in stderr else "?"
    print(f"\n[figure] two SIGINTs: exit {rc} after {seconds:.1f} s, path {path}")
    assert rc in (130, 2, -signal.SIGINT), stderr[-2000:]
    assert path != "?", stderr[-2000:]


def test_stop_request_semantics() -> None:
    """In-process: the first SIGTERM/SIGINT only asks; a second SIGINT raises at once;
    the previous handlers come back afterwards."""
    from vae_dist.signals import StopRequest

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert stop.requested and stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached: the handler raises on return from os.kill
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
