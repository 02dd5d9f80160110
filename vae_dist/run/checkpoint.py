"""Checkpoints: sealed saves, the newest usable one, fallback past corrupt ones, rotation.

``checkpoints/step-<global step>`` holds what ``accelerator.save_state`` writes plus ``MANIFEST.json``
(the Position, the run's id, every file's size and SHA-256), written last into a temporary folder that
one rename puts in place. Only folders whose manifest holds the run's id and that are named after their
step are loaded or deleted, never a copy such as ``checkpoints/my-backup``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, NamedTuple, Optional

from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError

from vae_dist.errors import CheckpointError, ConfigError, first_line
from vae_dist.run.fileio import atomic_write
from vae_dist.run.folder import RUN_ID, is_run_id
from vae_dist.run.position import Position
from vae_dist.training.distributed import any_rank, on_main_then_share

MANIFEST = "MANIFEST.json"
TMP_PREFIX = ".tmp-"
REPLACED = "-replaced"  # the suffix a step's checkpoint has while that step is saved again
FORMAT = 3  # 3: the run id in every manifest
# Test hook: SIGKILL the main process half-way through the N-th checkpoint write
# (after the state files, before the manifest), to prove a torn checkpoint is never used.
KILL_HOOK_ENV = "VAE_DIST_TEST_KILL_IN_CHECKPOINT"
Size = Annotated[int, Field(ge=0)]


class Manifest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    format: Literal[FORMAT]  # a format no release wrote, earlier or later, is unusable
    global_step: Size
    run_id: Annotated[str, Field(pattern=f"^{RUN_ID}$")]  # the run that wrote it: only its own are rotated or resumed
    files: Annotated[dict[str, Size], Field(min_length=1)]  # relative paths inside the folder
    sha256: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]
    state: Position

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if set(self.sha256) != set(self.files):
            raise ValueError("every file, and only those, must have a SHA-256")
        if any(Path(rel).is_absolute() or ".." in Path(rel).parts for rel in self.files):
            raise ValueError("every file must be inside the checkpoint folder")
        if self.state.global_step != self.global_step:
            raise ValueError("the state is of another step")
        return self


class Found(NamedTuple):
    path: Path
    manifest: Manifest


def rotation_plan(complete: dict[str, int], keep: int) -> list[str]:
    """The names, of {folder name: global step}, to delete: all but the ``keep`` with the highest
    step (ties keep the lexically last name)."""
    ordered = sorted(complete.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    return [name for name, _ in ordered[keep:]]


def read_manifest(folder: Path) -> Optional[Manifest]:
    """The manifest of a complete, intact checkpoint folder, else None. Intact: every listed file is
    there with its recorded size (the hashes, which need every byte read, are checked when loading)."""
    try:
        manifest = Manifest.model_validate_json((folder / MANIFEST).read_bytes())
        intact = all(not (folder / rel).is_symlink() and (folder / rel).stat().st_size == size
                     for rel, size in manifest.files.items())
    except (OSError, ValueError, ConfigError):  # ValidationError is a ValueError; ConfigError: the saved config
        return None
    return manifest if intact else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_hashes(folder: Path, manifest: Manifest) -> Optional[str]:
    """None if every file has its recorded SHA-256, else the problem."""
    for rel, want in manifest.sha256.items():
        try:
            if file_sha256(folder / rel) != want:
                return f"{rel} does not match its SHA-256 (corrupt bytes)"
        except OSError as e:
            return f"{rel} cannot be read: {e.strerror or e}"
    return None


def _write_error(action: str, path: Path, e: Exception) -> CheckpointError:
    """One line. torch's and safetensors' own errors for a failed write keep no errno: the free space tells."""
    why = (e.strerror if isinstance(e, OSError) else first_line(e)) or str(e) or type(e).__name__
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(path).free < (1 << 20)
    return CheckpointError(f"cannot {action} checkpoint {path}: {why}{' (the disk is full)' if full else ''}")


class Checkpointer:
    """Saves and restores the full training state and the run's Position through Accelerate, atomically."""

    def __init__(self, accelerator: Accelerator, directory: Path, keep: int, log: Callable[[str], None] = print,
                 every_steps: int = 0, *, run_id: str):
        if not is_run_id(run_id):  # it names folders to delete: never a path
            raise ValueError(f"not a run id: {run_id!r}")
        self.accelerator, self.directory, self.keep, self.log = accelerator, directory, keep, log
        self.every_steps, self.run_id = every_steps, run_id
        self.saves = 0

    def maybe_save(self, global_step: int, mid_epoch: bool, state: Callable[[], Position]) -> Optional[Path]:
        """Save every ``every_steps`` steps, mid-epoch (an epoch's end has its own save); ``state``
        (a collective) is called only then. Every rank calls this."""
        if self.every_steps and global_step % self.every_steps == 0 and mid_epoch:
            return self.save(global_step, state())
        return None

    def _folders(self) -> list[Path]:
        """Folders named as checkpoints; never a link (nothing is loaded or deleted through one)."""
        return [p for p in self.directory.glob("step-*") if p.is_dir() and not p.is_symlink()]

    def complete(self) -> list[Found]:
        """This run's complete, intact checkpoints, newest first; each at the name its save gives."""
        found = [Found(p, m) for p in self._folders() if (m := read_manifest(p)) is not None
                 and m.run_id == self.run_id and p.name.removesuffix(REPLACED) == f"step-{m.global_step:09d}"]
        return sorted(found, key=lambda f: (f.manifest.global_step, f.path.name), reverse=True)

    def remove_leftovers(self) -> None:
        """Main process: delete this run's unfinished writes (a kill, a second Ctrl-C)."""
        if not self.directory.is_symlink():
            for p in self.directory.glob(f"{TMP_PREFIX}step-*-{self.run_id}"):
                shutil.rmtree(p, ignore_errors=True)  # refuses a link, not following it

    def save(self, global_step: int, state: Position) -> Path:
        """Write a checkpoint from every rank; returns its folder. Collective: a write that fails on
        any rank (a full disk) is one CheckpointError on every rank."""
        acc, t0 = self.accelerator, time.perf_counter()
        final = self.directory / f"step-{global_step:09d}"
        tmp = self.directory / f"{TMP_PREFIX}{final.name}-{self.run_id}"  # the id proves an unfinished write ours

        def make_tmp() -> None:
            if self.directory.is_symlink():  # a link at tmp or final is renamed or refused, never followed
                raise CheckpointError(f"{self.directory} is a symbolic link; vae_dist does not write through links")
            try:
                self.remove_leftovers()  # this run's interrupted saves, this one's name among them
                tmp.mkdir(parents=True)
            except OSError as e:
                raise _write_error("start", tmp, e) from None

        on_main_then_share(acc, make_tmp)
        error: Optional[Exception] = None
        try:  # ranks write their own files
            acc.save_state(output_dir=str(tmp), safe_serialization=True)
        # torch's writer and safetensors report a failed write (a full disk) as their own errors
        # ("unexpected pos ...", "No space left on device"), not as an OSError.
        except (OSError, RuntimeError, SafetensorError) as e:
            error = e
        if any_rank(acc, error is not None):
            # Said before the torn files go: their space freed, a full disk would not show.
            failure = _write_error("write", tmp, error) if error else CheckpointError(
                f"cannot write checkpoint {tmp}: another process failed to write its part")
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise failure from None
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

    def _seal(self, tmp: Path, final: Path, global_step: int, state: Position) -> None:
        """Manifest last, then the rename that makes the checkpoint complete; then rotation."""
        if os.environ.get(KILL_HOOK_ENV) == str(self.saves):
            os.kill(os.getpid(), signal.SIGKILL)
        files = {str(p.relative_to(tmp)): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        # Validated as it will be read back (the state from its dump), so that a state the reader
        # would refuse fails here rather than at a resume.
        manifest = Manifest(format=FORMAT, global_step=global_step, run_id=self.run_id, state=state.model_dump(),
                            files={rel: p.stat().st_size for rel, p in files.items()},
                            sha256={rel: file_sha256(p) for rel, p in files.items()})
        text = manifest.model_dump_json(indent=1) + "\n"
        atomic_write(tmp / MANIFEST, lambda f: f.write(text.encode()))
        # The same step saved again (a stop right after a checkpoint): the old one waits under a name
        # complete() accepts, so a kill between the two renames leaves a complete one either way.
        # (A link at ``old`` is neither followed by rmtree nor replaced by the rename: an OSError.)
        old = final.with_name(final.name + REPLACED)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):  # the rename is durable once the directory entry is on disk
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        # Old ones go only now that the new one is complete. One newer than this save failed to load
        # (a resume starts from the newest that loads): it is not a kept one.
        complete = {f.path.name: f.manifest.global_step for f in self.complete()}
        kept = {name: step for name, step in complete.items() if step <= global_step}
        for name in rotation_plan(kept, self.keep) + sorted(complete.keys() - kept.keys()):
            shutil.rmtree(self.directory / name, ignore_errors=True)

    def load_latest(self) -> Optional[Found]:
        """Restore the newest usable checkpoint into the prepared objects; None if there is none. One
        that fails to load is said in one line and the previous one is tried. Accelerate reads the
        optimizer and RNG files with ``torch.load(weights_only=True)`` and the model through
        safetensors: nothing is unpickled as code."""
        candidates = self.complete()
        # A step-* folder that fails the size check or is another run's is said, not skipped
        # silently; a user's folder there is not ours to judge.
        good = {f.path.name for f in candidates}
        broken = sorted(p.name for p in self._folders() if p.name not in good)
        for name in broken:
            self.log(f"checkpoint {name} is unusable (no valid manifest of this run, "
                     "or a file is missing or of the wrong size); skipping it")
        if not candidates:
            if broken:
                raise CheckpointError(f"no usable checkpoint in {self.directory}: "
                                      f"{', '.join(broken)} failed the integrity check")
            if torn := [p.name for p in self.directory.glob(f"{TMP_PREFIX}*")]:
                raise CheckpointError(f"no complete checkpoint in {self.directory} "
                                      f"(only unfinished: {', '.join(torn)})")
            return None
        acc = self.accelerator
        for found, older in zip(candidates, [*candidates[1:], None]):
            # Every rank checks the bytes it is about to read (same-size corruption would load without a
            # word), and the ranks agree before any of them loads: all load or all skip.
            error = verify_hashes(found.path, found.manifest)
            if not any_rank(acc, error is not None):
                try:
                    acc.load_state(str(found.path))
                except Exception as e:  # corrupt archive, wrong shapes, ...
                    error = f"{type(e).__name__}: {first_line(e)}"
                if not any_rank(acc, error is not None):
                    on_main_then_share(acc, self.remove_leftovers)
                    return found
            then = f"falling back to {older.path.name}" if older else "no older checkpoint left"
            self.log(f"checkpoint {found.path.name} is unusable ({error or 'failed on another rank'}); {then}")
        raise CheckpointError(f"no usable checkpoint in {self.directory}: every complete one failed to load")
