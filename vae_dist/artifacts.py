"""The artifact directory: create and guard it, write its small files, export the model.

vae_dist only ever deletes what it made: a marker file proves a directory is ours, and
``--overwrite`` removes only the entries vae_dist writes, never anything else.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from vae_dist.config import CONFIG_FILE, TrainingConfig
from vae_dist.errors import ArtifactError, ConfigError
from vae_dist.fileio import atomic_write
from vae_dist.model import VAE, parameter_count

MARKER = ".vae_dist"
CONFIG = CONFIG_FILE
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
IMAGES = "images"
LOSS_CURVES = "loss_curves.png"
WANDB = "wandb"
# Written by the sample / reconstruct / interpolate commands.
PICTURES = ("samples.png", "manifold.png", "reconstructions.png", "interpolation.png")
# Everything a run writes; --overwrite removes these and nothing else.
OWNED = (CONFIG, MODEL, METRICS, CHECKPOINTS, IMAGES, LOSS_CURVES, WANDB, *PICTURES)
# Held (flock) by the main process of a training for its whole run; never deleted, since
# removing a lock file lets two processes lock two different files of the same name.
LOCK = ".vae_dist.lock"
# Folders whose children vae_dist writes, deletes or reads back as its own.
OWNED_FOLDERS = (CHECKPOINTS, IMAGES)
# The children of each owned folder that vae_dist (in wandb/, W&B) writes, by name:
# --overwrite deletes these and leaves anything else a user put there, and the folder with it.
OWNED_CHILDREN = {
    CHECKPOINTS: re.compile(r"(\.tmp-)?step-\d+"),
    IMAGES: re.compile(r"\.?epoch-\d+-[a-z]+\.png(\..+\.tmp)?"),
    WANDB: re.compile(r"(offline-run-|run-|latest-run|debug).*"),
}
T = TypeVar("T")
# Models larger than this are refused before any memory is allocated for them.
MAX_PARAMETERS = 1_000_000_000


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that a kill never leaves half a file."""
    atomic_write(path, lambda f: f.write(text.encode()))


def _write_or_fail(path: Path, write: Callable[[], Any]) -> None:
    """Run a write of one of the run's files; an OSError (a full disk, a folder gone, a
    planted link) becomes one ArtifactError line naming the file."""
    try:
        write()
    except OSError as e:
        raise ArtifactError(f"cannot write {path}: {e.strerror or e}") from None


def planted_links(root: Path) -> list[Path]:
    """Symbolic links at the artifact folder or at any path in it that vae_dist writes
    or deletes: through one, a write or a delete would land outside the folder."""
    if root.is_symlink():
        return [root]
    if not root.is_dir():
        return []
    links = [root / name for name in (MARKER, LOCK, *OWNED) if (root / name).is_symlink()]
    for name in OWNED_FOLDERS:
        folder = root / name
        if folder.is_dir() and not folder.is_symlink():
            links += [p for p in folder.iterdir() if p.is_symlink()]
    return links


