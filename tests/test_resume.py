"""Never lose a run: exact resume, fallback past unusable checkpoints, the checkpoints a
run cannot continue from, and kills at chosen moments.

In process on test_learner's synthetic images (10 steps per epoch) wherever the process
is not the point; a real process only for SIGKILL inside a checkpoint write (a rank killed
mid-run: test_distributed.py; signals: test_signals.py). A resumed run must end with
weights bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_learner import _learner, _untimed, _weights

from conftest import (
    FINISHED_RUN, check_ok, cli_env, copy_run, main_in_process, one_error_line, one_thread, output, run_cli,
    small_train_args, snapshot,
)
from vae_dist.run import folder as rundir
from vae_dist.run.checkpoint import MANIFEST, TMP_PREFIX, file_sha256, read_manifest
from vae_dist.errors import CheckpointError, ConfigError, TrainingError
from vae_dist.training.schedule import learning_rate


# ----------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Two uninterrupted epochs."""
    learner = _learner(tmp_path_factory.mktemp("whole"), epochs=2)
    learner.fit()
    return _weights(learner.model), _untimed(learner.position.history)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """One epoch with a checkpoint every 4 steps: step-000000008 (mid-epoch) and step-000000010
    kept; with its final weights. Copy it (copy_run) before changing it."""
    root = tmp_path_factory.mktemp("one-epoch") / "run"
    learner = _learner(root, epochs=1, checkpoint_every_steps=4, run_id="first-id")
    learner.fit()
    assert sorted(p.name for p in (root / rundir.CHECKPOINTS).iterdir()) == ["step-000000008", "step-000000010"]
    return root, _weights(learner.model)


def _edit_manifest(folder: Path, edit) -> None:
    # The manifest is not among the hashed files, so editing it leaves the hashes right.
    m = json.loads((folder / MANIFEST).read_text())
    edit(m)
    (folder / MANIFEST).write_text(json.dumps(m))


LITERATURE = {
    "data": {"batch_size": 32, "eval_batch_size": 100, "binarize": "dynamic"},
    "loss": {"iw_samples": 3},
    "optimizer": {"learning_rate": 3e-3, "schedule": "cosine", "warmup_epochs": 0.5},
}


@pytest.mark.slow
def test_resume_reaches_the_uninterrupted_weights_binarized_iw_cosine(tmp_path):
    # The binarization's coins, the K importance samples' noise and the rate are functions
    # of (seed, epoch, step): nothing of them needs saving.
    reference = _learner(tmp_path / "whole", epochs=2, **LITERATURE)
    reference.fit()
    _learner(tmp_path / "split", epochs=2, max_steps=14, **LITERATURE).fit()
    resumed = _learner(tmp_path / "split", epochs=2, resume=True, **LITERATURE)
    resumed.fit()
    assert torch.equal(_weights(resumed.model), _weights(reference.model))
    assert _untimed(resumed.position.history) == _untimed(reference.position.history)


def test_resume_with_more_epochs_continues_the_same_run(tmp_path, one_epoch, whole):
    # From the end of the finished run's last epoch: also the resume at an epoch end.
    root = copy_run(one_epoch[0], tmp_path)
    resumed = _learner(root, epochs=2, resume=True, run_id="second-id")
    resumed.fit()
    assert torch.equal(_weights(resumed.model), whole[0])
    assert resumed.position.wandb_run_id == "first-id"  # the checkpoints still name the run they belong to


def _zero_tensor_bytes(folder: Path) -> None:
    """Zeros over the middle of model.safetensors's tensor data: same size, header intact."""
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    mid = start + (len(raw) - start) // 2
    raw[mid : mid + 256] = bytes(256)
    path.write_bytes(bytes(raw))


class _Marker:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _code_in_the_optimizer_state(folder: Path) -> None:
    """A pickle that runs code when loaded, with its size and hash in the manifest: only
    the loader can refuse it."""
    (folder / "optimizer.bin").write_bytes(pickle.dumps(_Marker(folder.parent.parent / "PWNED")))

    def record(m):
        m["files"]["optimizer.bin"] = (folder / "optimizer.bin").stat().st_size
        m["sha256"]["optimizer.bin"] = file_sha256(folder / "optimizer.bin")

    _edit_manifest(folder, record)


