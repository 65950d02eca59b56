"""Bytes in and out: untrusted files read safely, and buffers written fast.

Reading: regular files only, never through a symbolic link, never
blocking on a pipe, bounded by what the manifest recorded. Writing:
``writev`` straight from the buffers' memory, writeback started early,
fsync in the background.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap as mmap_module
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from killsafe.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    KillsafeError,
)

Where = Path | str
"""A checkpoint named in messages: its directory, or its URL on an object store."""
FastWrite = Callable[[int, list[memoryview]], bool]
"""A medium's faster way to fill a new, empty file (``O_DIRECT`` on a local disk):
it writes every buffer and returns True, or writes nothing and returns False."""
WRITE_CHUNK = 1 << 28  # stay far below Linux's 2 GiB per write() call
_IOV_MAX = 512


def chunked(buffers: Iterable[memoryview]) -> Iterator[memoryview]:
    for view in buffers:
        for start in range(0, view.nbytes, WRITE_CHUNK):
            yield view[start : start + WRITE_CHUNK]


def _libc_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2
_KICK_EVERY = 1 << 26


def write_buffers(fd: int, buffers: Iterable[memoryview], *, kick: bool = False) -> None:
    """Write buffers in order with writev, straight from their memory.

    With ``kick``, writeback of every 64 MiB written is started at once
    (``sync_file_range``), so the disk works while later bytes are still
    being copied and the final fsync has little left to do.
    """
    limit = _KICK_EVERY if kick else WRITE_CHUNK
    batch: list[memoryview] = []
    size = 0
    offset = 0
    for chunk in chunked(buffers):
        batch.append(chunk)
        size += chunk.nbytes
        if len(batch) >= _IOV_MAX or size >= limit:
            _writev_all(fd, batch)
            if kick and _SYNC_FILE_RANGE is not None:
                _SYNC_FILE_RANGE(fd, offset, size, _SYNC_FILE_RANGE_WRITE)
            offset += size
            batch, size = [], 0
    if batch:
        _writev_all(fd, batch)


def write_file_atomically(
    final: Path, tmp: Path, buffers: Iterable[memoryview], *, exclusive: bool = False
) -> int:
    """Write ``buffers`` to ``tmp``, fsync it, rename it to ``final``; return the bytes.

    On any failure ``tmp`` is removed and ``final`` is as it was. ``exclusive``:
    ``tmp`` must not exist yet. The caller fsyncs the directory when the
    rename itself must outlive a crash.
    """
    size = 0

    def counted() -> Iterator[memoryview]:
        nonlocal size
        for buffer in buffers:
            size += buffer.nbytes
            yield buffer

    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(tmp, flags, 0o644)
    try:
        write_buffers(fd, counted())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, final)
    return size


class BackgroundFsync(threading.Thread):
    """fsync a descriptor in the background, then close it."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="killsafe-fsync", daemon=True)
        self.fd = fd
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self.fd)

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _writev_all(fd: int, batch: list[memoryview]) -> None:
    while batch:
        written = os.writev(fd, batch)
        if written <= 0:
            raise OSError("writev wrote nothing")
        while batch and written >= batch[0].nbytes:
            written -= batch[0].nbytes
            batch.pop(0)
        if written:
            batch[0] = batch[0][written:]


def json_file_bytes(data: dict[str, Any]) -> bytes:
    """The bytes ``write_json_file`` writes for ``data`` (a manifest's size is their length)."""
    return json.dumps(data, indent=1, allow_nan=False).encode()


def write_json_file(path: Path, data: dict[str, Any]) -> None:
    text = json_file_bytes(data)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_buffers(fd, [memoryview(text)])
        os.fsync(fd)
    finally:
        os.close(fd)


def corrupt(directory: Where, what: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        f"checkpoint {directory} is corrupt: {what}; restore it from a copy or load another one"
    )


def open_regular(directory: Path, name: str) -> int:
    """A read descriptor of ``directory/name``, which must be a regular file.

    The file is opened without following a symbolic link and without
    blocking (a named pipe would block ``open``), then checked with
    ``fstat``: links, pipes, devices and directories are refused as corrupt.
    A missing file is ``CheckpointNotFound`` when the whole checkpoint
    vanished meanwhile (deleted or pruned), corrupt otherwise.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(directory / name, flags)
    except FileNotFoundError:
        raise missing_file(directory, name) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise corrupt(directory, f"{name} is a symbolic link, never followed") from None
        raise corrupt(directory, f"cannot open {name} ({exc.strerror})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise corrupt(directory, f"{name} is not a regular file")
    return fd


def missing_file(directory: Path, name: str) -> KillsafeError:
    if not os.path.lexists(directory):
        return CheckpointNotFound(
            f"checkpoint {directory} vanished while being read (deleted or pruned); "
            "load another one"
        )
    return corrupt(directory, f"{name} is missing")


def anonymous_buffer(size: int) -> Any:
    """Private writable memory for ``size`` bytes, on huge pages where the kernel allows.

    Huge pages cut the page faults of filling a large buffer several-fold.
    """
    if size < (1 << 21):
        return bytearray(size)
    buffer = mmap_module.mmap(-1, size)
    advice = getattr(mmap_module, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):
            buffer.madvise(advice)
    return buffer


def read_full(fd: int, path: Path, size: int) -> Any:
    buffer = anonymous_buffer(size)
    view = memoryview(buffer)
    with open(fd, "rb", buffering=0, closefd=False) as f:
        done = 0
        while done < size:
            n = f.readinto(view[done : done + WRITE_CHUNK])
            if not n:
                break
            done += n
    view.release()
    if done != size:
        raise corrupt(path.parent, f"{path.name} shrank while being read")
    return buffer


def map_file(fd: int) -> Any:
    """Copy-on-write map of a file, with the kernel asked to read it ahead."""
    mapped = mmap_module.mmap(fd, 0, access=mmap_module.ACCESS_COPY)
    advice = getattr(mmap_module, "MADV_WILLNEED", None)
    if advice is not None and len(mapped):
        with contextlib.suppress(OSError):
            mapped.madvise(advice)
    return mapped
