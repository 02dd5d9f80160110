"""Atomic file writes (a temp file in the same folder, fsync, rename) and lines to stdout.

Readers, and a run killed at any moment, see the old file or the new one, never half a
file. ``os.replace`` is atomic only within one filesystem, hence the same folder.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from vae_dist.errors import OutputError, VaeDistError


@contextmanager
def checking(path: str | os.PathLike[str], error: type[VaeDistError], what: str) -> Iterator[None]:
    """Wrap the file-system checks of one input path (``is_dir()``, ``is_file()``,
    ``exists()``, ``is_symlink()``, ``stat()``, listing a folder): an OSError they raise
    becomes one ``error`` line naming ``what``, the path and the cause.

    Python 3.11's pathlib answers False only for a path that is not there; a name too long
    (ENAMETOOLONG) or a folder that may not be searched (EACCES) raises instead. Keep the
    block to checks: an OSError from a write or a read belongs to its own message."""
    try:
        yield
    except OSError as e:
        raise error(f"{what} {path} cannot be checked: {e.strerror or e}") from None


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Create parent folders, call ``write(file)`` on a temp file, then rename it to ``path``.

    A symbolic link at ``path`` is refused (OSError ELOOP), not replaced: vae_dist never
    writes through, or over, a link it did not make. The temp file gets a fresh name
    (O_EXCL), so no planted file or link of that name is ever opened."""
    target = Path(path)
    if target.is_symlink():
        raise OSError(errno.ELOOP, "is a symbolic link; not replaced", str(target))
    # Renaming over a FIFO or a device node would replace it (as root, /dev/null itself).
    if target.exists() and not target.is_file():
        raise OSError(errno.EEXIST, "exists and is not a regular file; not replaced", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: leave no debris.
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def print_out(text: str, *, required: bool = True) -> None:
    """Print a line to stdout. When stdout cannot take it (closed, a full device, a reader
    that has gone), a command whose output is its result fails with one line
    (OutputError); a run's status lines (``required=False``) are
    dropped, since the run's files, not its log, are what it makes."""
    try:
        print(text, flush=True)
    except OSError as e:
        try:  # else Python's own flush at exit reports the same failure with a traceback
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        if required:
            raise OutputError(f"cannot write to standard output ({e.strerror or e})") from None
