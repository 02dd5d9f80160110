"""Checkpoints: atomic save, find the newest complete one, fall back past corrupt ones, rotate.

A checkpoint is a folder ``checkpoints/step-<global step>`` holding what
``accelerator.save_state`` writes (model, optimizer, every rank's RNG states) plus
``MANIFEST.json``: the run position (epoch, batches done, global step, partial-epoch
sums, metric history, W&B run id), the size and the SHA-256 of every file. The manifest is written
last, into a temporary folder that is renamed into place only when complete, so a
folder without one is never loaded, and the position never comes from a folder name.

Accelerate's own automatic checkpoint naming is not used: it does not restore its
counter on load and can overwrite an old folder that a later resume then picks up.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from accelerate import Accelerator

from vae_dist.artifacts import atomic_write_text
from vae_dist.distributed import any_rank, on_main_then_share
from vae_dist.errors import CheckpointError

MANIFEST = "MANIFEST.json"
TMP_PREFIX = ".tmp-"
# 2 adds a SHA-256 per file (corrupt bytes of the right size are caught before loading);
# format 1 checkpoints, sizes only, are still read.
FORMAT = 2
READABLE_FORMATS = (1, 2)
HASH_CHUNK = 1 << 20
# Test hook: SIGKILL the main process half-way through the N-th checkpoint write
# (after the state files, before the manifest), to prove a torn checkpoint is never used.
KILL_HOOK_ENV = "VAE_DIST_TEST_KILL_IN_CHECKPOINT"


@dataclass(frozen=True)
class Found:
    path: Path
    global_step: int
    state: dict[str, Any]
    manifest: dict[str, Any]


def rotation_plan(complete: dict[str, int], keep: int) -> list[str]:
    """Which complete checkpoints to delete: all but the ``keep`` with the highest step.

    Pure: takes {folder name: global step}, returns names to delete, newest kept.
    Ties (the same step saved twice) keep the lexically last name.
    """
    ordered = sorted(complete.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    return [name for name, _ in ordered[keep:]]


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (``true`` is not one, though Python calls it an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_inside(rel: Any) -> bool:
    """A relative path that stays inside the checkpoint folder."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return False
    parts = Path(rel).parts
    return not Path(rel).is_absolute() and ".." not in parts and bool(parts)


def _valid_files(manifest: dict[str, Any]) -> bool:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return False
    if not all(_is_inside(rel) and _is_count(size) for rel, size in files.items()):
        return False
    if manifest["format"] >= 2:
        hashes = manifest.get("sha256")
        if not isinstance(hashes, dict) or set(hashes) != set(files):
            return False
        return all(isinstance(h, str) and len(h) == 64 for h in hashes.values())
    return True


def _valid_state(manifest: dict[str, Any]) -> bool:
    """The run position (learner.Position and the writer's process count) in full: a key
    missing, unknown or of the wrong type would otherwise fail the resume with a traceback."""
    state = manifest.get("state")
    if not isinstance(state, dict):
        return False
    keys = {"epoch", "batches_done", "global_step", "train_sums", "history", "wandb_run_id"}
    # num_processes is absent from checkpoints written before it was recorded.
    if set(state) - {"num_processes"} != keys or not _is_count(state.get("num_processes", 0)):
        return False
    if state["global_step"] != manifest["global_step"]:
        return False
    if not all(_is_count(state[k]) for k in ("epoch", "batches_done", "global_step")):
        return False
    sums, history = state["train_sums"], state["history"]
    if not (isinstance(sums, list) and len(sums) == 4 and all(_is_finite(v) for v in sums)):
        return False
    if state["wandb_run_id"] is not None and not isinstance(state["wandb_run_id"], str):
        return False
    if not isinstance(history, list) or not all(isinstance(row, dict) and _is_count(row.get("epoch")) for row in history):
        return False
    # One row per finished epoch, in order, then perhaps the in-progress epoch's (max_steps):
    # the summary and the exported model read the last one.
    epochs = [row["epoch"] for row in history]
    return len(epochs) - state["epoch"] in (0, 1) and epochs == list(range(1, len(epochs) + 1))


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def valid_manifest(manifest: Any) -> bool:
    """Whether parsed JSON has the manifest's shape: any other shape (a list, a string,
    negative sizes, paths leaving the folder, ...) makes the checkpoint unusable."""
    return (
        isinstance(manifest, dict)
        and manifest.get("format") in READABLE_FORMATS
        and type(manifest.get("format")) is int
        and _is_count(manifest.get("global_step"))
        and _valid_files(manifest)
        and _valid_state(manifest)
    )


