"""The run folder (vae_dist.rundir, vae_dist.fileio): vae_dist takes a folder only when it
is empty or its own, clears only its own entries, never writes or deletes through a link,
lets one training at a time use it, and writes each file whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import check_ok, cli_env, copy_run, main_in_process, one_error_line, run_cli, small_train_args
from vae_dist.config import TrainingConfig
from vae_dist.errors import ArtifactError
from vae_dist.training.trainer import undo_unfinished_overwrite
from vae_dist.run.fileio import atomic_write
from vae_dist.training.faults import FAIL_HOOK_ENV
from vae_dist.run.folder import (
    CHECKPOINTS,
    CONFIG,
    IMAGES,
    LOCK,
    MARKER,
    METRICS,
    MODEL,
    PREVIOUS,
    TENSORBOARD,
    RunLock,
    discard_previous,
    marker_run_id,
    prepare_artifact_dir,
    read_metrics,
    restore_previous,
    write_config,
    write_metrics,
)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (links not followed) with its bytes (None for folders and links)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*"))
    }


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _checkpoint(folder: Path, step: int, run_id: str) -> None:
    """As much of a checkpoint as tells whose it is: its manifest's step and run id."""
    folder.mkdir(parents=True)
    (folder / "MANIFEST.json").write_text(json.dumps({"global_step": step, "run_id": run_id}))


def _previous_run(root: Path) -> None:
    prepare_artifact_dir(root, overwrite=False, resume=False, run_id="prev")
    write_config(root, TrainingConfig())
    write_metrics(root, [{"epoch": 1, "step": 10}])
    (root / MODEL).write_bytes(b"weights")
    _checkpoint(root / CHECKPOINTS / "step-000000010", 10, "prev")
    (root / IMAGES).mkdir()
    (root / IMAGES / "epoch-001-samples.png").write_bytes(b"png")


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return out


# --- which folders are taken ---------------------------------------------------------------


@pytest.mark.parametrize("state", ["missing", "empty", "marker-only"])
def test_an_empty_or_unused_folder_is_taken_and_marked(tmp_path, state):
    root = tmp_path / "a" / "b"
    if state == "empty":
        root.mkdir(parents=True)
    elif state == "marker-only":  # a run that failed before writing anything
        prepare_artifact_dir(root, overwrite=False, resume=False)
    assert prepare_artifact_dir(root, overwrite=False, resume=False) == root
    assert json.loads((root / MARKER).read_text())["created_by"] == "vae_dist"
    assert sorted(p.name for p in root.iterdir()) == [MARKER]  # no probe or temp file left


def test_previous_run_refused_without_flags_and_kept_with_resume(tmp_path):
    root = tmp_path / "run"
    _previous_run(root)
    before = snapshot(root)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(root, overwrite=False, resume=False)
    assert "--resume" in one_line(e) and "--overwrite" in one_line(e)
    assert snapshot(root) == before
    prepare_artifact_dir(root, overwrite=False, resume=True)
    assert snapshot(root) == before


def test_overwrite_removes_only_own_entries(tmp_path):
    root = tmp_path / "run"
    _previous_run(root)
    (root / "notes.txt").write_text("my notes")
    (root / "mine").mkdir()
    (root / "mine" / "keep.bin").write_bytes(b"\x00\x01")
    (root / IMAGES / "my_notes.txt").write_text("mine")  # a user's file inside an owned folder
    (root / CHECKPOINTS / "my_backup").mkdir()
    (root / CHECKPOINTS / "my_backup" / "f").write_text("k")
    prepare_artifact_dir(root, overwrite=True, resume=False, run_id="new")
    discard_previous(root)  # what the new run's first checkpoint does
    assert json.loads((root / MARKER).read_text()) == {"created_by": "vae_dist", "run_id": "new"}
    assert {k: v for k, v in snapshot(root).items() if k != MARKER} == {
        "notes.txt": b"my notes", "mine": None, "mine/keep.bin": b"\x00\x01",
        IMAGES: None, f"{IMAGES}/my_notes.txt": b"mine",
        CHECKPOINTS: None, f"{CHECKPOINTS}/my_backup": None, f"{CHECKPOINTS}/my_backup/f": b"k",
    }


