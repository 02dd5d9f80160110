"""Checkpoints: atomic save, find the newest complete one, fall back past corrupt ones, rotate.

A checkpoint is a folder ``checkpoints/step-<global step>`` holding what
``accelerator.save_state`` writes (model, optimizer, every rank's RNG states) plus
``MANIFEST.json``: the run position (epoch, batches done, global step, partial-epoch
sums, metric history, W&B run id) and the size of every file. The manifest is written
last, into a temporary folder that is renamed into place only when complete, so a
folder without one is never loaded, and the position never comes from a folder name.

Accelerate's own automatic checkpoint naming is not used: it does not restore its
counter on load and can overwrite an old folder that a later resume then picks up.
"""

from __future__ import annotations

import json
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
FORMAT = 1
# Test hook: SIGKILL the main process half-way through the N-th checkpoint write
# (after the state files, before the manifest), to prove a torn checkpoint is never used.
KILL_HOOK_ENV = "VAE_DIST_TEST_KILL_IN_CHECKPOINT"


@dataclass(frozen=True)
class Found:
    path: Path
    global_step: int
    state: dict[str, Any]


def rotation_plan(complete: dict[str, int], keep: int) -> list[str]:
    """Which complete checkpoints to delete: all but the ``keep`` with the highest step.

    Pure: takes {folder name: global step}, returns names to delete, newest kept.
    Ties (the same step saved twice) keep the lexically last name.
    """
    ordered = sorted(complete.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
    return [name for name, _ in ordered[keep:]]


def read_manifest(folder: Path) -> Optional[dict[str, Any]]:
    """The manifest of a complete, intact checkpoint folder, else None.

    Intact means every listed file exists with its recorded size: a truncated file
    (a kill mid-write, a full disk) is caught here before anything is loaded.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            return None
        for rel, size in manifest["files"].items():
            if (folder / rel).stat().st_size != size:
                return None
        int(manifest["global_step"])
        dict(manifest["state"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # AttributeError: JSON not an object
        return None


class Checkpointer:
    """Saves and restores the full training state through Accelerate, atomically."""

    def __init__(self, accelerator: Accelerator, directory: Path, keep: int, log: Callable[[str], None] = print):
        self.accelerator = accelerator
        self.directory = directory
        self.keep = keep
        self.log = log
        self.saves = 0

    def _sealed_folders(self) -> list[Path]:
        """Checkpoint folders that are not unfinished writes (those keep the .tmp- prefix)."""
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)]

    def complete(self) -> list[Found]:
        """Complete, intact checkpoints, newest first."""
        found = []
        for p in self._sealed_folders():
            m = read_manifest(p)
            if m is not None:
                found.append(Found(p, int(m["global_step"]), m["state"]))
        return sorted(found, key=lambda f: (f.global_step, f.path.name), reverse=True)

    def save(self, global_step: int, state: dict[str, Any]) -> Path:
        """Write a checkpoint from every rank; returns its final folder. Collective."""
        acc = self.accelerator
        t0 = time.perf_counter()
        name = f"step-{global_step:09d}"
        final = self.directory / name
        tmp = self.directory / f"{TMP_PREFIX}{name}"

        def make_tmp() -> None:
            if tmp.exists():  # left by a killed run: ours by its name, never complete
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        on_main_then_share(acc, make_tmp)
        # Model, optimizer and each rank's RNG states; ranks write their own files.
        acc.save_state(output_dir=str(tmp), safe_serialization=True)
        acc.wait_for_everyone()
        self.saves += 1

        def seal() -> None:
            if os.environ.get(KILL_HOOK_ENV) == str(self.saves):
                os.kill(os.getpid(), signal.SIGKILL)
            files = {
                str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            manifest = {"format": FORMAT, "global_step": global_step, "files": files, "state": state}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            replaced = None
            if final.exists():
                # The same step saved again (a stop right after a checkpoint): move the old
                # one aside under a name complete() still accepts, so a kill between the
                # two renames leaves a complete checkpoint either way.
                replaced = final.with_name(final.name + "-replaced")
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

        on_main_then_share(acc, seal)
        self.log(f"checkpoint {final} written in {time.perf_counter() - t0:.2f} s")
        return final

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
            error = None
            try:
                self.accelerator.load_state(str(found.path))
            except Exception as e:  # corrupt archive, wrong shapes, ...
                error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if not any_rank(self.accelerator, error is not None):
                return found
            nxt = candidates[i + 1].path.name if i + 1 < len(candidates) else None
            self.log(
                f"checkpoint {found.path.name} is unusable ({error or 'failed on another rank'}); "
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
