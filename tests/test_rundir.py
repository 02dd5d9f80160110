"""The run folder (vae_dist.run.folder, vae_dist.run.fileio): vae_dist takes a folder only
when it is empty or its own; --overwrite renames the previous run, whole, to a sibling and
deletes nothing; a run id read from disk never names a path; one training at a time; no
write through a link; each file written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, check_ok, cli_env, copy_run, main_in_process, one_error_line, small_train_args
from vae_dist.config import TrainingConfig
from vae_dist.errors import ArtifactError
from vae_dist.run.checkpoint import MANIFEST
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
    RunLock,
    marker_run_id,
    prepare_artifact_dir,
    previous_run_folder,
    read_metrics,
    write_metrics,
    write_run_file,
)

PREV, NEW = "0000aaaa", "0000bbbb"  # run ids
CRAFTED = "/../../../x"  # a marker's run id that, joined into a path, leaves the folder


def snapshot(root: Path, *, lock: bool = True) -> dict[str, bytes | None]:
    """Every path under root (links not followed) with its bytes (None for folders and
    links); without the lock file if not ``lock`` (every training that takes it writes its pid there)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*")) if lock or p.name != LOCK
    }


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _previous_run(root: Path) -> None:
    prepare_artifact_dir(root, overwrite=False, resume=False, run_id=PREV)
    write_run_file(root / CONFIG, TrainingConfig().to_json().encode())
    write_metrics(root, [{"epoch": 1, "step": 10}])
    (root / MODEL).write_bytes(b"weights")
    (root / CHECKPOINTS / "step-000000010").mkdir(parents=True)
    (root / CHECKPOINTS / "step-000000010" / MANIFEST).write_text(json.dumps({"global_step": 10, "run_id": PREV}))
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
        prepare_artifact_dir(root, overwrite=False, resume=False, run_id=PREV)
    assert prepare_artifact_dir(root, overwrite=False, resume=False, run_id=NEW) == root
    assert json.loads((root / MARKER).read_text()) == {"created_by": "vae_dist", "run_id": NEW}
    assert sorted(p.name for p in root.iterdir()) == [MARKER]  # no probe or temp file left


def test_previous_run_refused_without_flags_and_kept_with_resume(tmp_path):
    root = tmp_path / "run"
    _previous_run(root)
    before = snapshot(root)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(root, overwrite=False, resume=False, run_id=NEW)
    assert "--resume" in one_line(e) and "--overwrite" in one_line(e)
    assert snapshot(root) == before
    prepare_artifact_dir(root, overwrite=False, resume=True)
    assert snapshot(root) == before
    assert marker_run_id(root) == PREV  # --resume keeps the marker, and so the run's id


def test_foreign_folder_refused_even_with_overwrite(tmp_path):
    root = tmp_path / "foreign"
    root.mkdir()
    (root / "thesis.tex").write_text("important")
    (root / CONFIG).write_text('{"mine": true}')  # a name vae_dist writes, in a folder not its own
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(ArtifactError) as e:
            prepare_artifact_dir(root, overwrite=overwrite, resume=False, run_id=NEW)
        assert "not created by vae_dist" in one_line(e)
        assert snapshot(tmp_path) == before  # nothing renamed either


def test_a_file_or_an_unwritable_place_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        prepare_artifact_dir(f, overwrite=False, resume=False, run_id=NEW)
    assert f.read_text() == "x"
    # mkdir under a file fails for any user (as root, a read-only folder does not).
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(f / "run", overwrite=False, resume=False, run_id=NEW)
    assert "not writable" in one_line(e)


def test_resume_and_overwrite_need_what_they_act_on(tmp_path):
    root = tmp_path / "run"
    with pytest.raises(ArtifactError, match="no previous run"):
        prepare_artifact_dir(root, overwrite=False, resume=True)
    _previous_run(root)
    before = snapshot(tmp_path)
    with pytest.raises(ArtifactError, match="together"):
        prepare_artifact_dir(root, overwrite=True, resume=True)
    assert snapshot(tmp_path) == before


# --- --overwrite: one rename ---------------------------------------------------------------


