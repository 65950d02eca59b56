"""A fault-injecting wrapper around any backend, for tests of what lies above storage.

``FaultyBackend(inner)`` behaves like ``inner`` until faults are armed:

- ``fail_writes(count, after_bytes=0, status=503)``: the next ``count``
  sinks fail once ``after_bytes`` bytes went in, as a server that answers
  503 SlowDown past its retries would (``SaveFailed``, nothing visible);
- ``drop_writes(count, after_bytes=0)``: the same as a connection dropped
  mid-part that the client could not resume;
- ``fail_creates(count, status=503)``: create-only puts fail (``SaveFailed``);
- ``fail_reads(count, status=503)``: reads fail (``StorageError``).

A failed sink is aborted in the inner backend, so, as on a real store, a
write that failed leaves no object. ``calls`` counts operations by name.
Thread-safe.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from killsafe.errors import SaveFailed, StorageError
from killsafe.storage.base import Backend, BytesLike, Capabilities, ObjectInfo, Sink, Source

__all__ = ["FaultyBackend"]


@dataclass
class _Fault:
    remaining: int
    after_bytes: int
    what: str
    keys: str = ""  # only keys starting with this (say a checkpoint's, not the lease's)


class _FaultySink(Sink):
    def __init__(self, backend: FaultyBackend, inner: Sink, fault: _Fault | None) -> None:
        self.key = inner.key
        self._backend = backend
        self._inner = inner
        self._fault = fault
        self._written = 0

    def _fail(self) -> SaveFailed:
        assert self._fault is not None
        self._inner.abort()
        url = self._backend.url.rstrip("/") + "/" + self.key
        return SaveFailed(f"could not write {url}: {self._fault.what}; injected fault")

    def write(self, data: BytesLike) -> None:
        size = memoryview(data).nbytes
        if self._fault is not None and self._written + size > self._fault.after_bytes:
            keep = max(self._fault.after_bytes - self._written, 0)
            if keep:
                self._inner.write(memoryview(data).cast("B")[:keep])
            raise self._fail()
        self._inner.write(data)
        self._written += size

    def commit(self) -> None:
        if self._fault is not None:
            raise self._fail()
        self._inner.commit()

    def abort(self) -> None:
        self._inner.abort()


class _FaultySource(Source):
    def __init__(self, backend: FaultyBackend, inner: Source) -> None:
        self.key = inner.key
        self.size = inner.size
        self._backend = backend
        self._inner = inner

    def read(self, offset: int = 0, length: int | None = None) -> memoryview:
        what = self._backend.take("read")
        if what is not None:
            url = self._backend.url.rstrip("/") + "/" + self.key
            raise StorageError(f"could not read {url}: {what}; injected fault")
        return self._inner.read(offset, length)

    def close(self) -> None:
        self._inner.close()


class FaultyBackend:
    """``inner`` with armed faults (see the module docstring)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The inner backend's URL."""
        return self.inner.url

    @property
    def capabilities(self) -> Capabilities:
        """The inner backend's capabilities."""
        return self.inner.capabilities

    def _arm(self, operation: str, count: int, after_bytes: int, what: str, keys: str = "") -> None:
        with self._lock:
            self._faults[operation] = _Fault(count, after_bytes, what, keys)

    def fail_writes(
        self, count: int = 1, *, after_bytes: int = 0, status: int = 503, keys: str = ""
    ) -> None:
        """The next ``count`` writes (of keys starting with ``keys``) fail with ``status``
        once ``after_bytes`` went in."""
        what = f"HTTP {status} (SlowDown) after retries"
        self._arm("write", count, after_bytes, what, keys)

    def drop_writes(self, count: int = 1, *, after_bytes: int = 0, keys: str = "") -> None:
        """The next ``count`` writes (of keys starting with ``keys``) lose their connection
        once ``after_bytes`` went in."""
        self._arm("write", count, after_bytes, "connection closed before the part was sent", keys)

    def fail_creates(self, count: int = 1, *, status: int = 503) -> None:
        """The next ``count`` create-only puts fail with ``status``."""
        self._arm("create", count, 0, f"HTTP {status} after retries")

    def fail_reads(self, count: int = 1, *, status: int = 503) -> None:
        """The next ``count`` reads fail with ``status``."""
        self._arm("read", count, 0, f"HTTP {status} after retries")

    def take(self, operation: str) -> str | None:
        """Count ``operation``; return the fault to inject, if one is armed."""
        return fault.what if (fault := self._take_fault(operation)) else None

    def _take_fault(self, operation: str, key: str = "") -> _Fault | None:
        with self._lock:
            self.calls[operation] += 1
            fault = self._faults.get(operation)
            if fault is None or fault.remaining <= 0 or not key.startswith(fault.keys):
                return None
            fault.remaining -= 1
            return fault

    def open_write(self, key: str) -> Sink:
        """The inner sink, failing as armed."""
        inner = self.inner.open_write(key)
        return _FaultySink(self, inner, self._take_fault("write", key))

    def source(self, key: str) -> Source:
        """The inner source, whose reads fail as armed."""
        self.take("source")
        return _FaultySource(self, self.inner.source(key))

    def create_if_absent(self, key: str, data: bytes) -> None:
        """The inner create-only put, failing as armed (without creating anything)."""
        what = self.take("create")
        if what is not None:
            raise SaveFailed(f"could not write {self.url.rstrip('/')}/{key}: {what}; injected")
        self.inner.create_if_absent(key, data)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """The inner listing."""
        self.take("list")
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        """The inner delete."""
        self.take("delete")
        self.inner.delete(key)

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()
