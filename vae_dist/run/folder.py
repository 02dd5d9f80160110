"""The run folder: its layout, its guard, its lock and its small files.

vae_dist only ever deletes what it made: a marker file proves a folder is ours, and
``--overwrite`` removes only the entries vae_dist writes, never anything else.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from vae_dist.config import CONFIG_FILE, TrainingConfig
from vae_dist.errors import ArtifactError
from vae_dist.run.fileio import atomic_write, checking

MARKER = ".vae_dist"
CONFIG = CONFIG_FILE
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
IMAGES = "images"
LOSS_CURVES = "loss_curves.png"
WANDB = "wandb"
TENSORBOARD = "tensorboard"  # --report-to tensorboard's event files
# Written by the sample / reconstruct / interpolate commands.
PICTURES = ("samples.png", "manifold.png", "reconstructions.png", "interpolation.png")
# Everything a run writes; --overwrite removes these and nothing else.
OWNED = (CONFIG, MODEL, METRICS, CHECKPOINTS, IMAGES, LOSS_CURVES, WANDB, TENSORBOARD, *PICTURES)
# Where --overwrite keeps the previous run until the new one has written its first
# checkpoint: restored if the new run fails before that, or by the next training in the
# folder if it was killed (see restore_previous).
PREVIOUS = ".vae_dist.previous"
# Held (flock) by the main process of a training for its whole run; never deleted, since
# removing a lock file lets two processes lock two different files of the same name.
LOCK = ".vae_dist.lock"
# The children of each owned folder that vae_dist (in wandb/, W&B) writes, given the
# previous run's id: --overwrite deletes these and leaves anything else a user put there,
# and the folder with it. Checkpoints by their record (checkpoint.written_by); W&B's run
# folders by the run's id at the end of their name; W&B's links by name, and only links;
# TensorBoard's event files by the run's id that ends their name (tracking.Tracker).
_IMAGE = re.compile(r"\.?epoch-\d+-[a-z]+\.png(\..+\.tmp)?")
_WANDB_LINKS = ("latest-run", "debug.log", "debug-internal.log")


def _wandb_owned(child: Path, run_id: str) -> bool:
    if child.is_symlink():
        return child.name in _WANDB_LINKS
    return bool(run_id) and child.is_dir() and re.fullmatch(rf"(offline-)?run-\d{{8}}_\d{{6}}-{re.escape(run_id)}", child.name) is not None


def _checkpoint_owned(child: Path, run_id: str) -> bool:
    # Imported here: checkpoint.py imports accelerate (and torch), which the CLI's --help,
    # its usage errors and the picture commands' --out check do not need.
    from vae_dist.run.checkpoint import written_by

    return written_by(child, run_id)


def _event_file_owned(child: Path, run_id: str) -> bool:
    return (bool(run_id) and child.is_file() and not child.is_symlink()
            and re.fullmatch(rf"events\.out\.tfevents\.\d+\..+\.{re.escape(run_id)}", child.name) is not None)


OWNED_CHILDREN: dict[str, Callable[[Path, str], bool]] = {
    CHECKPOINTS: _checkpoint_owned,
    IMAGES: lambda child, run_id: _IMAGE.fullmatch(child.name) is not None,
    WANDB: _wandb_owned,
    TENSORBOARD: _event_file_owned,
}


def epoch_picture(root: Path, epoch: int, name: str) -> Path:
    """Where an epoch's preview goes (a name OWNED_CHILDREN[IMAGES] matches)."""
    return root / IMAGES / f"epoch-{epoch:03d}-{name}.png"


def write_run_file(path: Path, data: bytes) -> None:
    """Write one of the run's files atomically; an OSError (a full disk, a folder gone, a
    planted link) becomes one ArtifactError line naming the file."""
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None


def refuse_links(root: Path) -> None:
    """Refuse a symbolic link at the folder or at any path in it that vae_dist writes or
    deletes: through one, a write or a delete would land outside the folder."""
    links = [root] if root.is_symlink() else []
    if root.is_dir() and not links:
        links = [root / name for name in (MARKER, LOCK, PREVIOUS, *OWNED) if (root / name).is_symlink()]
        for name in (CHECKPOINTS, IMAGES):
            folder = root / name
            if folder.is_dir() and not folder.is_symlink():
                links += [p for p in folder.iterdir() if p.is_symlink()]
    if links:
        raise ArtifactError(
            f"artifact directory {root} holds a symbolic link where vae_dist writes ({links[0]}); "
            "vae_dist never writes or deletes through a link: remove it or choose another --artifact-dir"
        )


