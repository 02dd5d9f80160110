"""JSON as vae_dist writes it, atomic file writes, and lines to stdout and stderr that a full or closed stream
cannot make fatal."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from vae_dist.errors import OutputError, VaeDistError


def dumps(obj: Any, **kw: Any) -> str:
    """JSON as every file and result vae_dist writes holds it: a non-finite number (a diverged metric) is null,
    never the NaN or Infinity that json.dumps writes and JSON readers refuse."""
    return json.dumps(json.loads(json.dumps(obj), parse_constant=lambda _: None), allow_nan=False, **kw)


MAX_RECORD_BYTES = 1 << 20  # a config, a run's marker or a manifest is kilobytes; more is not one (or is /dev/zero)


def read_record(path: str | os.PathLike[str]) -> bytes:
    """A small file read whole (a config, a run's marker, a checkpoint's manifest); a ValueError saying why it is not
    one: a FIFO or device would block the open or never end, and a huge file would fill the memory."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError("not a regular file")
    with open(path, "rb") as f:
        raw = f.read(MAX_RECORD_BYTES + 1)
    if len(raw) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES:,} bytes")
    return raw


def loads_record(text: str | bytes) -> Any:
    """A record's JSON (read_record's bytes, a model file's metadata entry), as bounded; nested too deeply for the
    parser (a RecursionError, not a ValueError) is refused as the ValueError of a bad one."""
    if len(text) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES:,} bytes")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


@contextlib.contextmanager
def checking(path: str | os.PathLike[str], error: type[VaeDistError], what: str) -> Iterator[None]:
    """Around the checks of one input path (``is_dir()``, listing...): an OSError is one ``error`` line (pathlib
    raises for a name too long or a folder not searchable). Only checks: a read or a write has its own message."""
    try:
        yield
    except OSError as e:
        raise error(f"{what} {path} cannot be checked: {e.strerror or e}") from None


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` to a temp file beside ``path``, fsync, rename: readers and a run killed at any moment see the old
    file or the new one. A link, FIFO or device at ``path`` is refused (OSError), never written through or replaced."""
    target = Path(path)
    if target.is_symlink() or target.exists() and not target.is_file():  # as root, a rename would replace /dev/null
        raise OSError(errno.EEXIST, "is a link or not a regular file; not replaced", str(target))
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
    """Print a line to stdout. If stdout cannot take it (closed, full, reader gone), a command's result fails with one
    line (OutputError); a run's status line (``required=False``) is dropped: the run's files are what it makes."""
    try:
        print(text, flush=True)
    except OSError as e:
        flush_or_silence(sys.stdout)  # fails again, and silences it
        if required:
            raise OutputError(f"cannot write to standard output ({e.strerror or e})") from None


def print_err(text: str) -> None:
    """A line to stderr in one write (ranks sharing a terminal keep it whole); a failing stderr costs only the line."""
    flush_or_silence(sys.stderr, text + "\n")


def flush_or_silence(stream: Any, text: str = "") -> None:
    """Write ``text`` and flush. A stream that cannot (full, gone, closed, None) gets /dev/null from then on: Python
    flushes stdout and stderr at exit, where a failure prints a traceback or turns the exit status into 120."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, AttributeError):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd, devnull = stream.fileno(), os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


def open_standard_streams() -> None:
    """Give a standard descriptor closed at start (``2>&-``) /dev/null, and its Python stream (None) a file on it:
    else the first file the run opens gets that number, and whatever writes to stderr writes into it."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number, this one: the lower ones are open
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))