def read_manifest(folder: Path) -> Optional[dict[str, Any]]:
    """The manifest of a complete, intact checkpoint folder, else None.

    Intact means every listed file exists with its recorded size: a truncated file
    (a kill mid-write, a full disk) is caught here before anything is loaded. The
    hashes, which need every byte read, are checked by ``verify_hashes`` when loading.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bad UTF-8
        return None
    if not valid_manifest(manifest):
        return None
    try:
        for rel, size in manifest["files"].items():
            f = folder / rel
            if f.is_symlink() or f.stat().st_size != size:
                return None
    except (OSError, ValueError):
        return None
    return manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_hashes(folder: Path, manifest: dict[str, Any]) -> Optional[str]:
    """None if every file has its recorded SHA-256 (format 1 records none), else the problem."""
    for rel, want in (manifest.get("sha256") or {}).items():
        try:
            got = file_sha256(folder / rel)
        except OSError as e:
            return f"{rel} cannot be read: {e.strerror or e}"
        if got != want:
            return f"{rel} does not match its SHA-256 (corrupt bytes)"
    return None


def _write_error(action: str, path: Path, e: OSError) -> CheckpointError:
    hint = " (the disk is full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return CheckpointError(f"cannot {action} checkpoint {path}: {e.strerror or e}{hint}")


class Checkpointer:
    """Saves and restores the full training state through Accelerate, atomically."""

    def __init__(
        self, accelerator: Accelerator, directory: Path, keep: int, log: Callable[[str], None] = print,
        every_steps: int = 0,
    ):
        self.accelerator = accelerator
        self.directory = directory
        self.keep = keep
        self.log = log
        self.every_steps = every_steps
        self.saves = 0

    def due(self, global_step: int, mid_epoch: bool) -> bool:
        """A save every ``every_steps`` steps; the end of an epoch (or of the run) has its
        own save, so a step that ends one is not due here."""
        return self.every_steps > 0 and global_step % self.every_steps == 0 and mid_epoch

    def maybe_save(self, global_step: int, mid_epoch: bool, state: Callable[[], dict[str, Any]]) -> Optional[Path]:
        """Save if due; ``state`` (a collective) is called only then. Every rank calls this."""
        return self.save(global_step, state()) if self.due(global_step, mid_epoch) else None

    def _sealed_folders(self) -> list[Path]:
        """Checkpoint folders that are not unfinished writes (those keep the .tmp- prefix)."""
        if not self.directory.is_dir():
            return []
        # A link is never ours: it is neither loaded nor rotated (deleted) through.
        return [
            p for p in self.directory.iterdir()
            if p.is_dir() and not p.is_symlink() and not p.name.startswith(TMP_PREFIX)
        ]

    def complete(self) -> list[Found]:
        """Complete, intact checkpoints, newest first."""
        found = []
        for p in self._sealed_folders():
            m = read_manifest(p)
            if m is not None:
                found.append(Found(p, int(m["global_step"]), m["state"], m))
        return sorted(found, key=lambda f: (f.global_step, f.path.name), reverse=True)

    def save(self, global_step: int, state: dict[str, Any]) -> Path:
        """Write a checkpoint from every rank; returns its final folder. Collective.

        A write that fails on any rank (a full disk, a vanished folder) raises one
        CheckpointError on every rank, so none is left waiting for the others."""
        acc = self.accelerator
        t0 = time.perf_counter()
        name = f"step-{global_step:09d}"
        final = self.directory / name
        tmp = self.directory / f"{TMP_PREFIX}{name}"

        def make_tmp() -> None:
            for p in (self.directory, tmp, final):
                if p.is_symlink():
                    raise CheckpointError(f"{p} is a symbolic link; vae_dist does not write through links")
            try:
                if tmp.exists():  # left by a killed run: ours by its name, never complete
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                raise _write_error("start", tmp, e) from None

        on_main_then_share(acc, make_tmp)
        # Model, optimizer and each rank's RNG states; ranks write their own files.
        error: Optional[OSError] = None
        try:
            acc.save_state(output_dir=str(tmp), safe_serialization=True)
        except OSError as e:
            error = e
        if any_rank(acc, error is not None):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise (_write_error("write", tmp, error) if error else CheckpointError(
                f"cannot write checkpoint {tmp}: another process failed to write its part"
            ))
        acc.wait_for_everyone()
        self.saves += 1

        def seal() -> None:
            try:
                self._seal(tmp, final, global_step, state)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                raise _write_error("complete", final, e) from None

        on_main_then_share(acc, seal)
        self.log(f"checkpoint {final} written in {time.perf_counter() - t0:.2f} s")
        return final

    def _seal(self, tmp: Path, final: Path, global_step: int, state: dict[str, Any]) -> None:
        """Manifest last, then the rename that makes the checkpoint complete; then rotation."""
        if os.environ.get(KILL_HOOK_ENV) == str(self.saves):
            os.kill(os.getpid(), signal.SIGKILL)
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths}
        hashes = {str(p.relative_to(tmp)): file_sha256(p) for p in paths}
        manifest = {"format": FORMAT, "global_step": global_step, "files": files, "sha256": hashes, "state": state}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        replaced = None
        if final.exists():
            # The same step saved again (a stop right after a checkpoint): move the old
            # one aside under a name complete() still accepts, so a kill between the
            # two renames leaves a complete checkpoint either way.
            replaced = final.with_name(final.name + "-replaced")
            if replaced.is_symlink():
                raise CheckpointError(f"{replaced} is a symbolic link; vae_dist does not write through links")
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final, replaced)
        os.replace(tmp, final)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        _fsync_dir(self.directory)
        # Old ones go only now that the new one is complete.
        complete = {f.path.name: f.global_step for f in self.complete()}
        for old in rotation_plan(complete, self.keep):
            shutil.rmtree(self.directory / old, ignore_errors=True)

    def _try_load(self, found: Found) -> Optional[str]:
        """Load one checkpoint on every rank; None if all succeeded, else why not.

        Every rank checks the bytes it is about to read (same-size corruption, zeros or
        flipped bits, would otherwise load without complaint), and the ranks agree on
        the outcome before any of them loads, so they all load or all skip together."""
        acc = self.accelerator
        error = verify_hashes(found.path, found.manifest)
        if any_rank(acc, error is not None):
            return error or "corrupt on another rank"
        try:
            acc.load_state(str(found.path))
        except Exception as e:  # corrupt archive, wrong shapes, ...
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if any_rank(acc, error is not None):
            return error or "failed on another rank"
        return None

    def load_latest(self) -> Optional[Found]:
        """Restore the newest usable checkpoint into the prepared objects; None if there is none.

        A checkpoint that fails to load (corrupt bytes of the right size) is reported in
        one line and the previous complete one is tried. Accelerate's loader reads the
        optimizer and RNG files with ``torch.load(weights_only=True)`` and the model
        through safetensors, so nothing from the folder is unpickled as code.
        """
        candidates = self.complete()
        # A sealed folder that fails the size check (truncated, a file missing) is said, not skipped silently.
        good = {f.path.name for f in candidates}
        broken = sorted(p.name for p in self._sealed_folders() if p.name not in good)
        for name in broken:
            self.log(f"checkpoint {name} is unusable (no valid manifest, or a file is missing or of the wrong size); skipping it")
        if not candidates:
            if broken:
                raise CheckpointError(f"no usable checkpoint in {self.directory}: {', '.join(broken)} failed the integrity check")
            torn = [p.name for p in self.directory.glob(f"{TMP_PREFIX}*")] if self.directory.is_dir() else []
            if torn:
                raise CheckpointError(f"no complete checkpoint in {self.directory} (only unfinished: {', '.join(torn)})")
            return None
        for i, found in enumerate(candidates):
            error = self._try_load(found)
            if error is None:
                return found
            nxt = candidates[i + 1].path.name if i + 1 < len(candidates) else None
            self.log(
                f"checkpoint {found.path.name} is unusable ({error}); "
                + (f"falling back to {nxt}" if nxt else "no older checkpoint left")
            )
        raise CheckpointError(f"no usable checkpoint in {self.directory}: every complete one failed to load")


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