def check_artifact_dir(path: str | Path, *, overwrite: bool, resume: bool) -> Path:
    """Everything prepare_artifact_dir refuses, checked without changing anything."""
    if overwrite and resume:
        raise ArtifactError("--overwrite and --resume cannot be used together")
    root = Path(path).expanduser()
    with checking(root, ArtifactError, "artifact directory"):
        return _check_artifact_dir(root, overwrite=overwrite, resume=resume)


def _check_artifact_dir(root: Path, *, overwrite: bool, resume: bool) -> Path:
    refuse_links(root)
    if root.exists() and not root.is_dir():
        raise ArtifactError(f"artifact directory {root} exists and is not a directory")
    ours = (root / MARKER).is_file()
    try:
        # The lock file alone (a run killed before it marked the folder) is not foreign.
        entries = [p for p in root.iterdir() if p.name != LOCK] if root.is_dir() else []
    except OSError as e:
        raise ArtifactError(f"artifact directory {root} cannot be read: {e.strerror or e}") from None
    if entries and not ours:
        raise ArtifactError(
            f"artifact directory {root} is not empty and was not created by vae_dist; "
            "choose another --artifact-dir (nothing in it was touched)"
        )
    previous_run = ours and any(p.name != MARKER for p in entries)
    odd = _not_ours(root) if ours else None
    if odd is not None and overwrite:
        raise ArtifactError(f"{odd} is not what vae_dist writes there; --overwrite leaves it alone: move it away first")
    if resume and not previous_run:
        raise ArtifactError(f"--resume given but {root} holds no previous run")
    if previous_run and not (resume or overwrite):
        raise ArtifactError(
            f"artifact directory {root} holds a previous vae_dist run; "
            "pass --resume to continue it or --overwrite to start again"
        )
    return root


def prepare_artifact_dir(
    path: str | Path, *, overwrite: bool, resume: bool, lock: Optional["RunLock"] = None, run_id: str = "",
) -> Path:
    """Create or check the artifact directory; called on the main process only.

    - missing or empty: created and marked as ours;
    - ours, with a previous run: refused unless --resume (keep) or --overwrite (clear ours);
    - not ours and not empty: refused, even with --overwrite, and left untouched;
    - a symbolic link at the folder or where vae_dist writes: refused, nothing touched.

    With ``lock``, the folder is locked for this process before anything in it changes,
    so a second training in the same folder fails instead of clearing the first's files.

    The marker records the run's id (``run_id``, a new run's); --resume keeps the marker,
    and so the id of the run it continues (see marker_run_id).
    """
    root = check_artifact_dir(path, overwrite=overwrite, resume=resume)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ArtifactError(f"artifact directory {root} is not writable: {e.strerror or e}") from None
    if lock is not None:
        lock.acquire(root)
    try:
        if overwrite:
            _set_aside(root)
        if not (resume and (root / MARKER).is_file()):
            marker = json.dumps({"created_by": "vae_dist", "run_id": run_id}) + "\n"
            atomic_write(root / MARKER, lambda f: f.write(marker.encode()))
        _probe_writable(root)
    except OSError as e:
        raise ArtifactError(f"artifact directory {root} is not writable: {e.strerror or e}") from None
    return root


def marker_run_id(root: Path) -> str:
    """The id of the run the folder's marker records; "" for a marker without one (an
    older release's), whose checkpoints then count as nobody's."""
    try:
        record = json.loads((root / MARKER).read_bytes())
    except (OSError, ValueError):
        return ""
    run_id = record.get("run_id") if isinstance(record, dict) else None
    return run_id if isinstance(run_id, str) else ""


def _not_ours(root: Path) -> Optional[Path]:
    """An entry at one of vae_dist's names that is not of the kind vae_dist makes there
    (a folder named like a file, a file named like a folder, a FIFO): not ours to delete."""
    for name in OWNED:
        p = root / name
        if p.is_symlink() or not p.exists():
            continue
        if not (p.is_dir() if name in OWNED_CHILDREN else p.is_file()):
            return p
    return None


