"""Atomic file writes: a temp file in the same folder, fsync, rename.

Readers, and a run killed at any moment, see the old file or the new one, never half a
file. ``os.replace`` is atomic only within one filesystem, hence the same folder.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Create parent folders, call ``write(file)`` on a temp file, then rename it to ``path``.

    A symbolic link at ``path`` is refused (OSError ELOOP), not replaced: vae_dist never
    writes through, or over, a link it did not make. The temp file gets a fresh name
    (O_EXCL), so no planted file or link of that name is ever opened."""
    target = Path(path)
    if target.is_symlink():
        raise OSError(errno.ELOOP, "is a symbolic link; not replaced", str(target))
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