def test_overwrite_deletes_by_the_previous_runs_record_not_by_name(tmp_path):
    root = tmp_path / "run"
    _previous_run(root)
    ck, wandb = root / CHECKPOINTS, root / "wandb"
    _checkpoint(ck / "step-000000010-replaced", 10, "prev")  # a kill between a save's two renames
    (ck / ".tmp-step-000000012-prev").mkdir()  # an interrupted save
    _checkpoint(ck / "step-000000020", 20, "someone")  # not the previous run's
    (ck / ".tmp-step-000000030").mkdir()
    _checkpoint(ck / "step-000000011", 10, "prev")  # a copy under another step's name
    for run in ("run-20261202_120000-prev", "offline-run-20261202_120100-prev", "run-20261202_120000-someone"):
        (wandb / run / "files").mkdir(parents=True)
    (wandb / "latest-run").symlink_to("run-20261202_120000-prev")
    (wandb / "run-notes.txt").write_text("mine")
    tb = root / TENSORBOARD
    tb.mkdir()
    for name in ("events.out.tfevents.1796231812.vm.2969.0.prev", "events.out.tfevents.1796231812.vm.2969.1.someone",
                 "events.out.tfevents.1796231812.vm.2969.2.prev.mine"):
        (tb / name).write_bytes(b"x")
    prepare_artifact_dir(root, overwrite=True, resume=False, run_id="new")
    discard_previous(root)
    assert sorted(p.name for p in ck.iterdir()) == [".tmp-step-000000030", "step-000000011", "step-000000020"]
    assert sorted(p.name for p in wandb.iterdir()) == ["run-20261202_120000-someone", "run-notes.txt"]
    assert sorted(p.name for p in tb.iterdir()) == ["events.out.tfevents.1796231812.vm.2969.1.someone",
                                                    "events.out.tfevents.1796231812.vm.2969.2.prev.mine"]


def test_resume_keeps_the_marker_and_its_run_id(tmp_path):
    root = tmp_path / "run"
    _previous_run(root)
    prepare_artifact_dir(root, overwrite=False, resume=True, run_id="new")
    assert marker_run_id(root) == "prev"


@pytest.mark.parametrize("name, make", [
    (MODEL, lambda p: p.mkdir()),  # a folder where vae_dist writes a file
    (IMAGES, lambda p: p.write_text("x")),  # a file where vae_dist makes a folder
    (CONFIG, lambda p: os.mkfifo(p)),
])
def test_overwrite_refuses_an_entry_of_the_wrong_kind_before_deleting_anything(tmp_path, name, make):
    root = tmp_path / "run"
    _previous_run(root)
    target = root / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    make(target)
    before = sorted(p.name for p in root.rglob("*"))
    with pytest.raises(ArtifactError, match="not what vae_dist writes"):
        prepare_artifact_dir(root, overwrite=True, resume=False)
    assert sorted(p.name for p in root.rglob("*")) == before


def test_foreign_folder_refused_even_with_overwrite(tmp_path):
    root = tmp_path / "foreign"
    root.mkdir()
    (root / "thesis.tex").write_text("important")
    # Names vae_dist would write, but the folder is not ours: they must survive too.
    (root / CONFIG).write_text('{"mine": true}')
    (root / CHECKPOINTS).mkdir()
    (root / CHECKPOINTS / "x.pt").write_bytes(b"\x00" * 64)
    before = snapshot(root)
    for overwrite in (False, True):
        with pytest.raises(ArtifactError) as e:
            prepare_artifact_dir(root, overwrite=overwrite, resume=False)
        assert "not created by vae_dist" in one_line(e)
        assert snapshot(root) == before


def test_a_file_or_an_unwritable_place_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        prepare_artifact_dir(f, overwrite=False, resume=False)
    assert f.read_text() == "x"
    # mkdir under a file fails for any user (as root, a read-only folder does not).
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(f / "run", overwrite=False, resume=False)
    assert "not writable" in one_line(e)


