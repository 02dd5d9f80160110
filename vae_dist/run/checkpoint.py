"""Checkpoints: ``step-<global step>`` folders of ``accelerator.save_state``'s files, sealed by a MANIFEST.json (the
Position, run id, sizes, SHA-256s) and a rename; only this run's are loaded or rotated, skipping corrupt ones."""

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
from vae_dist.run.fileio import atomic_write, read_record
from vae_dist.run.folder import RUN_ID, is_run_id
from vae_dist.run.position import Count, Position
from vae_dist.training.distributed import any_rank, on_main_then_share

MANIFEST = "MANIFEST.json"
TMP_PREFIX = ".tmp-"
REPLACED = "-replaced"  # the suffix a step's checkpoint has while that step is saved again
FORMAT = 3  # 3: the run id in every manifest
# Test hook: SIGKILL the main process after the N-th save's state files, before its manifest.
KILL_HOOK_ENV = "VAE_DIST_TEST_KILL_IN_CHECKPOINT"


class Manifest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    format: Literal[FORMAT]  # a format no release wrote, earlier or later, is unusable
    global_step: Count
    run_id: Annotated[str, Field(pattern=f"^{RUN_ID}$")]  # the run that wrote it: only its own are rotated or resumed
    files: Annotated[dict[str, Count], Field(min_length=1)]  # relative paths inside the folder
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
    """The names of {folder name: global step} to delete: all but the ``keep`` highest steps (ties: last name)."""
    return sorted(complete, key=lambda name: (complete[name], name), reverse=True)[keep:]


