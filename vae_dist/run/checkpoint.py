"""Checkpoints: sealed saves, the newest usable one, fallback past corrupt ones, rotation.

A checkpoint is ``checkpoints/step-<global step>``: what ``accelerator.save_state`` writes
plus ``MANIFEST.json`` (the caller's state, the run's id, every file's size and SHA-256),
written last into a temporary folder that one rename puts in place. A folder without a
manifest of the exact schema is never loaded, and the position never comes from a name.
A folder is one of this run's checkpoints only if its manifest holds the run's id and it is
named after its step: rotation deletes only those, never a copy such as ``checkpoints/my-backup``.
(Accelerate's automatic naming does not restore its counter on load, so it is not used.)
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Generic, Literal, Optional, TypeVar

from accelerate import Accelerator
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError

from vae_dist.training.distributed import any_rank, on_main_then_share
from vae_dist.errors import CheckpointError, first_line
from vae_dist.run.fileio import atomic_write
from vae_dist.run.folder import RUN_ID, is_run_id

MANIFEST = "MANIFEST.json"
TMP_PREFIX = ".tmp-"
# Where a save of a step already saved moves the previous one until the new one is in place.
REPLACED = "-replaced"
FORMAT = 3  # 3: the run id in every manifest
# Test hook: SIGKILL the main process half-way through the N-th checkpoint write
# (after the state files, before the manifest), to prove a torn checkpoint is never used.
KILL_HOOK_ENV = "VAE_DIST_TEST_KILL_IN_CHECKPOINT"

# The state's schema; it has a global_step, the step the checkpoint is of.
S = TypeVar("S", bound=BaseModel)


def _inside(rel: str) -> str:
    path = Path(rel)
    if "\x00" in rel or not path.parts or path.is_absolute() or ".." in path.parts:
        raise ValueError("must be a relative path inside the checkpoint folder")
    return rel


RelPath = Annotated[str, AfterValidator(_inside)]
Size = Annotated[int, Field(ge=0)]


class Manifest(BaseModel, Generic[S]):
    model_config = ConfigDict(strict=True, extra="forbid")

    format: Literal[FORMAT]  # a format no release wrote, earlier or later, is unusable
    global_step: Size
    run_id: Annotated[str, Field(pattern=f"^{RUN_ID}$")]  # the run that wrote it: only its own are rotated or resumed
    files: Annotated[dict[RelPath, Size], Field(min_length=1)]
    sha256: dict[RelPath, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]]
    state: S

    @model_validator(mode="after")
    def _consistent(self) -> Manifest[S]:
        if set(self.sha256) != set(self.files):
            raise ValueError("every file, and only those, must have a SHA-256")
        if self.state.global_step != self.global_step:  # type: ignore[attr-defined]
            raise ValueError("the state is of another step")
        return self


@dataclass(frozen=True)
class Found(Generic[S]):
    path: Path
    manifest: Manifest[S]


def rotation_plan(complete: dict[str, int], keep: int) -> list[str]:
    """The names, of {folder name: global step}, to delete: all but the ``keep`` with the
    highest step (ties keep the lexically last name)."""
    ordered = sorted(complete.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    return [name for name, _ in ordered[keep:]]


def read_manifest(folder: Path, schema: type[S]) -> Optional[Manifest[S]]:
    """The manifest of a complete, intact checkpoint folder, else None. Intact: every listed
    file is there with its recorded size (the hashes, which need every byte read, are
    checked when loading)."""
    try:
        manifest = Manifest[schema].model_validate_json((folder / MANIFEST).read_bytes())  # type: ignore[valid-type]
        intact = all(
            not (folder / rel).is_symlink() and (folder / rel).stat().st_size == size
            for rel, size in manifest.files.items()
        )
    except (OSError, ValueError):  # a ValidationError is a ValueError: bad JSON, bad UTF-8, another shape
        return None
    return manifest if intact else None


def folder_name(global_step: int) -> str:
    """Where a save of ``global_step`` puts its checkpoint, under the checkpoint folder."""
    return f"step-{global_step:09d}"


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
            got = file_sha256(folder / rel)
        except OSError as e:
            return f"{rel} cannot be read: {e.strerror or e}"
        if got != want:
            return f"{rel} does not match its SHA-256 (corrupt bytes)"
    return None


def _disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has no room left."""
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize < (1 << 20)
    return False


