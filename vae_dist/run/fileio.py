"""Atomic file writes (a temp file in the same folder, fsync, rename); lines to stdout and stderr.

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
        _silence(sys.stdout)
        if required:
            raise OutputError(f"cannot write to standard output ({e.strerror or e})") from None


def print_err(text: str) -> None:
    """Print a status or error line to stderr. A stderr that cannot take it (closed, a full
    device) costs the line, never the run, and never the exit status the caller sets."""
    try:
        sys.stderr.write(text + "\n")  # one write: lines from ranks sharing a terminal stay whole
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # full or gone; closed; None
        _silence(sys.stderr)


def flush_or_silence(stream: object) -> None:
    """Flush ``stream`` now; if it cannot take what it holds, point it at /dev/null. Python
    flushes stdout and stderr once more at exit, and a failure there prints a traceback or
    turns the exit status into 120."""
    try:
        stream.flush()  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        _silence(stream)


def _silence(stream: object) -> None:
    """Point a standard stream's descriptor at /dev/null, so that what it still buffers, and
    all it is given later, is dropped instead of failing again (at exit, with a traceback)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # type: ignore[attr-defined]
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def open_standard_streams() -> None:
    """Give a standard descriptor that was closed at start (``2>&-``) /dev/null, and its
    Python stream (None then) a writer on it. Else the first file the run opens gets that
    number, and whatever writes to stderr (a library's C++ warnings) writes into it."""
    for fd, name, mode in ((0, "stdin", os.O_RDONLY), (1, "stdout", os.O_WRONLY), (2, "stderr", os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            got = os.open(os.devnull, mode)  # the lowest free number: this one
            if got != fd:
                os.close(got)
                continue
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))