def test_overwrite_renames_the_previous_run_whole_and_starts_empty(tmp_path, capsys):
    root = tmp_path / "run"
    _previous_run(root)
    (root / "notes.txt").write_text("my notes")  # everything inside is the run's: it goes along
    (root / CHECKPOINTS / "my-backup").mkdir()
    (root / "wandb" / "offline-run-20261202_120000-0000aaaa").mkdir(parents=True)
    before = snapshot(root)
    lock = RunLock()
    prepare_artifact_dir(root, overwrite=True, resume=False, lock=lock, run_id=NEW)
    aside = tmp_path / f"run.previous-{PREV}"
    assert capsys.readouterr().out.strip().splitlines() == [
        f"--overwrite: the previous run is now {aside} (vae_dist never deletes it)"]
    # The lock file aside (it held its holder's pid): the same bytes at the same paths.
    assert snapshot(aside, lock=False) == {k: v for k, v in before.items() if k != LOCK}
    assert sorted(os.listdir(root)) == [MARKER, LOCK] and marker_run_id(root) == NEW
    assert sorted(os.listdir(tmp_path)) == ["run", aside.name]
    # The new folder is locked, the old one free: a second training is refused.
    with pytest.raises(ArtifactError, match="in use by another vae_dist run"):
        prepare_artifact_dir(root, overwrite=False, resume=False, lock=RunLock(), run_id=NEW)
    lock.release()
    free = RunLock()
    free.acquire(aside)
    free.release()


def test_the_sibling_is_named_after_the_folder_even_when_given_as_dot(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert previous_run_folder(Path("."), PREV) == tmp_path / f"run.previous-{PREV}"


def _rename_fails(root: Path, tmp_path: Path, monkeypatch) -> None:
    def busy(src, dst):
        raise OSError(16, "Device or resource busy")  # a mount point, a bind mount

    monkeypatch.setattr(os, "rename", busy)


CANNOT_RENAME = {
    "the sibling exists (a file)": lambda root, tmp_path, mp: (tmp_path / f"run.previous-{PREV}").write_text("x"),
    "the sibling exists (a folder)": lambda root, tmp_path, mp: (tmp_path / f"run.previous-{PREV}").mkdir(),
    "the parent is read-only": lambda root, tmp_path, mp: os.chmod(tmp_path, 0o555),
    "the rename fails (EBUSY)": _rename_fails,
    "the current directory is in it": lambda root, tmp_path, mp: mp.chdir(root / IMAGES),
}


@pytest.mark.parametrize("make", CANNOT_RENAME.values(), ids=CANNOT_RENAME.keys())
def test_an_overwrite_that_cannot_rename_is_one_line_and_changes_nothing(make, tmp_path, monkeypatch):
    if make is CANNOT_RENAME["the parent is read-only"] and os.geteuid() == 0:
        pytest.skip("root ignores a folder's permissions")
    root = tmp_path / "run"
    _previous_run(root)
    make(root, tmp_path, monkeypatch)
    before = snapshot(tmp_path, lock=False)
    try:
        with pytest.raises(ArtifactError) as e:
            prepare_artifact_dir(root, overwrite=True, resume=False, lock=RunLock(), run_id=NEW)
    finally:
        os.chmod(tmp_path, 0o755)
    assert one_line(e).startswith(f"--overwrite cannot move the previous run {root}")
    # The lock file aside: a rename that fails only once the folder is locked leaves its pid there.
    assert snapshot(tmp_path, lock=False) == before


def test_an_overwrite_of_a_run_still_going_is_refused_and_moves_nothing(tmp_path):
    root = tmp_path / "run"
    _previous_run(root)
    holder = RunLock()  # as the training still running in the folder holds it
    holder.acquire(root)
    before = snapshot(tmp_path)
    try:
        with pytest.raises(ArtifactError) as e:
            prepare_artifact_dir(root, overwrite=True, resume=False, lock=RunLock(), run_id=NEW)
    finally:
        holder.release()
    assert f"in use by another vae_dist run (pid {os.getpid()})" in one_line(e)
    assert snapshot(tmp_path) == before


def _new_run(finished_run: Path, tmp_path: Path) -> tuple[Path, dict, Path]:
    run = copy_run(finished_run, tmp_path)
    (run / "notes.txt").write_text("mine")
    shutil.copytree(run / CHECKPOINTS / sorted(os.listdir(run / CHECKPOINTS))[-1], run / CHECKPOINTS / "my-backup")
    return run, snapshot(run, lock=False), previous_run_folder(run, marker_run_id(run))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["finishes", "fails at step 1"])
def test_overwrite_keeps_the_previous_run_byte_identical_beside_the_new_one(
    how, finished_run, data_dir, tmp_path, capsys, monkeypatch
):
    run, before, aside = _new_run(finished_run, tmp_path)
    args = [*small_train_args(data_dir, run, "--model", "mlp", "--limit-train-samples", "320"), "--overwrite"]
    if how == "finishes":
        ran = main_in_process(args, capsys)
        check_ok(ran)
        assert f"the previous run is now {aside}" in ran.stdout
    else:
        monkeypatch.setenv(FAIL_HOOK_ENV, "0:0")
        with pytest.raises(RuntimeError, match="test fault"):
            main_in_process(args, capsys)
    assert snapshot(aside, lock=False) == before
    # The new folder holds the new run only: its marker, and checkpoints of its id.
    new_id = marker_run_id(run)
    assert new_id != marker_run_id(aside)
    assert not (run / "notes.txt").exists() and not (run / CHECKPOINTS / "my-backup").exists()
    manifests = [json.loads((p / MANIFEST).read_text()) for p in (run / CHECKPOINTS).glob("step-*")]
    assert {m["run_id"] for m in manifests} == ({new_id} if how == "finishes" else set())
    assert (run / MODEL).exists() == (how == "finishes")


