"""The storage seam: bytes at keys, shaped like an object store.

A ``Backend`` stores objects (immutable byte strings) at keys under one root
(a directory, a bucket prefix, a named in-memory area). It knows bytes and
keys, never checkpoints. Every backend offers the same six operations:

- ``open_write(key)`` -> a ``Sink``: write into it, then ``commit()`` makes
  the whole object visible at once (or ``abort()`` leaves nothing);
- ``source(key)`` -> a ``Source``: its ``size`` and ranged reads;
- ``list(prefix)`` -> the objects whose keys start with ``prefix``, sorted;
- ``delete(key)``: removes an object; a missing one is not an error;
- ``create_if_absent(key, data)``: a create-only put (``If-None-Match: *``),
  raising ``KeyExists`` when another writer got there first;
- ``capabilities``: what the medium can do beyond that (rename, memory maps,
  direct I/O, atomic create), so that strategies are chosen by medium.

Keys are relative, ``/``-separated paths: no empty, ``.`` or ``..``
segments, no leading ``/``, no backslashes or control characters, and no
segment starting with ``.ks-`` (reserved for a backend's partial writes).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable

from killsafe.errors import InvalidKey, KeyExists, KillsafeError

__all__ = [
    "Backend",
    "BytesLike",
    "Capabilities",
    "ObjectInfo",
    "Sink",
    "Source",
    "check_create",
    "read_bytes",
    "validate_key",
    "validate_prefix",
    "write_bytes",
]

BytesLike = bytes | bytearray | memoryview
"""What a sink accepts: any contiguous buffer of bytes."""

RESERVED_SEGMENT_PREFIX = ".ks-"
_MAX_KEY_LENGTH = 1024
_BAD_CHARACTERS = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class Capabilities:
    """What a medium can do beyond storing bytes at keys.

    ``rename``: objects and prefixes can be moved atomically (a POSIX
    directory). ``mmap``: objects are files that can be memory-mapped.
    ``direct_io``: objects can be written past the page cache.
    ``atomic_create``: ``create_if_absent`` is atomic against concurrent
    writers in other processes and on other machines.
    """

    rename: bool = False
    mmap: bool = False
    direct_io: bool = False
    atomic_create: bool = True


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the backend's root) and size in bytes."""

    key: str
    size: int


class Sink:
    """A write in progress to one key; nothing is visible at the key until ``commit()``.

    Use it as a context manager: a clean exit commits, an exception aborts.
    A sink is used from one thread at a time.
    """

    key: str

    def write(self, data: BytesLike) -> None:
        """Append ``data``; raises ``SaveFailed`` when the medium refuses it."""
        raise NotImplementedError

    def commit(self) -> None:
        """Make the whole object visible at its key, replacing any object there."""
        raise NotImplementedError

    def abort(self) -> None:
        """Discard what was written; safe to call more than once, or after a failure."""
        raise NotImplementedError

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Source:
    """One stored object opened for ranged reads. Close it (or use ``with``) when done."""

    key: str
    size: int

    def read(self, offset: int = 0, length: int | None = None) -> memoryview:
        """Return ``length`` bytes from ``offset`` (to the end when ``length`` is None).

        Raises ``StorageError`` when the range lies outside the object or the
        medium fails.
        """
        raise NotImplementedError

    def readinto(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes starting at ``offset``."""
        out[:] = self.read(offset, len(out))

    def close(self) -> None:
        """Release what the source holds (a file descriptor, a connection)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@runtime_checkable
class Backend(Protocol):
    """A medium that stores bytes at keys (see the module docstring)."""

    @property
    def url(self) -> str:
        """The URL of the backend's root, as ``open()`` accepts it."""
        ...

    @property
    def capabilities(self) -> Capabilities:
        """What this medium can do beyond the six operations."""
        ...

    def open_write(self, key: str) -> Sink:
        """Start writing the object at ``key``."""
        ...

    def source(self, key: str) -> Source:
        """Open the object at ``key`` for reading; raises ``KeyNotFound``."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield the objects whose keys start with ``prefix``, sorted by key."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object at ``key``; a missing object is not an error."""
        ...

    def create_if_absent(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key`` only if no object is there; raises ``KeyExists``.

        An existing object with exactly ``data`` counts as created: a retried
        request whose first attempt landed must not report a conflict, so
        callers put something unique (a token) into what they create.
        """
        ...

    def close(self) -> None:
        """Release connections and threads; the backend is unusable afterwards."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` if it is a usable storage key, else raise ``InvalidKey``."""
    problem = _key_problem(key)
    if problem:
        raise InvalidKey(f"invalid storage key {key!r}: {problem}; use a relative path like 'a/b'")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is empty or a key (a trailing ``/`` allowed), else raise."""
    if prefix:
        validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str) or not key:
        return "it is empty or not a string"
    if len(key) > _MAX_KEY_LENGTH:
        return f"it is longer than {_MAX_KEY_LENGTH} characters"
    if key.startswith("/"):
        return "it is absolute"
    if _BAD_CHARACTERS.search(key):
        return "it holds a backslash or a control character"
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return "it has an empty, '.' or '..' segment"
        if segment.startswith(RESERVED_SEGMENT_PREFIX):
            return f"segments starting with {RESERVED_SEGMENT_PREFIX!r} are reserved"
    return None


def check_create(backend: Backend, key: str, data: bytes) -> None:
    """After a create-only write met an existing object: succeed if it holds ``data``.

    Raises ``KeyExists`` when the object differs (another writer created it).
    """
    try:
        with backend.source(key) as existing:
            same = existing.size == len(data) and bytes(existing.read()) == data
    except KillsafeError:  # gone again, or unreadable: not provably ours
        same = False
    if not same:
        raise KeyExists(
            f"{backend.url.rstrip('/')}/{key} already exists; another writer created it first"
        )


def write_bytes(backend: Backend, key: str, data: BytesLike) -> None:
    """Store ``data`` at ``key`` in one go, replacing any object there."""
    with backend.open_write(key) as sink:
        sink.write(data)


def read_bytes(backend: Backend, key: str) -> bytes:
    """Return the whole object at ``key``; raises ``KeyNotFound``."""
    with backend.source(key) as source:
        return bytes(source.read())
