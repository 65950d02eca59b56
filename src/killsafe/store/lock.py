"""One writer per store: an ``flock`` on ``.lock`` that records its holder.

The lock is taken at a store's first mutating call and held until it is
closed; readers never lock. A forked child drops its inherited copy at
once, so a killed parent's lock dies with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from killsafe.errors import KillsafeError, StoreLocked
from killsafe.host import pid_alive
from killsafe.store.failures import io_error

__all__ = ["DEAD_HOLDER_GRACE_SECONDS", "LOCK_NAME", "StoreLock"]

log = logging.getLogger("killsafe.store")

LOCK_NAME = ".lock"
DEAD_HOLDER_GRACE_SECONDS = 5.0
"""How long a writer waits for a lock whose recorded holder is dead (see ``_lock_or_wait``)."""


def _lock_error(path: Path, exc: OSError) -> KillsafeError:
    return io_error("locking the checkpoint store at", path, exc)


_HELD_LOCKS: weakref.WeakSet[StoreLock] = weakref.WeakSet()


def _close_locks_in_child() -> None:
    """In a forked child, drop the inherited lock descriptors at once.

    A flock belongs to the open file, shared by every process holding a copy
    of the descriptor: a child (the fork writer, a data loader worker) would
    otherwise keep the store locked after its parent was killed. Closing the
    copy (never ``LOCK_UN``, which would unlock the parent too) leaves the
    lock to the parent alone.
    """
    for lock in list(_HELD_LOCKS):
        fd, lock.fd = lock.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD_LOCKS.clear()


_fork_hook = threading.Lock()
_fork_hook_registered = False


def _hold(lock: StoreLock) -> None:
    """Remember a held lock, so forked children drop their copy of it."""
    global _fork_hook_registered
    with _fork_hook:
        if not _fork_hook_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_close_locks_in_child)
            _fork_hook_registered = True
    _HELD_LOCKS.add(lock)


class StoreLock:
    """The write lock of the store at ``directory``; ``fd`` is set while held."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self) -> bool:
        """Take the lock unless held; True when it was taken now.

        Every failure leaves no descriptor open and no lock held, so a later
        call (after the disk was freed, say) starts afresh.
        """
        if self.fd is not None:
            return False
        path = self.directory / LOCK_NAME
        fd = self._open_lock_file(path)
        try:
            self._lock_or_wait(fd)
            self._write_holder(fd, path)
        except BaseException:
            os.close(fd)  # also drops the flock, if it was taken
            raise
        self.fd = fd
        _hold(self)
        return True

    def release(self) -> None:
        """Clear the holder record and drop the lock (if held)."""
        if self.fd is None:
            return
        _HELD_LOCKS.discard(self)
        try:
            with contextlib.suppress(OSError):  # the record is advisory
                os.ftruncate(self.fd, 0)
        finally:
            os.close(self.fd)
            self.fd = None

    def _open_lock_file(self, path: Path) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error("creating the checkpoint store", self.directory, exc) from exc
        try:
            # O_NOFOLLOW: a planted symlink must not redirect the lock record.
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _lock_error(path, exc) from exc

    def _lock_or_wait(self, fd: int) -> None:
        """Take the flock; wait while the recorded holder is dead.

        A dead holder's flock outlives it only in a child it forked that has
        not yet dropped its copy of the descriptor (children close it at once,
        see ``_close_locks_in_child``): that lasts a moment, so a restart right
        after a kill waits for it instead of failing.
        """
        deadline = time.monotonic() + DEAD_HOLDER_GRACE_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise _lock_error(self.directory / LOCK_NAME, exc) from exc
            holder = self._read_holder(fd)
            pid = holder.get("pid")
            elsewhere = holder.get("host", socket.gethostname()) != socket.gethostname()
            alive = elsewhere or (isinstance(pid, int) and pid_alive(pid))
            if alive or time.monotonic() > deadline:
                state = "" if alive or pid is None else " (no longer running)"
                raise StoreLocked(
                    f"checkpoint store {self.directory} is being written by pid "
                    f"{holder.get('pid', '?')}{state} on host {holder.get('host', '?')}; "
                    "stop that process or use another directory"
                )
            time.sleep(0.01)

    def _write_holder(self, fd: int, path: Path) -> None:
        # A flock dies with its process, so whatever the file says about an
        # earlier holder is stale now: we take the lock over.
        previous = self._read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            log.info("taking over the lock of %s from pid %s", self.directory, previous.get("pid"))
        record = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        ).encode()
        try:
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, len(record))
        except OSError as exc:
            raise _lock_error(path, exc) from exc

    @staticmethod
    def _read_holder(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
