"""``CheckpointStore``: a directory of checkpoints with atomic commits and retention.

The facade composes the rooms of the store (``catalog`` reads, ``commit``
writes, ``lock`` keeps one writer) and, for ``save_async``, a saver: the
store never imports the saver; the package root registers it here
(``register_saver``), and the saver drives the store's ``begin``,
``write``, ``commit`` and ``abort``.
"""

from __future__ import annotations

import builtins
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from killsafe import format as fmt
from killsafe import storage
from killsafe.errors import CheckpointExists, ConfigError, SaveFailed
from killsafe.format import CheckpointInfo
from killsafe.retention import Retention
from killsafe.state import capture
from killsafe.store import transfer
from killsafe.store.commit import Staging
from killsafe.store.medium import DEFAULT_LEASE_TTL, open_medium
from killsafe.store.naming import checkpoint_dirname, sanitize_name

if TYPE_CHECKING:
    from killsafe.saver import PendingSave

__all__ = ["MAX_BESIDE", "CheckpointStore", "Saver", "SaverFactory", "register_saver"]

MAX_BESIDE = 100
"""At most this many directories (one valid, the rest damaged) for one step and name."""


class Saver(Protocol):
    """What ``save_async`` needs of a saver: submit, check, wait, close."""

    def submit(
        self,
        state: Any,
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        name: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
        if_busy: str | None = None,
    ) -> PendingSave | None: ...

    def check(self) -> None: ...

    def wait(self) -> CheckpointInfo | None: ...

    def close(self) -> None: ...


class SaverFactory(Protocol):
    """Builds the saver of a store; ``strategies`` are the snapshot names it accepts."""

    strategies: tuple[str, ...]

    def __call__(self, store: Any, *, strategy: str) -> Saver: ...


_saver_factory: SaverFactory | None = None


def register_saver(factory: SaverFactory) -> None:
    """Name the saver ``save_async`` composes (the package root registers the default)."""
    global _saver_factory
    _saver_factory = factory


