"""Writing large files past the page cache (``O_DIRECT``) where the system allows it.

A checkpoint is written once and read rarely. A buffered write copies it
into the page cache first: that costs the CPU the training loop needs (in
a virtual machine, every fresh page-cache page can cost a fault on the
host), pushes out pages the job does use, and leaves the final fsync with
the whole file to flush. With ``O_DIRECT`` the disk reads the bytes from a
small page-aligned bounce buffer instead. Where the filesystem refuses it
(macOS, tmpfs on older kernels, some network filesystems), or with
``KILLSAFE_DIRECT_IO=0``, ``write_direct`` says so and the caller writes
the ordinary way. Durability is unchanged: the caller still fsyncs.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterable

from killsafe.environment import getenv

__all__ = ["write_direct"]

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_ALIGN = 4096  # a multiple of every logical block size Linux uses
_BOUNCE_BYTES = 8 << 20
_COPY_PIECE = 1 << 20  # bytes per GIL-holding slice copy, so the loop's threads get the GIL back
_POOL_LIMIT = 2

_pool: list[mmap.mmap] = []
_pool_lock = threading.Lock()


def write_direct(fd: int, buffers: Iterable[memoryview]) -> bool:
    """Write ``buffers`` in order to the empty file ``fd`` with ``O_DIRECT``.

    Returns ``False``, with nothing written, when direct I/O is unavailable
    for this file; ``True`` once the file holds exactly the bytes given.
    Raises ``OSError`` for any other failure (a full disk, an I/O error).
    """
    if not _O_DIRECT or getenv("DIRECT_IO") == "0":
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT)
    except OSError:
        return False
    bounce = _take_bounce()
    try:
        return _stream(fd, buffers, bounce)
    finally:
        _give_back(bounce)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _stream(fd: int, buffers: Iterable[memoryview], bounce: mmap.mmap) -> bool:
    """Copy the buffers through the bounce buffer, writing it whenever it fills."""
    view = memoryview(bounce)
    bounce_address = _address(view)
    written = filled = 0
    try:
        for buffer in buffers:
            source = buffer.cast("B") if buffer.format != "B" or buffer.ndim != 1 else buffer
            source_address = _address(source)
            position = 0
            while position < source.nbytes:
                count = min(_BOUNCE_BYTES - filled, source.nbytes - position)
                if source_address is None or bounce_address is None:
                    count = min(count, _COPY_PIECE)
                    view[filled : filled + count] = source[position : position + count]
                else:  # ctypes calls release the GIL: the copy does not stall the loop
                    ctypes.memmove(bounce_address + filled, source_address + position, count)
                filled += count
                position += count
                if filled == _BOUNCE_BYTES:
                    written += _write_aligned(fd, view, filled)
                    filled = 0
        if filled:
            padded = -(-filled // _ALIGN) * _ALIGN
            view[filled:padded] = bytes(padded - filled)
            _write_aligned(fd, view, padded)
            os.ftruncate(fd, written + filled)  # drop the padding
            os.lseek(fd, written + filled, os.SEEK_SET)
    except OSError as exc:
        if exc.errno != errno.EINVAL or written:
            raise
        # The filesystem took the flag but not the writes: start again buffered.
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        return False
    finally:
        view.release()
    return True


def _address(buffer: memoryview) -> int | None:
    """The address of a writable contiguous buffer, or None (read-only ones)."""
    if buffer.readonly or not buffer.c_contiguous or not buffer.nbytes:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _write_aligned(fd: int, view: memoryview, count: int) -> int:
    done = 0
    while done < count:
        step = os.write(fd, view[done:count])
        if step <= 0:
            raise OSError(errno.EIO, "write wrote nothing")
        done += step
    return done


def _take_bounce() -> mmap.mmap:
    with _pool_lock:
        if _pool:
            return _pool.pop()
    return mmap.mmap(-1, _BOUNCE_BYTES)  # anonymous maps are page-aligned


def _give_back(bounce: mmap.mmap) -> None:
    with _pool_lock:
        if len(_pool) < _POOL_LIMIT:
            _pool.append(bounce)
            return
    bounce.close()
