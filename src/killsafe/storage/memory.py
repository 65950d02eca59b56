"""The in-memory backend: ``memory://NAME/prefix``, for tests and notebooks.

Areas are shared by name within a process: two ``open("memory://demo")``
calls see the same objects, and ``MemoryBackend.clear(name)`` (or
``clear_all()``) forgets them. Nothing survives the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from killsafe.errors import KeyNotFound, SaveFailed, StorageError
from killsafe.storage.base import (
    BytesLike,
    Capabilities,
    ObjectInfo,
    Sink,
    Source,
    check_create,
    validate_key,
    validate_prefix,
)

__all__ = ["MemoryBackend"]


class _Area:
    """One named area: a dict of keys to immutable bytes, behind a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, bytes] = {}


_AREAS: dict[str, _Area] = {}
_AREAS_LOCK = threading.Lock()


def _area(name: str) -> _Area:
    with _AREAS_LOCK:
        return _AREAS.setdefault(name, _Area())


class _MemorySink(Sink):
    def __init__(self, backend: MemoryBackend, key: str) -> None:
        self.key = key
        self._backend = backend
        self._buffer: bytearray | None = bytearray()

    def write(self, data: BytesLike) -> None:
        if self._buffer is None:
            raise SaveFailed(f"{self._backend.url_of(self.key)}: write after commit or abort")
        self._buffer += data

    def commit(self) -> None:
        if self._buffer is None:
            raise SaveFailed(f"{self._backend.url_of(self.key)}: commit after commit or abort")
        data, self._buffer = bytes(self._buffer), None
        self._backend.store(self.key, data)

    def abort(self) -> None:
        self._buffer = None


class _MemorySource(Source):
    def __init__(self, url: str, key: str, data: bytes) -> None:
        self.key = key
        self.size = len(data)
        self._url = url
        self._data = data

    def read(self, offset: int = 0, length: int | None = None) -> memoryview:
        if length is None:
            length = max(self.size - offset, 0)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(
                f"{self._url}: range {offset}+{length} lies outside its {self.size} bytes"
            )
        return memoryview(self._data)[offset : offset + length]


class MemoryBackend:
    """Objects in this process's memory, in the area ``name``, under ``prefix``.

    Thread-safe. Objects are stored as immutable ``bytes``; a source reads
    the version that was there when it was opened.
    """

    def __init__(self, name: str, prefix: str = "") -> None:
        if not name or "/" in name:
            raise StorageError(f"memory area name {name!r} must be non-empty without '/'")
        self.name = name
        self.prefix = validate_prefix(prefix.strip("/") + "/" if prefix.strip("/") else "")
        self._area = _area(name)

    def __repr__(self) -> str:
        return f"MemoryBackend({self.url!r})"

    @staticmethod
    def clear(name: str) -> None:
        """Forget every object in the area ``name``."""
        with _AREAS_LOCK:
            _AREAS.pop(name, None)

    @staticmethod
    def clear_all() -> None:
        """Forget every area of this process."""
        with _AREAS_LOCK:
            _AREAS.clear()

    @property
    def url(self) -> str:
        """``memory://NAME/prefix/``."""
        return f"memory://{self.name}/{self.prefix}"

    @property
    def capabilities(self) -> Capabilities:
        """Atomic create only (within this process)."""
        return Capabilities(atomic_create=True)

    def url_of(self, key: str) -> str:
        """Where ``key`` lives, for messages."""
        return self.url + key

    def store(self, key: str, data: bytes) -> None:
        """Replace the object at ``key`` with ``data`` (used by sinks)."""
        with self._area.lock:
            self._area.objects[self.prefix + key] = data

    def open_write(self, key: str) -> Sink:
        """Start writing ``key``; the object appears whole on ``commit()``."""
        return _MemorySink(self, validate_key(key))

    def source(self, key: str) -> Source:
        """Open ``key`` for ranged reads; raises ``KeyNotFound``."""
        validate_key(key)
        with self._area.lock:
            data = self._area.objects.get(self.prefix + key)
        if data is None:
            raise KeyNotFound(f"{self.url_of(key)} does not exist; check the key")
        return _MemorySource(self.url_of(key), key, data)

    def create_if_absent(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` unless an object is there; raises ``KeyExists``."""
        validate_key(key)
        new = bytes(data)
        with self._area.lock:
            existing = self._area.objects.setdefault(self.prefix + key, new)
        if existing is not new:
            check_create(self, key, new)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield the objects whose keys start with ``prefix``, sorted by key."""
        validate_prefix(prefix)
        full = self.prefix + prefix
        with self._area.lock:
            found = [
                ObjectInfo(key[len(self.prefix) :], len(data))
                for key, data in self._area.objects.items()
                if key.startswith(full)
            ]
        yield from sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing object is not an error."""
        validate_key(key)
        with self._area.lock:
            self._area.objects.pop(self.prefix + key, None)

    def close(self) -> None:
        """Nothing to release; the area lives on for other backends of the same name."""