def _nan_weights(folder: Path) -> None:
    """A weight turned NaN, sealed (sizes and hashes right) as a save that did not check the weights would."""
    path = folder / "model.safetensors"
    weights = load_file(path)
    next(iter(weights.values())).view(-1)[0] = float("nan")
    save_file(weights, path)
    _edit_manifest(folder, lambda m: (m["files"].update({path.name: path.stat().st_size}),
                                      m["sha256"].update({path.name: file_sha256(path)})))


DAMAGE = {
    "same-size corrupt bytes": (_zero_tensor_bytes, "does not match its SHA-256"),
    "an edited position": (lambda f: _edit_manifest(f, lambda m: m["state"]["history"].clear()), "no valid manifest"),
    "code in a pickle": (_code_in_the_optimizer_state, "UnpicklingError"),
    "non-finite weights": (_nan_weights, "its weights are not finite"),
}


@pytest.mark.parametrize("damage, why", DAMAGE.values(), ids=DAMAGE.keys())
def test_an_unusable_newest_checkpoint_falls_back_to_the_older_one(tmp_path, one_epoch, damage, why):
    root = copy_run(one_epoch[0], tmp_path)
    damage(root / rundir.CHECKPOINTS / "step-000000010")
    log: list[str] = []
    learner = _learner(root, epochs=1, resume=True, log=log.append)
    learner.fit()
    said = [line for line in log if "step-000000010 is unusable" in line]
    assert len(said) == 1 and why in said[0], log
    assert not (tmp_path / "PWNED").exists(), "a checkpoint file was unpickled as code"
    # Steps 9 and 10 taken again from step 8: the same model as the uninterrupted run.
    assert learner.position.global_step == 10
    assert torch.equal(_weights(learner.model), one_epoch[1])


def test_a_nonfinite_loss_after_a_fallback_names_the_checkpoint_resumed_from(tmp_path, one_epoch, monkeypatch):
    root = copy_run(one_epoch[0], tmp_path)
    _zero_tensor_bytes(root / rundir.CHECKPOINTS / "step-000000010")  # complete, but it fails to load
    monkeypatch.setenv("VAE_DIST_TEST_NAN_AT", "9")
    with pytest.raises(TrainingError, match=r"step 9; the last good checkpoint .*step-000000008 is kept$"):
        _learner(root, epochs=1, resume=True).fit()


def test_no_usable_checkpoint_is_an_error_that_starts_nothing_over(tmp_path, one_epoch):
    root = copy_run(one_epoch[0], tmp_path)
    for folder in (root / rundir.CHECKPOINTS).iterdir():
        _zero_tensor_bytes(folder)
    metrics = (root / rundir.METRICS).read_text()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        _learner(root, epochs=2, resume=True).fit()
    assert (root / rundir.METRICS).read_text() == metrics


@pytest.fixture
def preempted(one_epoch, tmp_path) -> Path:
    """A run stopped mid-way through its first epoch: its newest checkpoint, step 8, has no history."""
    root = copy_run(one_epoch[0], tmp_path)
    shutil.rmtree(root / rundir.CHECKPOINTS / "step-000000010")
    (root / rundir.METRICS).unlink()
    return root


def _far_into_the_epoch(m) -> None:
    m["global_step"] = m["state"]["global_step"] = m["state"]["batches_done"] = 8 + 10 * 1_000_000


CANNOT_CONTINUE = {
    # Mid-epoch, batches_done counts batches of the writer's global batch.
    "written by two processes": (lambda m: m["state"].update(num_processes=2), TrainingError,
                                 r"step-000000008 with 1 process\(es\): it was written by 2"),
    "batches beyond the epoch": (_far_into_the_epoch, CheckpointError,
                                 r"step-010000008: it is 10000008 batches into an epoch of 10"),
    # The config it was trained under, not config.json (which can be edited), is the run's.
    "trained with another seed": (lambda m: m["state"]["config"].update(seed=7), ConfigError,
                                  r"^cannot resume: seed is 42 but step-000000008 was trained with 7$"),
}


