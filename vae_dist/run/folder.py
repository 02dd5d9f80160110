"""The run folder: its marker, its lock, its small files and --overwrite's rename. Everything in it is the run's own;
vae_dist never deletes a run (--overwrite moves the previous one, whole, beside it, for the user to delete)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from vae_dist.config import CONFIG_FILE
from vae_dist.errors import ArtifactError
from vae_dist.run.fileio import atomic_write, checking, dumps, loads_record, print_out, read_record

MARKER = ".vae_dist"  # proves the folder is vae_dist's, and holds the run's id
# Held (flock) by a training's main process; never deleted: two processes could then lock two files of one name.
LOCK = ".vae_dist.lock"
CONFIG, MODEL, METRICS, CHECKPOINTS = CONFIG_FILE, "model.safetensors", "metrics.jsonl", "checkpoints"
IMAGES, LOSS_CURVES, TENSORBOARD = "images", "loss_curves.png", "tensorboard"
# What a training writes at the folder's top level.
RUN_NAMES = (MARKER, LOCK, CONFIG, MODEL, METRICS, CHECKPOINTS, IMAGES, LOSS_CURVES, "wandb", TENSORBOARD)
# A run's id (new_run_id's shape): one read from disk is checked against it before it names a folder.
RUN_ID = r"[0-9a-f]{8}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


def is_run_id(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(RUN_ID, value) is not None


def previous_run_folder(root: Path, run_id: str) -> Path:
    root = Path(os.path.abspath(root))  # "." or "run/.." have no name of their own
    return root.parent / f"{root.name}.previous-{run_id}"


def write_run_file(path: Path, data: bytes) -> None:
    """Write one of the run's files atomically; an OSError (a full disk, a planted link) is one line."""
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None


def marker_run_id(root: Path) -> str:
    """The run id in the folder's marker; one line naming the marker if it holds none valid."""
    path = root / MARKER
    try:
        if path.is_symlink():
            raise ArtifactError(f"{path} is a symbolic link; vae_dist never reads or writes through a link")
        record = loads_record(read_record(path))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    run_id = record.get("run_id") if isinstance(record, dict) else None
    if not is_run_id(run_id):
        raise ArtifactError(f"{path} does not hold a valid run id (8 hex digits); nothing was touched")
    return run_id  # type: ignore[return-value]


def check_artifact_dir(path: str | Path, *, overwrite: bool, resume: bool) -> Path:
    """Everything prepare_artifact_dir refuses, checked without changing anything."""
    return _check(path, overwrite=overwrite, resume=resume)[0]


def _check(path: str | Path, *, overwrite: bool, resume: bool) -> tuple[Path, Optional[Path]]:
    """check_artifact_dir's checks; returns the folder and where --overwrite moves the previous run, if there is one."""
    root = Path(path).expanduser()
    if overwrite and resume:
        raise ArtifactError("--overwrite and --resume cannot be used together")
    with checking(root, ArtifactError, "artifact directory"):
        if root.is_symlink():
            raise ArtifactError(f"artifact directory {root} is a symbolic link; vae_dist never writes through a link")
        if root.exists() and not root.is_dir():
            raise ArtifactError(f"artifact directory {root} exists and is not a directory")
        # The lock file alone (a run killed before it marked the folder) is not foreign.
        entries = [p.name for p in root.iterdir() if p.name != LOCK] if root.is_dir() else []
        if entries and MARKER not in entries:
            raise ArtifactError(f"artifact directory {root} is not empty and was not created by vae_dist; "
                                "choose another --artifact-dir (nothing in it was touched)")
        run_id = marker_run_id(root) if entries else ""
        previous_run = len(entries) > 1
        if resume and not previous_run:
            raise ArtifactError(f"--resume given but {root} holds no previous run")
        if previous_run and not (resume or overwrite):
            raise ArtifactError(f"artifact directory {root} holds a previous vae_dist run; "
                                "pass --resume to continue it or --overwrite to start again")
        if previous_run and overwrite:  # the folder moves whole, links included; the new run's is empty
            aside, real = previous_run_folder(root, run_id), os.path.realpath(root)
            parent, cwd = os.path.dirname(real), os.getcwd()
            # The current directory moves with the folder: relative paths would then write into the old run.
            why = ("it is a mount point" if os.path.ismount(root)
                   else "it holds the current directory: run from elsewhere" if os.path.commonpath([cwd, real]) == real
                   else f"{aside} already exists" if os.path.lexists(aside)  # a rename would replace an empty one
                   else f"{parent} is not writable" if not os.access(parent, os.W_OK | os.X_OK) else "")
            if why:
                raise ArtifactError(
                    f"--overwrite cannot move the previous run {root} aside: {why}; nothing was changed")
            return root, aside
        # A link where a training writes: a write through it would land outside the folder.
        links = [p for name in RUN_NAMES if (p := root / name).is_symlink()] or [
            p for sub in (root / CHECKPOINTS, root / IMAGES) if sub.is_dir() for p in sub.iterdir() if p.is_symlink()]
        if links:
            raise ArtifactError(f"artifact directory {root} holds a symbolic link where vae_dist writes ({links[0]}); "
                                "vae_dist never writes through a link: remove it or choose another --artifact-dir")
    return root, None


