"""The store's parts for one medium: catalog, commit strategy and write lock.

A local directory gets the rename commit and the ``flock`` (today's code
path, unchanged); an object store or memory area (a URL, or a ``Backend``
given directly) gets the manifest-last commit and the lease. The facade
holds whichever it is given and never asks which.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from killsafe import format as fmt
from killsafe import storage
from killsafe.errors import ConfigError
from killsafe.store.catalog import Catalog
from killsafe.store.commit import RenameCommit, Staging
from killsafe.store.lock import StoreLock

__all__ = ["Committer", "Medium", "WriteLock", "open_medium"]

DEFAULT_LEASE_TTL = 60.0


class Committer(Protocol):
    """How checkpoints become visible on a medium (``RenameCommit``, ``ManifestLastCommit``)."""

    def begin(self, step: int, name: str | None, final: Path) -> Staging: ...

    def write(
        self,
        staging: Staging,
        encoded: fmt.Encoded,
        fields: fmt.ManifestFields,
        *,
        compression: str | None,
    ) -> dict[str, Any]: ...

    def adopt(
        self, staging: Staging, manifest: dict[str, Any], files: dict[str, Iterator[memoryview]]
    ) -> dict[str, Any]: ...

    def adopt_pieces(
        self, staging: Staging, manifest: dict[str, Any], pieces: dict[str, Iterator[memoryview]]
    ) -> dict[str, Any]: ...

    def commit(self, staging: Staging) -> None: ...

    def abort(self, staging: Staging) -> None: ...

    def remove(self, path: Path) -> None: ...

    def sweep(self) -> None: ...

    def drop_unreferenced(self) -> None: ...

    def settle(self) -> None: ...


class WriteLock(Protocol):
    """One writer per store (``StoreLock``, ``LeaseLock``)."""

    fd: int | None

    def acquire(self) -> bool: ...

    def release(self) -> None: ...


@dataclass
class Medium:
    """A store's medium-specific parts; ``backend`` is None for a local directory."""

    location: str
    catalog: Catalog
    committer: Committer
    lock: WriteLock
    backend: storage.Backend | None = None
    directory: Path | None = None


def open_medium(
    location: str | os.PathLike[str] | storage.Backend,
    *,
    best: tuple[str, str] | None,
    lease_ttl: float,
    sweep_after: float | None,
    incremental: bool = False,
    lease_owner: str = "",
) -> Medium:
    """The parts for a path, a ``memory://``/``s3://``/``gs://``/``az://`` URL, or a backend.

    ``incremental``: checkpoints share unchanged pieces (``format.pieces``),
    on every medium.
    """
    if isinstance(location, storage.Backend) or storage.is_url(location):
        backend = location if isinstance(location, storage.Backend) else storage.open(location)
        return _keyed(backend, best, lease_ttl, sweep_after, incremental, lease_owner)
    directory = storage.local_directory(location)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"checkpoint store {directory} is a file, not a directory")
    return Medium(
        location=str(directory),
        catalog=Catalog(directory, best=best),
        committer=RenameCommit(directory, incremental=incremental, grace=sweep_after or 0.0),
        lock=StoreLock(directory),
        directory=directory,
    )


def _keyed(
    backend: storage.Backend,
    best: tuple[str, str] | None,
    lease_ttl: float,
    sweep_after: float | None,
    incremental: bool,
    lease_owner: str,
) -> Medium:
    from killsafe.store.keyed_catalog import KeyedCatalog
    from killsafe.store.lease_lock import LeaseLock
    from killsafe.store.manifest_commit import ManifestLastCommit

    lock = LeaseLock(backend, lease_ttl, lease_owner)
    grace = lease_ttl if sweep_after is None else sweep_after
    return Medium(
        location=backend.url,
        catalog=KeyedCatalog(backend, best),
        committer=ManifestLastCommit(backend, lock, sweep_after=grace, incremental=incremental),
        lock=lock,
        backend=backend,
    )
