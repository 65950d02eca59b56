"""A failed write said in one typed line, with the free space when the disk is the cause."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from killsafe.errors import ConfigError, KillsafeError, SaveFailed
from killsafe.units import format_size

__all__ = ["free_space", "io_error"]

_SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def free_space(path: str | os.PathLike[str]) -> str:
    """The free space of the file system holding ``path`` (or its nearest parent), as text."""
    here = Path(path).absolute()
    for candidate in (here, *here.parents):
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        return format_size(free) + " free"
    return "free space unknown"


def io_error(what: str, path: Path, exc: OSError) -> KillsafeError:
    """A failed write as one typed line: ``SaveFailed`` when the disk is the cause, else
    ``ConfigError`` (a path that cannot hold files: a directory in the way, /proc...)."""
    reason = exc.strerror or str(exc)
    if exc.errno in _SPACE_ERRORS or exc.errno == errno.EIO:
        return SaveFailed(
            f"{what} {path} failed: {reason} ({free_space(path)}); "
            "free disk space or use another directory"
        )
    if exc.errno == errno.EISDIR:
        return ConfigError(f"{what} {path} failed: it is a directory; remove it")
    if exc.errno == errno.ELOOP:
        return ConfigError(f"{what} {path} failed: it is a symbolic link; remove it")
    return ConfigError(
        f"{what} {path} failed: {reason}; use a writable directory on a local file system"
    )