def _owned_entries(root: Path, run_id: str) -> list[Path]:
    """What the run ``run_id`` wrote in the folder, never through a link (refuse_links ran
    first; this re-checks each entry, since the folder may have changed since)."""
    found = []
    for name in OWNED:
        p = root / name
        if p.is_symlink():
            raise ArtifactError(f"{p} is a symbolic link; vae_dist does not delete through links")
        if p.is_dir():
            owned = OWNED_CHILDREN.get(name)
            if owned is None:
                raise ArtifactError(f"{p} is a folder vae_dist did not make; not deleted")
            found += [child for child in p.iterdir() if owned(child, run_id)]
        elif p.exists():
            found.append(p)
    return found


def _move_all(paths: Iterable[Path], src: Path, dst: Path) -> None:
    for p in paths:
        target = dst / p.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)


def _prune(root: Path) -> None:
    """Remove the run's folders left empty (one still holding a user's file stays)."""
    for name in OWNED_CHILDREN:
        p = root / name
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            try:
                p.rmdir()
            except OSError:  # an empty folder that cannot go (a mount point) costs nothing
                pass


def _set_aside(root: Path) -> None:
    """--overwrite: move the previous run (what its id says it wrote, and its marker) into
    PREVIOUS, to be discarded at the new run's first checkpoint. A copy of the marker goes
    first, so that a kill half-way leaves a set-aside that restore_previous can undo."""
    if not (root / MARKER).is_file():  # a new folder: nothing to keep
        return
    aside = root / PREVIOUS
    aside.mkdir()
    shutil.copy2(root / MARKER, aside / MARKER)
    _move_all(_owned_entries(root, marker_run_id(root)), root, aside)
    _prune(root)


def discard_previous(root: Path) -> None:
    """The new run has a checkpoint: the run --overwrite set aside is gone for good."""
    aside = root / PREVIOUS
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)


def restore_previous(root: Path) -> bool:
    """Undo an --overwrite whose new run ended (or was killed) before its first checkpoint:
    delete what the new run wrote and move the previous run back. Main process, with the
    folder locked. False if there is nothing set aside."""
    aside = root / PREVIOUS
    if aside.is_symlink() or not (aside / MARKER).is_file():
        return False
    previous_id, current_id = marker_run_id(aside), marker_run_id(root)
    checkpoints = root / CHECKPOINTS
    if current_id != previous_id and checkpoints.is_dir() and any(
        c.name.startswith("step-") and _checkpoint_owned(c, current_id) for c in checkpoints.iterdir()
    ):  # the new run has a checkpoint (its discard of the set-aside failed): the new run is kept
        discard_previous(root)
        return False
    if (root / MARKER).is_file() and current_id != previous_id:  # the new run got as far as its marker
        for p in _owned_entries(root, current_id):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    moved = [c for e in aside.iterdir() if e.name != MARKER
             for c in (e.iterdir() if e.name in OWNED_CHILDREN and e.is_dir() else [e])]
    _move_all(moved, aside, root)
    os.replace(aside / MARKER, root / MARKER)  # last: until then the set-aside is still whole
    shutil.rmtree(aside)
    _prune(root)
    return True


def _probe_writable(root: Path) -> None:
    """Prove now that the run's outputs can be written, not after an hour of training.
    A fresh name (O_EXCL): a planted file or link of a fixed name is never written through."""
    fd, probe = tempfile.mkstemp(dir=root, prefix=".write-test-")
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        os.unlink(probe)


class RunLock:
    """An exclusive, non-blocking flock on the artifact folder's lock file, holding the
    holder's pid. The kernel drops it when the process dies, so a killed run never leaves
    the folder locked. Only the main process takes it.

    Not filelock: it keeps no holder's pid (outside its soft fallback) for the refusal
    to name."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None

    def acquire(self, root: Path) -> None:
        if self.fd is not None:  # already held by this process
            return
        path = root / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ArtifactError(f"{path} is a symbolic link; vae_dist does not write through links") from None
            raise ArtifactError(f"artifact directory {root} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise ArtifactError(f"artifact directory {root} is in use by another vae_dist run{who}") from None
            raise ArtifactError(f"cannot lock artifact directory {root}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def write_config(root: Path, config: TrainingConfig) -> None:
    write_run_file(root / CONFIG, config.to_json().encode())


def write_metrics(root: Path, history: Iterable[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the run's history (one row per epoch).

    Rewriting the whole file, rather than appending, is what keeps epochs from being
    duplicated when a run is resumed from a checkpoint older than the file.
    """
    write_run_file(root / METRICS, "".join(json.dumps(row, sort_keys=True) + "\n" for row in history).encode())


def read_metrics(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / METRICS
    with checking(path, ArtifactError, "metrics file"):
        found = path.is_file()
    if not found:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