def prepare_artifact_dir(path: str | Path, *, overwrite: bool, resume: bool, lock: Optional[RunLock] = None,
                         run_id: str = "") -> Path:
    """Main process: check the folder (check_artifact_dir), lock it with ``lock`` and, unless resuming, mark it as
    run ``run_id``'s. --overwrite first moves a previous run aside under its lock (a training still running there
    is never moved), released only once the new folder is locked: a second training is refused throughout."""
    root, aside = _check(path, overwrite=overwrite, resume=resume)
    old = RunLock()
    try:
        if aside is not None:
            old.acquire(root)
            try:
                os.rename(root, aside)
            except OSError as e:
                raise ArtifactError(f"--overwrite cannot move the previous run {root} to {aside}: "
                                    f"{e.strerror or e}; nothing was changed") from None
            print_out(f"--overwrite: the previous run is now {aside} (vae_dist never deletes it)", required=False)
        root.mkdir(parents=True, exist_ok=aside is None)
        if lock is not None:
            lock.acquire(root)
        if not resume:
            write_run_file(root / MARKER, dumps({"created_by": "vae_dist", "run_id": run_id}).encode() + b"\n")
        # Writable now, not after an hour of training; under no name, so never through a planted link.
        with tempfile.TemporaryFile(dir=root) as probe:
            probe.write(b"ok")
    except OSError as e:
        raise ArtifactError(f"artifact directory {root} is not writable: {e.strerror or e}") from None
    finally:
        old.release()
    return root


class RunLock:
    """An exclusive, non-blocking flock on the folder's lock file, which holds the holder's pid for the refusal to
    name; the kernel drops it when the process dies. A forked child (a loader worker) closes its copy at once: a
    flock lasts while any copy is open, so the orphaned workers of a killed run would hold it on."""
    fd: Optional[int] = None
    held: set[int] = set()  # every RunLock's descriptor in this process

    def acquire(self, root: Path) -> None:
        try:
            fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            why = f"{LOCK} is a symbolic link" if e.errno == errno.ELOOP else e.strerror or e
            raise ArtifactError(f"cannot lock artifact directory {root}: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise ArtifactError(f"cannot lock artifact directory {root}: {e.strerror or e}") from None
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise ArtifactError(f"artifact directory {root} is in use by another vae_dist run{who}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        RunLock.held.add(fd)

    def release(self) -> None:
        if self.fd in RunLock.held:  # not in a forked child, which closed it at once
            RunLock.held.discard(self.fd)
            os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None

    @staticmethod
    def close_in_child() -> None:
        while RunLock.held:
            os.close(RunLock.held.pop())


os.register_at_fork(after_in_child=RunLock.close_in_child)


def write_metrics(root: Path, history: Iterable[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl whole: appending would repeat epochs after a resume from a checkpoint older than it."""
    write_run_file(root / METRICS, "".join(dumps(row, sort_keys=True) + "\n" for row in history).encode())


def read_metrics(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / METRICS
    with checking(path, ArtifactError, "metrics file"):
        if not path.is_file():
            return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