def test_resume_and_overwrite_need_what_they_act_on(tmp_path):
    root = tmp_path / "run"
    with pytest.raises(ArtifactError, match="no previous run"):
        prepare_artifact_dir(root, overwrite=False, resume=True)
    _previous_run(root)
    before = snapshot(root)
    with pytest.raises(ArtifactError, match="together"):
        prepare_artifact_dir(root, overwrite=True, resume=True)
    assert snapshot(root) == before


def _new_run_wrote(root: Path) -> None:
    """What a new run writes before its first checkpoint (and an unfinished save)."""
    write_config(root, TrainingConfig(seed=7))
    (root / IMAGES).mkdir(exist_ok=True)
    (root / IMAGES / "epoch-001-samples.png").write_bytes(b"new png")
    (root / CHECKPOINTS).mkdir(exist_ok=True)
    (root / CHECKPOINTS / ".tmp-step-000000003-new").mkdir()


def test_overwrite_sets_the_previous_run_aside_until_the_first_checkpoint_and_puts_it_back(tmp_path):
    root = tmp_path / "run"
    _previous_run(root)
    (root / "notes.txt").write_text("my notes")
    before = snapshot(root)
    prepare_artifact_dir(root, overwrite=True, resume=False, run_id="new")
    assert not (root / MODEL).exists() and (root / PREVIOUS / MODEL).read_bytes() == b"weights"
    _new_run_wrote(root)
    assert restore_previous(root)  # the new run failed before its first checkpoint
    assert snapshot(root) == before
    # Once the new run has a checkpoint, the set-aside run is discarded, never restored over it.
    prepare_artifact_dir(root, overwrite=True, resume=False, run_id="new")
    _checkpoint(root / CHECKPOINTS / "step-000000005", 5, "new")
    assert not restore_previous(root) and not (root / PREVIOUS).exists()
    assert (root / CHECKPOINTS / "step-000000005").is_dir() and not (root / MODEL).exists()


def test_a_kill_half_way_through_setting_aside_is_undone_by_the_next_training(tmp_path):
    root = tmp_path / "run"
    _previous_run(root)
    before = snapshot(root)
    # As a kill leaves it: the marker copied, the model moved, the rest not yet.
    (root / PREVIOUS).mkdir()
    shutil.copy2(root / MARKER, root / PREVIOUS / MARKER)
    os.replace(root / MODEL, root / PREVIOUS / MODEL)
    undo_unfinished_overwrite(root, RunLock())
    assert {k: v for k, v in snapshot(root).items() if k != LOCK} == before


@pytest.mark.slow
@pytest.mark.parametrize("how", ["fails", "killed"])
def test_an_overwrite_whose_new_run_ends_before_its_first_checkpoint_keeps_the_previous_run(
    how, finished_run, data_dir, tmp_path, capsys, monkeypatch
):
    run = copy_run(finished_run, tmp_path)
    before = {k: v for k, v in snapshot(run).items() if k != LOCK}  # the lock holds its holder's pid
    args = [*small_train_args(data_dir, run, "--model", "mlp"), "--overwrite"]
    if how == "killed":  # at step 2, in a process of its own; the next training puts the run back
        assert run_cli(args, env=cli_env(**{FAIL_HOOK_ENV: "0:2:kill"})).returncode == -9
        assert (run / PREVIOUS).is_dir()
        undo_unfinished_overwrite(run, RunLock())
    else:
        monkeypatch.setenv(FAIL_HOOK_ENV, "0:2")
        with pytest.raises(RuntimeError, match="test fault"):
            main_in_process(args, capsys)
    assert {k: v for k, v in snapshot(run).items() if k != LOCK} == before


