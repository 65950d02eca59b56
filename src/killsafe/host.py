"""What this host's operating system answers: live processes, durable directories.

The store's lock, the lease, the journal, the run directory and the
distributed writer all ask these questions; they are answered here once.
Background threads (the saver's writer, the mirror's uploads) lower their
own priority here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from pathlib import Path

__all__ = [
    "BACKGROUND_NICE",
    "fsync_directory",
    "lower_this_threads_priority",
    "pid_alive",
    "this_host",
]

BACKGROUND_NICE = 10  # background writers and uploads give way to the loop's threads


def this_host() -> str:
    """The host name recorded next to a pid."""
    return socket.gethostname()


def pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]`` on Linux), or ``""`` where the
    system does not say.

    Pids compare only within one namespace: the containers of a pod share a
    host name, each with pids of its own (often 1), so a pid seen from another
    container says nothing of whether its process lives.
    """
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


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


def lower_this_threads_priority(nice: int = BACKGROUND_NICE) -> None:
    """Let the loop's threads win the CPU over this thread (and the threads it starts).

    On Linux a nice value is per thread and inherited by threads it creates;
    elsewhere this does nothing.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
