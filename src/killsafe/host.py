"""What this host's operating system answers: live processes, durable directories.

The store's lock, the lease, the journal, the run directory and the
distributed writer all ask these two questions; they are answered here once.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

__all__ = ["fsync_directory", "pid_alive", "this_host"]


def this_host() -> str:
    """The host name recorded next to a pid."""
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host.

    0 and negative numbers are never a process (``kill`` would read them as
    process groups), so they are not alive.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    fd = os.open(Path(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