def _write_error(action: str, path: Path, e: Exception) -> CheckpointError:
    if isinstance(e, OSError):
        full, why = e.errno in (errno.ENOSPC, errno.EDQUOT), e.strerror or str(e)
    else:  # torch's or safetensors' own error for a failed write: it keeps no errno
        why = first_line(e) or type(e).__name__
        full = "no space left" in why.lower() or _disk_full(path)
    return CheckpointError(f"cannot {action} checkpoint {path}: {why}{' (the disk is full)' if full else ''}")


class Checkpointer(Generic[S]):
    """Saves and restores the full training state through Accelerate, atomically; the
    caller's state is saved and read back with ``schema``."""

    def __init__(
        self, accelerator: Accelerator, directory: Path, keep: int, log: Callable[[str], None] = print,
        every_steps: int = 0, *, schema: type[S], run_id: str,
    ):
        if not is_run_id(run_id):  # it names folders to delete: never a path
            raise ValueError(f"not a run id: {run_id!r}")
        self.accelerator = accelerator
        self.directory = directory
        self.keep = keep
        self.log = log
        self.every_steps = every_steps
        self.schema = schema
        self.run_id = run_id
        self.saves = 0
        # Ours, but failed to load (same-size corruption): never counted as a kept one.
        self.corrupt: set[str] = set()

    def maybe_save(self, global_step: int, mid_epoch: bool, state: Callable[[], S]) -> Optional[Path]:
        """Save every ``every_steps`` steps, mid-epoch (an epoch's end has its own save);
        ``state`` (a collective) is called only then. Every rank calls this."""
        if self.every_steps and global_step % self.every_steps == 0 and mid_epoch:
            return self.save(global_step, state())
        return None

    def _sealed_folders(self) -> list[Path]:
        """Checkpoint folders but unfinished writes; never a link (nothing is loaded or deleted through one)."""
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir()
                if p.is_dir() and not p.is_symlink() and not p.name.startswith(TMP_PREFIX)]

    def _is_ours(self, found: Found[S]) -> bool:
        """Written by this run, at a name its save gives: its step's, or that with REPLACED."""
        name = folder_name(found.manifest.global_step)
        return found.manifest.run_id == self.run_id and found.path.name in (name, name + REPLACED)

    def complete(self) -> list[Found[S]]:
        """This run's complete, intact checkpoints, newest first."""
        found = [Found(p, m) for p in self._sealed_folders() if (m := read_manifest(p, self.schema)) is not None]
        ours = [f for f in found if self._is_ours(f)]
        return sorted(ours, key=lambda f: (f.manifest.global_step, f.path.name), reverse=True)

    def remove_leftovers(self) -> None:
        """Main process: delete this run's unfinished writes (a kill, a second Ctrl-C)."""
        if not self.directory.is_dir() or self.directory.is_symlink():
            return
        for p in self.directory.iterdir():
            if re.fullmatch(rf"{re.escape(TMP_PREFIX)}step-\d{{9,}}-{self.run_id}", p.name) and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    def save(self, global_step: int, state: S) -> Path:
        """Write a checkpoint from every rank; returns its folder. Collective: a write that
        fails on any rank (a full disk) is one CheckpointError on every rank."""
        acc = self.accelerator
        t0 = time.perf_counter()
        final = self.directory / folder_name(global_step)
        tmp = self.directory / f"{TMP_PREFIX}{final.name}-{self.run_id}"  # the id proves an unfinished write ours

        def make_tmp() -> None:
            for p in (self.directory, tmp, final):
                if p.is_symlink():
                    raise CheckpointError(f"{p} is a symbolic link; vae_dist does not write through links")
            try:
                self.remove_leftovers()  # this run's interrupted saves, never complete
                if tmp.exists():  # this save's own name
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            except OSError as e:
                raise _write_error("start", tmp, e) from None

        on_main_then_share(acc, make_tmp)
        # Model, optimizer and each rank's RNG states; ranks write their own files.
        error: Optional[Exception] = None
        try:
            acc.save_state(output_dir=str(tmp), safe_serialization=True)
        # torch's writer and safetensors report a failed write (a full disk) as their own
        # errors, not as an OSError: "unexpected pos ...", "No space left on device".
        except (OSError, RuntimeError, SafetensorError) as e:
            error = e
        if any_rank(acc, error is not None):
            # Said before the torn files go: their space freed, a full disk would not show.
            failure = _write_error("write", tmp, error) if error else CheckpointError(
                f"cannot write checkpoint {tmp}: another process failed to write its part"
            )
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

    def _seal(self, tmp: Path, final: Path, global_step: int, state: S) -> None:
        """Manifest last, then the rename that makes the checkpoint complete; then rotation."""
        if os.environ.get(KILL_HOOK_ENV) == str(self.saves):
            os.kill(os.getpid(), signal.SIGKILL)
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        # Validated as it will be read back (the state from its dump, not taken as it is),
        # so that a state the reader would refuse fails here rather than at a resume.
        manifest = Manifest[self.schema](  # type: ignore[name-defined]
            format=FORMAT, global_step=global_step, run_id=self.run_id, state=state.model_dump(),
            files={str(p.relative_to(tmp)): p.stat().st_size for p in paths},
            sha256={str(p.relative_to(tmp)): file_sha256(p) for p in paths},
        )
        text = manifest.model_dump_json(indent=1) + "\n"
        atomic_write(tmp / MANIFEST, lambda f: f.write(text.encode()))
        replaced = None
        if final.exists():
            # The same step saved again (a stop right after a checkpoint): move the old
            # one aside under a name complete() still accepts, so a kill between the
            # two renames leaves a complete checkpoint either way.
            replaced = final.with_name(final.name + REPLACED)
            if replaced.is_symlink():
                raise CheckpointError(f"{replaced} is a symbolic link; vae_dist does not write through links")
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final, replaced)
        os.replace(tmp, final)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        with contextlib.suppress(OSError):  # the rename is durable once the directory entry is on disk
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        # Old ones go only now that the new one is complete. One known corrupt is not a
        # kept one: it is ours, so it goes with the others beyond ``keep``.
        complete = {f.path.name: f.manifest.global_step for f in self.complete()}
        good = {name: step for name, step in complete.items() if name not in self.corrupt}
        for old in rotation_plan(good, self.keep) + sorted(set(complete) - set(good)):
            shutil.rmtree(self.directory / old, ignore_errors=True)
            self.corrupt.discard(old)

    def _try_load(self, found: Found[S]) -> Optional[str]:
        """Load one checkpoint on every rank; None if all succeeded, else why not. Every rank
        checks the bytes it is about to read (same-size corruption would load without a
        word), and the ranks agree before any of them loads: all load or all skip."""
        acc = self.accelerator
        error = verify_hashes(found.path, found.manifest)
        if any_rank(acc, error is not None):
            return error or "corrupt on another rank"
        try:
            acc.load_state(str(found.path))
        except Exception as e:  # corrupt archive, wrong shapes, ...
            error = f"{type(e).__name__}: {first_line(e)}"
        if any_rank(acc, error is not None):
            return error or "failed on another rank"
        return None

    def load_latest(self) -> Optional[Found[S]]:
        """Restore the newest usable checkpoint into the prepared objects; None if there is
        none. One that fails to load is said in one line and the previous one is tried.
        Accelerate reads the optimizer and RNG files with ``torch.load(weights_only=True)``
        and the model through safetensors: nothing is unpickled as code."""
        candidates = self.complete()
        # A checkpoint's folder that fails the size check (truncated, a file missing) or is
        # another run's is said, not skipped silently; a user's folder there is not ours to judge.
        good = {f.path.name for f in candidates}
        broken = sorted(p.name for p in self._sealed_folders() if p.name not in good and p.name.startswith("step-"))
        for name in broken:
            self.log(f"checkpoint {name} is unusable (no valid manifest of this run, or a file is missing or of the wrong size); skipping it")
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
                on_main_then_share(self.accelerator, self.remove_leftovers)
                return found
            self.corrupt.add(found.path.name)
            nxt = candidates[i + 1].path.name if i + 1 < len(candidates) else None
            self.log(
                f"checkpoint {found.path.name} is unusable ({error}); "
                + (f"falling back to {nxt}" if nxt else "no older checkpoint left")
            )
        raise CheckpointError(f"no usable checkpoint in {self.directory}: every complete one failed to load")