def refuse_links(root: Path) -> None:
    links = planted_links(root)
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
    path: str | Path, *, overwrite: bool, resume: bool, lock: Optional["RunLock"] = None
) -> Path:
    """Create or check the artifact directory; called on the main process only.

    - missing or empty: created and marked as ours;
    - ours, with a previous run: refused unless --resume (keep) or --overwrite (clear ours);
    - not ours and not empty: refused, even with --overwrite, and left untouched;
    - a symbolic link at the folder or where vae_dist writes: refused, nothing touched.

    With ``lock``, the folder is locked for this process before anything in it changes,
    so a second training in the same folder fails instead of clearing the first's files.
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
            _remove_owned(root)
        atomic_write_text(root / MARKER, json.dumps({"created_by": "vae_dist"}) + "\n")
        _probe_writable(root)
    except OSError as e:
        raise ArtifactError(f"artifact directory {root} is not writable: {e.strerror or e}") from None
    return root


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


def _remove_owned(root: Path) -> None:
    """Delete the entries vae_dist writes, never following a link (refuse_links ran first;
    this re-checks each entry, since the folder may have changed since)."""
    for name in OWNED:
        p = root / name
        if p.is_symlink():
            raise ArtifactError(f"{p} is a symbolic link; vae_dist does not delete through links")
        if p.is_dir():
            pattern = OWNED_CHILDREN.get(name)
            if pattern is None:
                raise ArtifactError(f"{p} is a folder vae_dist did not make; not deleted")
            for child in p.iterdir():
                if pattern.fullmatch(child.name):
                    # rmtree does not follow links inside the folder: it unlinks them
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            if not any(p.iterdir()):  # a folder still holding a user's file stays
                p.rmdir()
        elif p.exists():
            p.unlink()


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
    """An exclusive, non-blocking flock on the artifact folder's lock file.

    The kernel drops it when the process dies, so a killed run never leaves the folder
    locked. Only the main process takes it."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        self.path: Optional[Path] = None

    def acquire(self, root: Path) -> None:
        import fcntl

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
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f" (pid {holder})" if holder else ""
                raise ArtifactError(f"artifact directory {root} is in use by another vae_dist run{who}") from None
            raise ArtifactError(f"cannot lock artifact directory {root}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None


def write_config(root: Path, config: TrainingConfig) -> None:
    _write_or_fail(root / CONFIG, lambda: atomic_write_text(root / CONFIG, config.to_json()))


def write_metrics(root: Path, history: Iterable[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the run's history (one row per epoch).

    Rewriting the whole file, rather than appending, is what keeps epochs from being
    duplicated when a run is resumed from a checkpoint older than the file.
    """
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    _write_or_fail(root / METRICS, lambda: atomic_write_text(root / METRICS, text))


def read_metrics(root: Path) -> list[dict[str, Any]]:
    path = Path(root) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_model_file(
    path: Path, state_dict: dict[str, torch.Tensor], config: TrainingConfig, results: Optional[dict[str, Any]] = None
) -> None:
    """Final weights as safetensors with the config JSON in the metadata, so the one
    file rebuilds the model with no pickle and no config.json beside it; ``results`` (the
    last validation and its protocol) ride along, so a number read off the file says
    what it was measured on."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {"format": "pt", "vae_dist_config": config.to_json()}
    if results is not None:
        metadata["vae_dist_results"] = json.dumps(results, sort_keys=True)
    blob = save(tensors, metadata=metadata)
    _write_or_fail(path, lambda: atomic_write(path, lambda f: f.write(blob)))


def strip_compile_prefix(state: dict[str, T]) -> dict[str, T]:
    """Parameter names without torch.compile's ``_orig_mod.`` wrapper segment."""
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def check_model_size(config: TrainingConfig, where: str) -> None:
    """Refuse a model too large to build, from its config alone (nothing allocated)."""
    try:
        n = parameter_count(config.model)
    except (ValueError, TypeError, OverflowError) as e:
        raise ConfigError(f"{where}: the model cannot be sized ({e})") from None
    if n > MAX_PARAMETERS:
        raise ConfigError(
            f"{where}: the model would have {n:,} parameters, more than the {MAX_PARAMETERS:,} vae_dist builds"
        )


def load_model_file(path: str | Path) -> tuple[VAE, TrainingConfig]:
    """Rebuild the model and its training config from a model.safetensors file (or its folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MODEL
    if not p.is_file():
        raise ArtifactError(f"no trained model at {p} (train first, or give the artifact directory)")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = strip_compile_prefix({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"model file {p} is not a readable safetensors file: {_first_line(e)}") from None
    if "vae_dist_config" not in meta:
        raise ArtifactError(f"model file {p} was not written by vae_dist (no config in its metadata)")
    try:
        saved = json.loads(meta["vae_dist_config"])
        if not isinstance(saved, dict):
            raise ConfigError("not a JSON object")
        config = TrainingConfig.from_dict(saved)
    except (ValueError, TypeError, ConfigError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"model file {p} carries an unreadable config: {_first_line(e)}") from None
    try:
        check_model_size(config, f"model file {p}")
    except ConfigError as e:
        raise ArtifactError(str(e)) from None
    # The config's model is built without memory first: a config that declares a far
    # larger model than the file holds is refused before any of it is allocated.
    with torch.device("meta"):
        skeleton = VAE.from_config(config.model)
    mismatch = _shape_mismatch({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, shapes)
    if mismatch:
        raise ArtifactError(f"model file {p} does not match its config: {mismatch}")
    try:
        state = strip_compile_prefix(load_file(str(p)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"model file {p} is not a readable safetensors file: {_first_line(e)}") from None
    model = VAE.from_config(config.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"model file {p} does not match its config: {_first_line(e)}") from None
    return model.eval(), config


def _shape_mismatch(want: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> Optional[str]:
    """The first difference between the config's tensors and the file's, else None."""
    for name in sorted(want.keys() | got.keys()):
        if name not in got:
            return f"{name} is missing"
        if name not in want:
            return f"{name} is not in the model"
        if want[name] != got[name]:
            return f"{name} has shape {list(got[name])} where the model has {list(want[name])}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
