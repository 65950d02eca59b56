"""The local POSIX backend: objects are files under a root directory.

A write goes to a hidden partial file beside its target (``.ks-partial-…``),
is fsynced, then renamed over the key and the directory fsynced, so a reader
sees the old object or the whole new one, even across a power cut. A
create-only write links the fsynced partial file to the key, which the
kernel refuses atomically when the key exists.

Beyond the six operations this backend can rename keys and prefixes
(``rename``) and hands out file paths (``path``) for memory maps and direct
I/O; its ``capabilities`` say so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from killsafe.directio import write_direct
from killsafe.errors import KeyExists, KeyNotFound, SaveFailed, StorageError
from killsafe.host import fsync_directory
from killsafe.storage.base import (
    RESERVED_SEGMENT_PREFIX,
    BytesLike,
    Capabilities,
    ObjectInfo,
    Sink,
    Source,
    check_create,
    validate_key,
    validate_prefix,
)

__all__ = ["LocalBackend"]

_PARTIAL_PREFIX = RESERVED_SEGMENT_PREFIX + "partial-"


def _write_all(fd: int, data: BytesLike) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _LocalSink(Sink):
    def __init__(self, backend: LocalBackend, key: str) -> None:
        self.key = key
        self._backend = backend
        self._final = backend.path(key)
        self._partial = self._final.parent / f"{_PARTIAL_PREFIX}{uuid.uuid4().hex}"
        self._fd: int | None = self._create_partial()

    def _create_partial(self) -> int:
        attempts_left = 3
        while True:
            attempts_left -= 1
            try:
                self._final.parent.mkdir(parents=True, exist_ok=True)
                return os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError as exc:  # a delete removed the emptied directory meanwhile
                if not attempts_left:
                    raise self._backend.save_failed(self.key, exc) from exc
            except OSError as exc:
                raise self._backend.save_failed(self.key, exc) from exc

    def write(self, data: BytesLike) -> None:
        if self._fd is None:
            raise SaveFailed(f"{self._backend.url_of(self.key)}: write after commit or abort")
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self.abort()
            raise self._backend.save_failed(self.key, exc) from exc

    def write_direct(self, views: list[memoryview]) -> bool:
        """Write ``views`` into the still empty file with ``O_DIRECT``; False if unavailable."""
        if self._fd is None:
            raise SaveFailed(f"{self._backend.url_of(self.key)}: write after commit or abort")
        try:
            return write_direct(self._fd, views)
        except OSError as exc:
            self.abort()
            raise self._backend.save_failed(self.key, exc) from exc

    def _close_synced(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            raise SaveFailed(f"{self._backend.url_of(self.key)}: commit after commit or abort")
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        try:
            self._close_synced()
            # The partial file's data is durable before the rename makes it the
            # object, and the directory fsync makes the rename itself durable.
            os.replace(self._partial, self._final)
            fsync_directory(self._final.parent)
        except OSError as exc:
            self._remove_partial()
            raise self._backend.save_failed(self.key, exc) from exc

    def commit_exclusive(self, data: bytes) -> None:
        """Link the synced file to the key; the kernel refuses if the key exists."""
        try:
            self._close_synced()
            os.link(self._partial, self._final)
            fsync_directory(self._final.parent)
        except FileExistsError:
            check_create(self._backend, self.key, data)
        except OSError as exc:
            raise self._backend.save_failed(self.key, exc) from exc
        finally:
            self._remove_partial()

    def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._remove_partial()

    def _remove_partial(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._partial)


class _LocalSource(Source):
    def __init__(self, backend: LocalBackend, key: str) -> None:
        self.key = key
        self._url = backend.url_of(key)
        try:
            self._fd = os.open(backend.path(key), os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise KeyNotFound(
                f"{self._url} does not exist; check the key and the directory"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot open {self._url}: {exc.strerror}") from exc
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int = 0, length: int | None = None) -> memoryview:
        if length is None:
            length = max(self.size - offset, 0)
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return memoryview(out)

    def readinto(self, offset: int, out: memoryview) -> None:
        out = out.cast("B")
        if offset < 0 or offset + len(out) > self.size:
            raise StorageError(
                f"{self._url}: range {offset}+{len(out)} lies outside its {self.size} bytes"
            )
        done = 0
        while done < len(out):
            got = os.preadv(self._fd, [out[done:]], offset + done)
            if got == 0:
                raise StorageError(f"{self._url} shrank while being read; it was replaced")
            done += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalBackend:
    """Objects as files under ``root`` (created when missing).

    Thread-safe: every operation opens its own file descriptors. Processes
    may share a root; concurrent writers of one key each replace the object
    whole, and ``create_if_absent`` lets exactly one of them win.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    @property
    def url(self) -> str:
        """The root as a ``file://`` URL."""
        return self.root.as_uri()

    @property
    def capabilities(self) -> Capabilities:
        """Files rename, map and bypass the page cache; links make creation atomic."""
        return Capabilities(rename=True, mmap=True, direct_io=True, atomic_create=True)

    def url_of(self, key: str) -> str:
        """Where ``key`` lives, for messages."""
        return str(self.root / key)

    def path(self, key: str) -> Path:
        """The file that holds ``key`` (for memory maps and direct I/O)."""
        return self.root / validate_key(key)

    def save_failed(self, key: str, exc: OSError) -> SaveFailed:
        """A one-line ``SaveFailed`` for an ``OSError`` while writing ``key``."""
        hint = "free some space" if exc.errno == errno.ENOSPC else "check the directory"
        return SaveFailed(f"could not write {self.url_of(key)}: {exc.strerror}; {hint}")

    def open_write(self, key: str) -> Sink:
        """Start writing ``key``; nothing is visible there until ``commit()``."""
        return _LocalSink(self, validate_key(key))

    def source(self, key: str) -> Source:
        """Open ``key`` for ranged reads; raises ``KeyNotFound``."""
        return _LocalSource(self, validate_key(key))

    def write_buffers(self, key: str, buffers: Iterable[BytesLike], *, direct: bool = True) -> None:
        """Store the concatenated ``buffers`` at ``key``, past the page cache when ``direct``.

        The direct-I/O path of this backend (``capabilities.direct_io``): large
        files go through ``O_DIRECT`` where the filesystem allows it (see
        ``killsafe.directio``), otherwise buffered; then fsync and rename as
        with any sink.
        """
        views = [memoryview(buffer).cast("B") for buffer in buffers]
        sink = _LocalSink(self, validate_key(key))
        try:
            if not (direct and sink.write_direct(views)):
                for view in views:
                    sink.write(view)
        except BaseException:
            sink.abort()
            raise
        sink.commit()

    def create_if_absent(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` unless an object is there; raises ``KeyExists``."""
        sink = _LocalSink(self, validate_key(key))
        try:
            sink.write(data)
        except BaseException:
            sink.abort()
            raise
        sink.commit_exclusive(data)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield the files whose keys start with ``prefix``, sorted by key."""
        validate_prefix(prefix)
        top = self.root / prefix.rpartition("/")[0]
        found: list[ObjectInfo] = []
        for directory, dirnames, filenames in os.walk(top, onerror=self._walk_error):
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_SEGMENT_PREFIX)]
            for filename in filenames:
                if filename.startswith(RESERVED_SEGMENT_PREFIX):
                    continue
                path = Path(directory, filename)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    size = self._size_or_none(path)
                    if size is not None:
                        found.append(ObjectInfo(key, size))
        yield from sorted(found, key=lambda info: info.key)

    def _walk_error(self, exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise StorageError(f"cannot list {exc.filename}: {exc.strerror}") from exc

    @staticmethod
    def _size_or_none(path: Path) -> int | None:
        try:
            return path.stat().st_size
        except FileNotFoundError:  # deleted while listing
            return None

    def delete(self, key: str) -> None:
        """Remove ``key`` and the directories it leaves empty; missing is fine."""
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror}") from exc
        self._remove_empty_parents(path.parent)

    def _remove_empty_parents(self, directory: Path) -> None:
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty, or already gone: either way done
                return
            directory = directory.parent

    def remove_partials(self, older_than: float = 3600.0) -> int:
        """Delete partial files of writers that died, untouched for ``older_than`` seconds.

        A live writer touches its partial file with every write, so a grace
        period longer than any pause between writes never removes one in use.
        Returns how many were removed.
        """
        cutoff = time.time() - older_than
        removed = 0
        for directory, _, filenames in os.walk(self.root):
            for filename in filenames:
                path = Path(directory, filename)
                if filename.startswith(_PARTIAL_PREFIX) and self._modified(path) < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed += 1
        return removed

    @staticmethod
    def _modified(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def rename(self, source: str, target: str) -> None:
        """Move the object or prefix ``source`` to ``target`` atomically.

        A prefix is a directory here, so a whole checkpoint moves in one step.
        Raises ``KeyExists`` when ``target`` exists and ``KeyNotFound`` when
        ``source`` does not; the parent directory is fsynced afterwards.
        """
        old, new = self.path(source), self.path(target)
        try:
            new.parent.mkdir(parents=True, exist_ok=True)
            if new.exists():
                raise KeyExists(f"{new} already exists; choose another target")
            os.rename(old, new)
            fsync_directory(new.parent)
        except FileNotFoundError as exc:
            raise KeyNotFound(f"{old} does not exist; nothing to rename") from exc
        except OSError as exc:
            raise StorageError(f"cannot rename {old} to {new}: {exc.strerror}") from exc

    def close(self) -> None:
        """Nothing to release: every operation closes what it opens."""