@pytest.mark.parametrize("edit, error, match", CANNOT_CONTINUE.values(), ids=CANNOT_CONTINUE.keys())
def test_a_checkpoint_this_run_cannot_continue_is_refused(preempted, edit, error, match):
    folder = preempted / rundir.CHECKPOINTS / "step-000000008"
    _edit_manifest(folder, edit)
    step = json.loads((folder / MANIFEST).read_text())["global_step"]
    folder.rename(folder.with_name(f"step-{step:09d}"))  # a checkpoint is named after its manifest's step
    with pytest.raises(error, match=match):
        _learner(preempted, epochs=1, resume=True)
    assert not (preempted / rundir.METRICS).exists()


def test_max_steps_below_the_checkpoint_is_refused_before_writing(preempted):
    before = sorted(str(p) for p in preempted.rglob("*"))
    with pytest.raises(ConfigError, match=r"--max-steps 5 .*step 8"):
        _learner(preempted, epochs=1, max_steps=5, resume=True).fit()
    assert sorted(str(p) for p in preempted.rglob("*")) == before


def test_fewer_epochs_than_the_checkpoint_has_reached_are_refused_before_writing(tmp_path):
    _learner(tmp_path, epochs=2, max_steps=13, checkpoint_every_steps=6).fit()
    shutil.rmtree(tmp_path / rundir.CHECKPOINTS / "step-000000013")  # the newest: step 12, 2 batches into epoch 2
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"^--epochs 1 is below epoch 2, which step-000000012 has reached, 2 batches "
                                          r"into it; give at least 2$"):
        _learner(tmp_path, epochs=1, resume=True)
    assert snapshot(tmp_path) == before


def test_resume_at_an_epoch_end_with_another_process_count_ends_the_schedules_on_time(tmp_path):
    # Epoch 1 as 2 processes (5 steps), epoch 2 as 1 (10 steps): the warm-ups and the
    # cosine are functions of the epochs done, so the run ends as a 1-process one does, on
    # the rate of epoch 2's last step and the full KL weight (not 3 steps early, at 0.75).
    schedules = {"optimizer": {"learning_rate": 3e-3, "schedule": "cosine", "warmup_epochs": 0.5},
                 "loss": {"kl_warmup_epochs": 2.0}}
    _learner(tmp_path, epochs=2, max_steps=5, ranks=2, **schedules).fit()
    resumed = _learner(tmp_path, epochs=2, resume=True, **schedules)
    resumed.fit()
    last = resumed.position.history[-1]
    one_process_end = (learning_rate(resumed.config.optimizer, 1, 9, 10, 2), 1.0)
    assert (last["epoch"], last["step"], (last["train/lr"], last["train/kl_weight"])) == (2, 15, one_process_end)


def test_max_steps_at_the_checkpoint_ends_that_partial_epoch(preempted):
    learner = _learner(preempted, epochs=1, max_steps=8, resume=True)
    learner.fit()
    (row,) = learner.position.history
    assert (row["epoch"], row["step"], row["complete_epoch"]) == (1, 8, False)
    assert row["train/samples"] == 8 * 32  # the carried sums of the 8 steps done
    assert [json.loads(line)["step"] for line in (preempted / rundir.METRICS).read_text().splitlines()] == [8]
    # The next resume, with more steps, finishes the epoch from there.
    again = _learner(preempted, epochs=1, resume=True)
    again.fit()
    assert [(r["step"], r["complete_epoch"]) for r in again.position.history] == [(10, True)]


# ----------------------------------------------------------------------- the CLI, in process


@pytest.mark.slow
def test_resume_refuses_a_changed_field_and_touches_nothing(finished_run, tmp_path, capsys):
    art = copy_run(finished_run, tmp_path)
    before = snapshot(art)
    # --resume alone takes the run's own config.json; a flag that shapes the model may not change.
    line = one_error_line(main_in_process(["train", "--artifact-dir", str(art), "--resume", "--model", "conv"], capsys))
    assert "model.kind" in line and "resume" in line, line
    assert snapshot(art) == before