@pytest.mark.slow
def test_overwrite_with_a_value_that_fails_keeps_the_previous_run(finished_run, data_dir, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    args = small_train_args(data_dir, run, "--model", "mlp", "--limit-train-samples", "100", "--batch-size", "128")
    assert "smaller than one global batch" in one_error_line(main_in_process([*args, "--overwrite"], capsys))
    assert snapshot(run) == before


# --- links ---------------------------------------------------------------------------------

# (entry, is the link to a folder, the flags): every path vae_dist writes or deletes.
LINKS = [
    (CONFIG, False, "overwrite"),
    (METRICS, False, "resume"),
    (MODEL, False, "overwrite"),
    (MARKER, False, "resume"),
    (LOCK, False, "overwrite"),
    (IMAGES, True, "resume"),
    (CHECKPOINTS, True, "resume"),
    ("checkpoints/.tmp-step-000000005", True, "resume"),
    ("checkpoints/step-000000005", True, "overwrite"),
    ("images/epoch-001-samples.png", False, "resume"),
]


@pytest.mark.parametrize(("entry", "folder", "flags"), LINKS, ids=[e for e, _, _ in LINKS])
def test_symlink_where_vae_dist_writes_is_refused(entry: str, folder: bool, flags: str, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "run"
    _previous_run(root)
    link = root / entry
    if link.exists():
        shutil.rmtree(link) if link.is_dir() else link.unlink()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside if folder else outside / "precious.txt")
    before_outside, before_root = snapshot(outside), snapshot(root)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(root, overwrite=flags == "overwrite", resume=flags == "resume")
    assert "symbolic link" in one_line(e)
    assert snapshot(outside) == before_outside
    assert snapshot(root) == before_root


def test_artifact_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()  # an empty folder, which would otherwise be taken over
    link = tmp_path / "run"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(link, overwrite=False, resume=False)
    assert "symbolic link" in one_line(e)
    assert list(outside.iterdir()) == []


def test_write_probe_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "run"
    _previous_run(root)
    (root / ".write-test").symlink_to(outside / "precious.txt")
    prepare_artifact_dir(root, overwrite=True, resume=False)
    assert (outside / "precious.txt").read_text() == "keep me"
    assert (root / ".write-test").is_symlink()  # not ours: neither followed nor deleted


# --- one training at a time ----------------------------------------------------------------


def test_lock_names_its_holder_and_is_released_when_the_holder_ends(tmp_path: Path) -> None:
    root = tmp_path / "run"
    holder = RunLock()
    prepare_artifact_dir(root, overwrite=False, resume=False, lock=holder)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(root, overwrite=False, resume=False, lock=RunLock())
    assert f"in use by another vae_dist run (pid {os.getpid()})" in one_line(e)
    holder.release()
    again = RunLock()
    prepare_artifact_dir(root, overwrite=False, resume=False, lock=again)
    again.release()


@pytest.mark.slow
def test_a_training_over_a_locked_folder_is_refused_before_clearing_it(finished_run, data_dir, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    holder = RunLock()  # as a training still running in that folder holds it
    holder.acquire(run)
    before = snapshot(run)
    try:
        line = one_error_line(main_in_process([*small_train_args(data_dir, run, "--model", "mlp"), "--overwrite"], capsys))
    finally:
        holder.release()
    assert f"in use by another vae_dist run (pid {os.getpid()})" in line
    assert snapshot(run) == before


# --- the small files -----------------------------------------------------------------------


def test_metrics_are_rewritten_whole(tmp_path):
    assert read_metrics(tmp_path) == []
    rows = [{"epoch": 1, "step": 15, "valid/loss": 190.25}, {"epoch": 2, "step": 30, "valid/loss": 140.125}]
    write_metrics(tmp_path, rows)
    assert read_metrics(tmp_path) == rows
    # Rewriting replaces (a resume from an older checkpoint does not duplicate epochs).
    write_metrics(tmp_path, rows[:1])
    assert read_metrics(tmp_path) == rows[:1]


def test_atomic_write_leaves_the_old_file_or_the_new_one_and_no_debris(tmp_path):
    target = tmp_path / "f"
    atomic_write(target, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_write_never_replaces_a_fifo(tmp_path):
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(fifo, lambda f: f.write(b"x"))
    assert fifo.exists() and not fifo.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp file left