def read_manifest(folder: Path) -> Optional[Manifest]:
    """The manifest of a complete folder whose files all have their recorded sizes, else None (hashes: at load)."""
    try:
        manifest = Manifest.model_validate_json(read_record(folder / MANIFEST))
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
        self.every_steps, self.run_id, self.saves = every_steps, run_id, 0
        self.last: Optional[Path] = None  # the newest this run saved or resumed from (not one that failed to load)

    def maybe_save(self, global_step: int, mid_epoch: bool, state: Callable[[], Position]) -> Optional[Path]:
        """Every rank: save every ``every_steps`` steps mid-epoch; ``state`` (a collective) is called only then."""
        due = self.every_steps and global_step % self.every_steps == 0 and mid_epoch
        return self.save(global_step, state()) if due else None

    def _folders(self) -> list[Path]:
        return [p for p in self.directory.glob("step-*") if p.is_dir() and not p.is_symlink()]  # nothing through links

    def complete(self) -> list[Found]:
        """This run's complete, intact checkpoints, newest first; each at the name its save gives."""
        found = [Found(p, m) for p in self._folders() if (m := read_manifest(p)) is not None
                 and m.run_id == self.run_id and p.name.removesuffix(REPLACED) == f"step-{m.global_step:09d}"]
        return sorted(found, key=lambda f: (f.manifest.global_step, f.path.name), reverse=True)

    def remove_leftovers(self) -> None:
        """Main process: delete this run's unfinished writes (a kill, a second Ctrl-C)."""
        if self.directory.is_symlink():  # a link at tmp or final is renamed or refused, never followed
            raise CheckpointError(f"{self.directory} is a symbolic link; vae_dist does not write through links")
        for p in self.directory.glob(f"{TMP_PREFIX}step-*-{self.run_id}"):
            shutil.rmtree(p, ignore_errors=True)  # refuses a link, not following it

    def save(self, global_step: int, state: Position) -> Path:
        """Collective: write a checkpoint, returning its folder; a failure on any rank is one CheckpointError on all."""
        acc, t0 = self.accelerator, time.perf_counter()
        final = self.directory / f"step-{global_step:09d}"
        tmp = self.directory / f"{TMP_PREFIX}{final.name}-{self.run_id}"  # the id proves an unfinished write ours
        on_main_then_share(acc, lambda: self._start(tmp))
        error: Optional[Exception] = None
        try:  # torch's writer and safetensors report a failed write (a full disk) as their own errors
            acc.save_state(output_dir=str(tmp), safe_serialization=True)
        except (OSError, RuntimeError, SafetensorError) as e:
            error = e
        if any_rank(acc, error is not None):  # also the barrier after every rank's files
            # Said before the torn files go: their space freed, a full disk would not show.
            failure = _write_error("write", tmp, error) if error else CheckpointError(
                f"cannot write checkpoint {tmp}: another process failed to write its part")
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise failure from None
        self.saves += 1
        on_main_then_share(acc, lambda: self._seal(tmp, final, global_step, state))
        self.last = final
        self.log(f"checkpoint {final} written in {time.perf_counter() - t0:.2f} s")
        return final

    def _start(self, tmp: Path) -> None:
        try:
            self.remove_leftovers()  # this run's interrupted saves, this one's name among them
            tmp.mkdir(parents=True)
        except OSError as e:
            raise _write_error("start", tmp, e) from None

    def _seal(self, tmp: Path, final: Path, global_step: int, state: Position) -> None:
        """The manifest last, then the rename that makes the checkpoint complete; then rotation."""
        if os.environ.get(KILL_HOOK_ENV) == str(self.saves):
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            files = {str(p.relative_to(tmp)): p for p in sorted(tmp.rglob("*")) if p.is_file()}
            # Validated from the state's dump, as it will be read back: a state the reader refuses fails here.
            manifest = Manifest(format=FORMAT, global_step=global_step, run_id=self.run_id, state=state.model_dump(),
                                files={rel: p.stat().st_size for rel, p in files.items()},
                                sha256={rel: file_sha256(p) for rel, p in files.items()})
            atomic_write(tmp / MANIFEST, lambda f: f.write(manifest.model_dump_json(indent=1).encode() + b"\n"))
            # The same step saved again (a stop right after a checkpoint): the old one waits under a name complete()
            # accepts, so a kill between the renames leaves a complete one. A link at ``old`` is an OSError.
            old = final.with_name(final.name + REPLACED)
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error("complete", final, e) from None
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):  # the rename is durable once the directory entry is on disk
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        # Old ones go only now. One newer than this save failed to load at the resume: it is not a kept one.
        complete = {f.path.name: f.manifest.global_step for f in self.complete()}
        kept = {name: step for name, step in complete.items() if step <= global_step}
        for name in rotation_plan(kept, self.keep) + sorted(complete.keys() - kept.keys()):
            shutil.rmtree(self.directory / name, ignore_errors=True)

    def load_latest(self, check: Callable[[], Optional[str]] = lambda: None) -> Optional[Found]:
        """Restore the newest usable checkpoint (None if none); one that fails to load, or whose loaded state fails
        ``check`` (its problem, else None), is said in one line and the previous one tried. Accelerate loads with
        ``weights_only=True`` and safetensors: nothing is unpickled."""
        candidates = self.complete()
        good = {f.path.name for f in candidates}  # the other step-* folders are said, never judged silently
        broken = sorted(p.name for p in self._folders() if p.name not in good)
        for name in broken:
            self.log(f"checkpoint {name} is unusable (no valid manifest of this run, or a file resized); skipping it")
        if not candidates:
            if broken:
                raise CheckpointError(f"no usable checkpoint in {self.directory}: "
                                      f"{', '.join(broken)} failed the integrity check")
            if torn := ", ".join(p.name for p in self.directory.glob(f"{TMP_PREFIX}*")):
                raise CheckpointError(f"no complete checkpoint in {self.directory} (only unfinished: {torn})")
            return None
        for found, older in zip(candidates, [*candidates[1:], None]):
            # Every rank checks the bytes it reads (same-size corruption loads silently); all load or all skip.
            error = verify_hashes(found.path, found.manifest)
            if not any_rank(self.accelerator, error is not None):
                try:
                    self.accelerator.load_state(str(found.path))
                    error = check()
                except Exception as e:  # corrupt archive, wrong shapes, ...
                    error = f"{type(e).__name__}: {first_line(e)}"
                if not any_rank(self.accelerator, error is not None):
                    on_main_then_share(self.accelerator, self.remove_leftovers)
                    self.last = found.path
                    return found
            then = f"falling back to {older.path.name}" if older else "no older checkpoint left"
            self.log(f"checkpoint {found.path.name} is unusable ({error or 'failed on another rank'}); {then}")
        raise CheckpointError(f"no usable checkpoint in {self.directory}: every complete one failed to load")