@pytest.mark.slow
def test_overwrite_with_a_value_that_fails_moves_nothing(finished_run, data_dir, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(tmp_path)
    args = small_train_args(data_dir, run, "--model", "mlp", "--limit-train-samples", "100", "--batch-size", "128")
    assert "smaller than one global batch" in one_error_line(main_in_process([*args, "--overwrite"], capsys))
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_an_overwrite_the_cli_cannot_rename_is_one_error_line(finished_run, data_dir, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    previous_run_folder(run, marker_run_id(run)).write_text("a file of the sibling's name")
    before = snapshot(tmp_path)
    line = one_error_line(main_in_process([*small_train_args(data_dir, run, "--model", "mlp"), "--overwrite"], capsys))
    assert "already exists" in line and "nothing was changed" in line
    assert snapshot(tmp_path) == before


# --- a run id read from disk ---------------------------------------------------------------


@pytest.mark.parametrize("run_id", [CRAFTED, "", "0000AAAA", "0000aaaa\n", 12345678, None])
@pytest.mark.parametrize("flags", ["resume", "overwrite", "none"])
def test_a_marker_without_a_valid_run_id_is_refused_naming_it(run_id, flags, tmp_path):
    root = tmp_path / "deep" / "er" / "run"
    _previous_run(root)
    (root / MARKER).write_text(json.dumps({"created_by": "vae_dist", "run_id": run_id}))
    _outside(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(root, overwrite=flags == "overwrite", resume=flags == "resume", lock=RunLock(), run_id=NEW)
    assert one_line(e) == f"{root / MARKER} does not hold a valid run id (8 hex digits); nothing was touched"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("make, why", [
    (lambda p: p.write_text("[" * 100_000), ""),  # nested deeper than the JSON parser goes
    (lambda p: p.write_text(" " * (2 << 20) + "{}"), "larger than 1,048,576 bytes"),
    (os.mkfifo, "not a regular file"),  # open() would wait for a writer for ever
])
def test_a_marker_that_is_not_a_record_is_one_line_at_once(make, why, tmp_path):
    make(tmp_path / MARKER)
    outcome: list[BaseException] = []  # read in a thread, so that a hang fails the test
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(ArtifactError, marker_run_id, tmp_path).value),
                              daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert outcome and str(outcome[0]).startswith(f"{tmp_path / MARKER} cannot be read")
    assert str(outcome[0]).endswith(why)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_a_crafted_run_id_in_the_marker_is_one_line_and_touches_nothing(flag, finished_run, data_dir, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / MARKER).write_text(json.dumps({"created_by": "vae_dist", "run_id": CRAFTED}))
    _outside(tmp_path)
    before = snapshot(tmp_path)
    line = one_error_line(main_in_process([*small_train_args(data_dir, run, "--model", "mlp"), flag], capsys))
    assert str(run / MARKER) in line and "valid run id" in line, line
    assert snapshot(tmp_path) == before


# --- links ---------------------------------------------------------------------------------

# (entry, is the link to a folder): every path a training writes in a folder it keeps.
LINKS = [
    (CONFIG, False),
    (METRICS, False),
    (MODEL, False),
    (MARKER, False),
    (LOCK, False),
    (IMAGES, True),
    (CHECKPOINTS, True),
    ("checkpoints/.tmp-step-000000005-0000aaaa", True),
    ("checkpoints/step-000000005", True),
    ("images/epoch-001-samples.png", False),
]


@pytest.mark.parametrize(("entry", "folder"), LINKS, ids=[e for e, _ in LINKS])
def test_symlink_where_vae_dist_writes_is_refused(entry: str, folder: bool, tmp_path: Path) -> None:
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
        prepare_artifact_dir(root, overwrite=False, resume=True, lock=RunLock())
    assert "symbolic link" in one_line(e)
    assert snapshot(outside) == before_outside
    assert snapshot(root) == before_root


def test_a_link_in_a_previous_run_moves_with_it_on_overwrite(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "run"
    _previous_run(root)
    (root / MODEL).unlink()
    (root / MODEL).symlink_to(outside / "precious.txt")
    prepare_artifact_dir(root, overwrite=True, resume=False, run_id=NEW)
    assert (tmp_path / f"run.previous-{PREV}" / MODEL).is_symlink()
    assert snapshot(outside) == {"precious.txt": b"keep me"}


def test_artifact_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()  # an empty folder, which would otherwise be taken over
    link = tmp_path / "run"
    link.symlink_to(outside, target_is_directory=True)
    for overwrite in (False, True):
        with pytest.raises(ArtifactError) as e:
            prepare_artifact_dir(link, overwrite=overwrite, resume=False, run_id=NEW)
        assert "symbolic link" in one_line(e)
    assert list(outside.iterdir()) == [] and link.is_symlink()


def test_write_probe_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    root = tmp_path / "run"
    _previous_run(root)
    (root / ".write-test").symlink_to(outside / "precious.txt")
    prepare_artifact_dir(root, overwrite=False, resume=True)
    assert (outside / "precious.txt").read_text() == "keep me"
    assert (root / ".write-test").is_symlink()  # neither followed nor deleted


# --- one training at a time ----------------------------------------------------------------


def test_lock_names_its_holder_and_is_released_when_the_holder_ends(tmp_path: Path) -> None:
    root = tmp_path / "run"
    holder = RunLock()
    prepare_artifact_dir(root, overwrite=False, resume=False, lock=holder, run_id=NEW)
    with pytest.raises(ArtifactError) as e:
        prepare_artifact_dir(root, overwrite=False, resume=False, lock=RunLock(), run_id=NEW)
    assert f"in use by another vae_dist run (pid {os.getpid()})" in one_line(e)
    holder.release()
    again = RunLock()
    prepare_artifact_dir(root, overwrite=False, resume=False, lock=again, run_id=NEW)
    again.release()


@pytest.mark.slow
def test_a_training_over_a_locked_folder_is_refused_before_moving_it(finished_run, data_dir, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    holder = RunLock()  # as a training still running in that folder holds it
    holder.acquire(run)
    before = snapshot(tmp_path)
    try:
        line = one_error_line(main_in_process([*small_train_args(data_dir, run, "--model", "mlp"), "--overwrite"], capsys))
    finally:
        holder.release()
    assert f"in use by another vae_dist run (pid {os.getpid()})" in line
    assert snapshot(tmp_path) == before


def test_a_forked_child_does_not_hold_the_lock_after_its_parent(tmp_path: Path) -> None:
    holder = RunLock()
    holder.acquire(tmp_path)
    (stay, go), (started, running) = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # as a loader worker: it outlives a killed trainer for seconds
        os.close(go)
        os.write(running, b"1")
        os.read(stay, 1)
        os._exit(0)
    try:
        os.read(started, 1)  # the child runs
        holder.release()  # as the kernel does for a killed trainer
        again = RunLock()
        again.acquire(tmp_path)  # while the child still lives
        again.release()
    finally:
        os.close(go)
        os.waitpid(pid, 0)
        for fd in (stay, started, running):
            os.close(fd)


@pytest.mark.slow  # a real training, killed with its loader workers alive
def test_a_killed_training_frees_its_folder_at_once(data_dir, tmp_path):
    import psutil

    art = tmp_path / "run"
    args = [sys.executable, "-m", "vae_dist", *small_train_args(data_dir, art, "--num-workers", "2", "--epochs", "50")]
    trainer = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(psutil.Process(trainer.pid).children()) < 2:  # its workers: the training runs
            assert trainer.poll() is None and time.monotonic() < deadline, "no loader workers started"
            time.sleep(0.1)
        time.sleep(0.5)  # a moment for them to run their at-fork handlers (microseconds)
        workers = psutil.Process(trainer.pid).children()
    finally:
        trainer.kill()
        trainer.wait()
    assert any(w.is_running() for w in workers)  # orphaned, they notice their parent's death later
    lock = RunLock()
    lock.acquire(art)
    lock.release()


# --- the small files -----------------------------------------------------------------------


def test_metrics_are_rewritten_whole(tmp_path):
    assert read_metrics(tmp_path) == []
    rows = [{"epoch": 1, "step": 15, "valid/loss": 190.25}, {"epoch": 2, "step": 30, "valid/loss": 140.125}]
    write_metrics(tmp_path, rows)
    assert read_metrics(tmp_path) == rows
    # Rewriting replaces (a resume from an older checkpoint does not duplicate epochs).
    write_metrics(tmp_path, rows[:1])
    assert read_metrics(tmp_path) == rows[:1]


def test_a_diverged_metric_is_written_as_json_null(tmp_path):
    write_metrics(tmp_path, [{"epoch": 1, "valid/loss": float("nan"), "valid/kl": float("inf"), "valid/recon": 1.5}])
    row = json.loads((tmp_path / METRICS).read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert row == {"epoch": 1, "valid/loss": None, "valid/kl": None, "valid/recon": 1.5}


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