class CheckpointStore:
    """A directory of checkpoints with atomic commits and retention.

    Args:
        directory: where checkpoints live: a directory (created at the first
            save), a ``s3://``, ``gs://``, ``az://`` or ``memory://`` URL, or a
            ``storage.Backend`` (see docs/storage.md).
        keep_last: keep this many newest unnamed checkpoints (None: all).
        keep_best: keep this many best on ``best`` as well.
        best: ``(metric, "min"|"max")`` ranking checkpoints by a metric.
        compression: None or ``"zstd"`` (multithreaded) for the tensor file.
        snapshot: how ``save_async`` snapshots the state: ``"auto"``,
            ``"fork"`` or ``"copy"`` (see ``killsafe.saver``); local directories only
            fork.
        lease_ttl: object stores: how long the write lease lasts unrenewed (seconds).
        lease_owner: object stores: what this writer writes for (a run
            directory); a live lease of the same owner held on another host
            is taken over (that owner's lost node) instead of refused.
        sweep_after: object stores: attempts no manifest names are removed once
            this old (seconds; default ``lease_ttl``); incremental local stores:
            pieces no checkpoint names are removed once this old (default 0).
        incremental: checkpoints share the bytes that did not change: each save
            writes only the pieces its store lacks (every medium; see
            docs/format.md). Not with ``compression``.

    Thread safety: mutating calls are serialized by an internal lock, so a
    background saver may ``commit`` while the main thread reads. One process
    writes at a time (``StoreLocked`` otherwise); readers never lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | storage.Backend,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        best: tuple[str, str] | None = None,
        compression: str | None = None,
        snapshot: str = "auto",
        lease_ttl: float = DEFAULT_LEASE_TTL,
        sweep_after: float | None = None,
        incremental: bool = False,
        lease_owner: str = "",
    ) -> None:
        if _saver_factory is not None and snapshot not in _saver_factory.strategies:
            raise ConfigError(
                f"snapshot={snapshot!r} is unknown; use one of {_saver_factory.strategies}"
            )
        if compression not in (None, "zstd"):
            raise ConfigError(f"compression={compression!r} is not supported; use None or 'zstd'")
        if incremental and compression is not None:
            raise ConfigError("incremental=True writes raw pieces; drop compression= to use it")
        self.retention = Retention(keep_last=keep_last, keep_best=keep_best, best=best)
        medium = open_medium(
            directory,
            best=self.retention.best,
            lease_ttl=lease_ttl,
            sweep_after=sweep_after,
            incremental=incremental,
            lease_owner=lease_owner,
        )
        if medium.backend is not None and snapshot == "fork":
            raise ConfigError(f"snapshot='fork' needs a local directory, not {medium.location}")
        self.location = medium.location
        self.backend = medium.backend
        self._directory = medium.directory
        self.compression = compression
        self._catalog = medium.catalog
        self._committer = medium.committer
        self._lock = medium.lock
        self.incremental = incremental
        self._mutex = threading.RLock()
        self._in_flight: set[Path] = set()  # staging directories begun, not committed or aborted
        self._snapshot = snapshot
        self._saver: Saver | None = None

    def __repr__(self) -> str:
        return f"CheckpointStore({self.location!r})"

    @property
    def directory(self) -> Path:
        """The store's directory; ``ConfigError`` for a store on an object store."""
        if self._directory is None:
            raise ConfigError(f"{self.location} is an object store, not a local directory")
        return self._directory

    @property
    def is_local(self) -> bool:
        """True for a local directory, False for an object store or memory area."""
        return self._directory is not None

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _lock_fd(self) -> int | None:
        """The write lock's descriptor while held (None in a forked child)."""
        return self._lock.fd

    def acquire(self) -> None:
        """Take the write lock now rather than at the first write (nothing if held).

        On an object store this is the lease; raises ``StoreLocked`` naming
        the live holder's host and pid. ``close()`` gives it back.
        """
        with self._mutex:
            self._acquire()

    def _acquire(self) -> None:
        """Take the write lock (once); sweep leftovers of dead writers when taken."""
        if self._lock.acquire():
            self._committer.sweep()

    def close(self) -> None:
        """Finish a save in flight, then release the write lock (if held).

        Raises the failure of that save, if any, after releasing the lock.
        The store can be used again later.
        """
        try:
            if self._saver is not None:
                self._saver.close()
        finally:
            self._saver = None
            with self._mutex:
                self._committer.settle()
                self._lock.release()

    # ------------------------------------------------------------ saving

    def save(
        self,
        state: Any,
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        name: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write ``state`` as the checkpoint of ``step`` and commit it atomically.

        Raises ``UnsupportedState`` (before anything is written),
        ``CheckpointExists`` when an unnamed checkpoint of this step (or a
        checkpoint of this name) exists, ``InvalidName``, ``StoreLocked`` and
        ``SaveFailed`` (disk full, I/O error; earlier checkpoints untouched).
        """
        self.wait()
        tree = capture(state)
        encoded = fmt.encode(tree)
        staging = self.begin(step, name=name)
        try:
            self.write(staging, encoded, metrics=metrics, reason=reason, metadata=metadata)
        except BaseException:
            self.abort(staging)
            raise
        return self.commit(staging)

    def save_async(
        self,
        state: Any,
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        name: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
        if_busy: str | None = None,
    ) -> PendingSave | None:
        """Snapshot ``state`` and write it in the background; return once staged.

        The caller may change the state as soon as this returns: the
        checkpoint holds the values of this moment. One save is in flight at
        a time; when another is still being written, ``if_busy="wait"`` (the
        default) waits for it and ``"skip"`` returns ``None`` without saving
        (the saver decides). Returns a ``PendingSave`` whose ``wait()``
        returns the ``CheckpointInfo``. A background failure is raised by
        that ``wait()``, or else by the next ``save_async``, ``save``,
        ``wait`` or ``close`` of this store.
        """
        return self._composed_saver().submit(
            state,
            step,
            metrics=metrics,
            name=name,
            reason=reason,
            metadata=metadata,
            if_busy=if_busy,
        )

    def _composed_saver(self) -> Saver:
        if self._saver is None:
            if _saver_factory is None:
                raise ConfigError("no saver is registered; import killsafe to register one")
            self._saver = _saver_factory(self, strategy=self._snapshot)
        return self._saver

    def wait(self) -> CheckpointInfo | None:
        """Wait for a save in flight; return its info, or ``None`` if none was."""
        if self._saver is None:
            return None
        return self._saver.wait()

    def begin(self, step: int, *, name: str | None = None) -> Staging:
        """Check the step and name, take the lock and create the temporary directory."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step={step!r} must be a non-negative int")
        clean = sanitize_name(name) if name is not None else None
        with self._mutex:
            self._acquire()
            staging = self._committer.begin(step, clean, self._free_path(step, clean))
            self._in_flight.add(staging.tmp_path)
            return staging

    def free_path(self, step: int, name: str | None = None) -> Path:
        """Where a new checkpoint of ``step`` (and ``name``) goes, as ``save`` places it:
        beside a damaged one (``.2``, ``.3``...); ``CheckpointExists`` when a valid one is
        there. For writers that commit on their own (a job's sharded saves)."""
        clean = sanitize_name(name) if name is not None else None
        with self._mutex:
            return self._free_path(step, clean)

    def _free_path(self, step: int, name: str | None) -> Path:
        """Where the checkpoint of ``step`` (and ``name``) goes; never over a damaged one.

        A valid checkpoint already there is ``CheckpointExists`` (the caller
        decides whether to replace it). A directory there that does not verify
        is left for the user to inspect: the new checkpoint goes beside it,
        under the same name with ``.2``, ``.3``... appended.
        """
        self._check_name_free(name)
        for attempt in range(1, MAX_BESIDE + 1):
            final = self._catalog.place(checkpoint_dirname(step, name, attempt))
            if not self._catalog.exists(final):
                return final
            where = self._catalog.location_of(final)
            if self._catalog.verifies(final):
                what = f"named {name!r}" if name else "unnamed"
                raise CheckpointExists(
                    f"an {what} checkpoint of step {step} exists at {where}; "
                    "save under another step or name, or delete it first",
                    path=final,
                )
            self._catalog.warn_once(
                f"beside:{where}",
                f"{where} does not verify; it is kept for inspection and the new "
                "checkpoint is written beside it",
            )
        raise SaveFailed(
            f"{MAX_BESIDE} damaged checkpoints of step {step} in {self.location}; "
            "inspect them with `killsafe verify`, then move them away"
        )

    def _check_name_free(self, name: str | None) -> None:
        if name is None:
            return
        for info in self.list():
            if info.name == name:
                raise CheckpointExists(
                    f"a checkpoint named {name!r} exists at {info.location}; choose another name",
                    path=info.path,
                )

    def write(
        self,
        staging: Staging,
        encoded: fmt.Encoded,
        *,
        metrics: dict[str, Any] | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the checkpoint's files into the staging directory (any thread)."""
        fields = fmt.ManifestFields.of(
            step=staging.step,
            name=staging.name,
            reason=reason,
            metrics=metrics,
            metadata=metadata,
        )
        staging.manifest = self._committer.write(
            staging, encoded, fields, compression=self.compression
        )
        return staging.manifest

    def commit(self, staging: Staging) -> CheckpointInfo:
        """Make a written staging directory a checkpoint, then apply retention.

        The rename is the commit point (see ``store.commit``); retention
        deletes only after it, so a crash at any moment leaves the previous
        checkpoints intact. Safe to call from a background thread.
        """
        if staging.manifest is None:
            raise ConfigError("commit() needs a staging directory that write() has filled")
        with self._mutex:
            try:
                self._committer.commit(staging)
            finally:
                self._in_flight.discard(staging.tmp_path)
            info = self._catalog.info_of(staging.manifest, staging.final_path)
            if self.retention.prunes:
                self._prune(dry_run=False)
            return info

    def import_from(
        self, other: CheckpointStore, ref: Any = "latest", *, pace: Callable[[], None] | None = None
    ) -> CheckpointInfo:
        """Copy a committed checkpoint of ``other`` (any medium) into this store; commit it.

        The files' bytes are streamed as they are, checked against the
        source's checksums on the way, and committed as this medium commits
        (rename locally, manifest last on object stores); retention then
        applies. Raises what ``save`` raises, and ``CorruptCheckpoint`` when
        the source's bytes do not match (nothing is committed then). ``pace``
        is called before each chunk is copied (it may wait).
        """
        info = other.get(ref)
        manifest = other._catalog.manifest_of(info.path)
        if fmt.shares_pieces(manifest):
            return self._import_pieces(other, info, manifest, pace)
        files = {
            name: transfer.checked(
                info.location,
                name,
                meta,
                other._catalog.file_chunks(info.path, manifest, name),
                pace,
            )
            for name, meta in manifest["files"].items()
        }
        return self._commit_copy(
            info, lambda staging: self._committer.adopt(staging, manifest, files)
        )

    def _import_pieces(
        self,
        other: CheckpointStore,
        info: CheckpointInfo,
        manifest: dict[str, Any],
        pace: Callable[[], None] | None,
    ) -> CheckpointInfo:
        """Copy an incremental checkpoint: only the pieces this store lacks, then its manifest."""
        if not self.incremental:
            raise ConfigError(
                f"{info.location} is incremental (its bytes are pieces shared in its store); "
                f"open {self.location} with incremental=True to copy it, or `killsafe export` "
                "its tensors as one file"
            )
        pieces = {  # lazy: only the pieces the target lacks are read
            digest: transfer.checked_piece(
                info.location, digest, length, other._catalog.piece_chunks(digest), pace
            )
            for digest, length in manifest["pieces"].items()
        }
        return self._commit_copy(
            info, lambda staging: self._committer.adopt_pieces(staging, manifest, pieces)
        )

    def _commit_copy(
        self, info: CheckpointInfo, adopt: Callable[[Staging], dict[str, Any]]
    ) -> CheckpointInfo:
        """Stage the copy of ``info``, fill it with ``adopt`` (its manifest), and commit it;
        a failed copy leaves nothing behind."""
        staging = self.begin(info.step, name=info.name)
        try:
            staging.manifest = adopt(staging)
        except BaseException:
            self.abort(staging)
            raise
        return self.commit(staging)

    def abort(self, staging: Staging) -> None:
        """Remove a staging directory that will not be committed."""
        self._committer.abort(staging)
        with self._mutex:
            self._in_flight.discard(staging.tmp_path)

    # ------------------------------------------------------------ reading

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, by step then time.

        Reads manifests only. Unreadable ones, and symbolic links (never
        followed), are skipped with a warning logged once; one that vanished
        while being listed (pruned by a writer) is skipped silently.
        """
        return self._catalog.list()

    def listed(self, path: Path) -> CheckpointInfo:
        """What ``list()`` sees of one checkpoint, or the typed error that skips it."""
        return self._catalog.listed(path)

    def latest(self, *, verify: bool = True) -> CheckpointInfo | None:
        """The newest checkpoint that verifies (corrupt ones skipped with a warning)."""
        return self._catalog.latest(verify=verify)

    def best(self, *, verify: bool = True) -> CheckpointInfo | None:
        """The best checkpoint on the store's ``best`` metric that verifies."""
        return self._catalog.best(verify=verify)

    def get(self, ref: Any = "latest") -> CheckpointInfo:
        """Resolve a reference: "latest", "best", a step, a name, a CheckpointInfo or a path."""
        return self._catalog.get(ref)

    def load(
        self,
        ref: Any = "latest",
        *,
        subtree: str | None = None,
        mmap: bool = False,
        verify: bool = True,
    ) -> Any:
        """Load a checkpoint's tree, verifying the checksums of what is read.

        With ``ref="latest"`` a checkpoint that fails to verify is skipped
        with a warning and the next newest one is loaded. ``subtree`` (dotted,
        e.g. ``"model"``) reads only that part; ``mmap=True`` maps tensors
        copy-on-write from the file; ``verify=False`` skips the checksums
        (with mmap, bytes are then read only when used). Raises ``CheckpointNotFound``,
        ``CorruptCheckpoint`` or ``UnsupportedFormat``.
        """
        return self._catalog.load(ref, subtree=subtree, mmap=mmap, verify=verify)

    def verify(self, ref: Any = "latest") -> CheckpointInfo:
        """Check every checksum of a checkpoint; raise ``CorruptCheckpoint`` if one fails."""
        return self._catalog.verify(ref)

    # ------------------------------------------------------------ deleting

    def delete(self, ref: Any, *, force: bool = False) -> CheckpointInfo:
        """Delete one checkpoint. The newest and the best need ``force=True``."""
        with self._mutex:
            info = self.get(ref)
            if not force and info.path in self._catalog.protected():
                raise ConfigError(
                    f"{info.location} is the newest or the best checkpoint; "
                    "pass force=True to delete it"
                )
            self._acquire()
            self._committer.remove(info.path)
            self._drop_unreferenced()
            self._committer.settle()
            return info

    def prune(self, *, dry_run: bool = False) -> builtins.list[CheckpointInfo]:
        """Apply retention now; return what was (or, dry run, would be) deleted."""
        with self._mutex:
            pruned = self._prune(dry_run=dry_run)
            self._committer.settle()
            return pruned

    def _prune(self, *, dry_run: bool) -> builtins.list[CheckpointInfo]:
        doomed: builtins.list[Any] = self.retention.select_deletions(self.list())
        if dry_run or not doomed:
            return list(doomed)
        self._acquire()
        for info in doomed:
            self._committer.remove(info.path)
        self._drop_unreferenced()
        return list(doomed)

    def _drop_unreferenced(self) -> None:
        """Remove pieces no checkpoint refers to; never while a save is in flight.

        The caller holds the mutex; a save in flight may have referenced any
        piece, so the pieces wait for the next deletion (see ``store.pieces``).
        Retention after a save leaves their unlinking to the background;
        ``prune``, ``delete`` and ``close`` wait for it (``settle``).
        """
        if not self._in_flight:
            self._committer.drop_unreferenced()