def _edit_seed(art: Path) -> list[str]:
    config = json.loads((art / rundir.CONFIG).read_text())
    (art / rundir.CONFIG).write_text(json.dumps({**config, "seed": 7}))
    return []


REFUSED_AT_THE_CHECKPOINT = {
    # name: (what is done to the run, the flags after --resume, the error's words)
    "max-steps below it": (lambda art: ["--max-steps", "5"], "--max-steps 5 is below step 20"),
    "config.json edited": (_edit_seed, "seed is 7 but step-000000020 was trained with 42"),
}


@pytest.mark.slow
@pytest.mark.parametrize("change, said", REFUSED_AT_THE_CHECKPOINT.values(), ids=REFUSED_AT_THE_CHECKPOINT.keys())
def test_a_resume_the_checkpoint_refuses_touches_nothing(change, said, finished_run, tmp_path, capsys):
    art = copy_run(finished_run, tmp_path)
    flags = change(art)
    before = snapshot(art)
    line = one_error_line(main_in_process(["train", "--artifact-dir", str(art), "--resume", *flags], capsys))
    assert said in line, line
    assert snapshot(art) == before  # config.json included: it is written only after the checkpoint's checks


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_resume_without_checkpoints_over_a_finished_run_is_refused(how, finished_run, tmp_path, capsys):
    art = copy_run(finished_run, tmp_path)
    shutil.rmtree(art / rundir.CHECKPOINTS)
    if how == "emptied":
        (art / rundir.CHECKPOINTS).mkdir()
    before = snapshot(art)
    line = one_error_line(main_in_process(["train", "--artifact-dir", str(art), "--resume"], capsys))
    assert "no checkpoint" in line, line
    assert snapshot(art) == before


# ----------------------------------------------------------------------- a real kill


def metrics(art: Path) -> list[dict]:
    return [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_dirs(art: Path) -> list[str]:
    return sorted(p.name for p in (art / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_run_killed_inside_a_checkpoint_write_resumes_bit_identical(finished_run, data_dir, tmp_path, capsys):
    """SIGKILL inside the 4th checkpoint write, the epoch-end one of step 20 (a step
    checkpoint that falls on an epoch end is left to it, not written twice). The torn write
    is ignored: the resume starts from step 15 and ends with the uninterrupted run's weights,
    records and kept checkpoints."""
    art = tmp_path / "run"
    args = small_train_args(data_dir, art, *FINISHED_RUN)
    killed = run_cli(args, env=cli_env(VAE_DIST_TEST_KILL_IN_CHECKPOINT="4"))
    assert killed.returncode == -signal.SIGKILL, f"exit {killed.returncode}\n{killed.stderr[-2000:]}"
    assert not (art / "model.safetensors").exists()
    assert [n for n in checkpoint_dirs(art) if n.startswith(TMP_PREFIX)]  # the torn write, beside the complete ones
    with one_thread():  # as the killed process and the finished run trained
        resumed = main_in_process([*args, "--resume"], capsys)
    check_ok(resumed)
    found = re.findall(r"resumed from (\S+): epoch (\d+), batch (\d+)/\d+, step (\d+)", output(resumed))
    assert found == [("step-000000015", "1", "15", "15")], output(resumed)[-3000:]
    a, b = (load_file(str(run / "model.safetensors")) for run in (art, finished_run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows, want = metrics(art), metrics(finished_run)
    assert [r["train/samples"] for r in rows] == [640]  # a re-taken step would add 32, a skipped one remove 32
    assert [{k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k} for r in rows] == [
        {k: v for k, v in r.items() if "seconds" not in k and "per_second" not in k} for r in want]
    newest = read_manifest(art / "checkpoints" / "step-000000020")
    assert (newest.state.global_step, newest.state.epoch, newest.state.batches_done) == (20, 1, 0)
    assert checkpoint_dirs(art) == checkpoint_dirs(finished_run)  # rotation holds across a resume, no torn write left
