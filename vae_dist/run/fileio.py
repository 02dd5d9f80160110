"""Atomic file writes, and lines to stdout and stderr that a full or closed stream cannot make fatal."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from vae_dist.errors import OutputError, VaeDistError


@contextlib.contextmanager
def checking(path: str | os.PathLike[str], error: type[VaeDistError], what: str) -> Iterator[None]:
    """Around the checks of one input path (``is_dir()``, ``exists()``, listing...): an OSError becomes
    one ``error`` line. Python 3.11's pathlib raises, not answers False, for a name too long or a
    folder that may not be searched. Keep the block to checks: a read or a write has its own message."""
    try:
        yield
    except OSError as e:
        raise error(f"{what} {path} cannot be checked: {e.strerror or e}") from None


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Create parent folders, call ``write(file)`` on a temp file in the same folder, fsync, rename it
    to ``path``: readers, and a run killed at any moment, see the old file or the new one. A link,
    FIFO or device at ``path`` is refused (OSError), never written through or replaced."""
    target = Path(path)
    if target.is_symlink():
        raise OSError(errno.ELOOP, "is a symbolic link; not replaced", str(target))
    if target.exists() and not target.is_file():  # a rename would replace it (as root, /dev/null itself)
        raise OSError(errno.EEXIST, "exists and is not a regular file; not replaced", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.urandom(8).hex()}.tmp")
    with open(tmp, "xb") as f:  # a fresh name, O_EXCL: no planted file or link is ever opened
        try:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:  # also on KeyboardInterrupt: leave no debris
            tmp.unlink(missing_ok=True)
            raise


def print_out(text: str, *, required: bool = True) -> None:
    """Print a line to stdout. If stdout cannot take it (closed, full, its reader gone), a command whose
    output is its result fails with one line (OutputError); a run's status lines (``required=False``)
    are dropped, since the run's files, not its log, are what it makes."""
    try:
        print(text, flush=True)
    except OSError as e:
        flush_or_silence(sys.stdout)  # fails again, and silences it
        if required:
            raise OutputError(f"cannot write to standard output ({e.strerror or e})") from None


def print_err(text: str) -> None:
    """A status or error line to stderr, in one write (lines of ranks sharing a terminal stay whole).
    A stderr that cannot take it costs the line, never the run nor the exit status the caller sets."""
    flush_or_silence(sys.stderr, text + "\n")


def flush_or_silence(stream: Any, text: str = "") -> None:
    """Write ``text`` and flush now. A stream that cannot (full, gone, closed, None) gets /dev/null for
    what it still buffers and all it is given later: Python flushes stdout and stderr once more at exit,
    and a failure there prints a traceback or turns the exit status into 120."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, AttributeError):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd, devnull = stream.fileno(), os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


def open_standard_streams() -> None:
    """Give a standard descriptor closed at start (``2>&-``) /dev/null, and its Python stream (None then)
    a file on it. Else the first file the run opens gets that number, and whatever writes to stderr
    (a library's C++ warnings) writes into it."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number, this one: the lower ones are open
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))
