"""The object-store commit: data under the attempt's own prefix, then the manifest, create-only.

Object stores have no rename. Each save attempt writes its files under a
prefix of its own, ``step-000500/<attempt>/``, so a retried or concurrent
attempt never overwrites another's objects. The commit point is the
manifest, ``step-000500/manifest.json``, written last with a create-only
put (``If-None-Match: *``): of two attempts at one checkpoint exactly one
commits, and a reader sees either no manifest or one whose files are all
there. Before the put, the writer checks that it still holds the lease; a
writer whose lease expired or was taken over commits nothing.

Deleting removes the manifest first (the checkpoint is gone at once), then
the data. What a killed writer left (attempts no manifest names) is swept
by the next lease holder, but only once the attempt is older than the grace
period: an attempt id begins with its start time, so an attempt whose
writer may still live is never touched.

Incremental stores keep their pieces under ``pieces/`` (``format.pieces``),
shared by the checkpoints; an attempt holds no data then. A save lists
``pieces/`` once, puts the pieces missing there (a put of a piece's key
stores the same bytes whoever puts it: the key is their hash), and commits
the manifest as above. The sweep (``drop_unreferenced``) deletes a piece
only when no committed manifest names it, and never one a save in flight
may be about to reference:

- it runs only while this process holds the lease and, in this process,
  under the store's mutex with no save in flight (the facade's rule);
- a save that found a piece present and will reference it runs under the
  lease too; if its lease lapsed meanwhile and another process took over
  and swept, its lease check before the manifest put fails and it commits
  nothing (the same check that guards every commit here);
- a manifest that cannot be read might name any piece: nothing is deleted.

A crash at any moment leaves at worst pieces that nothing names, deleted
by the next sweep (at the next lease holder's first write).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from killsafe import format as fmt
from killsafe.errors import (
    CheckpointExists,
    CheckpointNotFound,
    KeyExists,
    KillsafeError,
    SaveFailed,
    StorageError,
)
from killsafe.format.io import json_file_bytes
from killsafe.format.keyed import (
    PIECES_PREFIX,
    held_pieces,
    read_manifest_at,
    write_files,
    write_pieces_at,
)
from killsafe.storage import Backend
from killsafe.store import transfer
from killsafe.store.commit import Staging
from killsafe.store.lease_lock import LEASE_PREFIX, LeaseLock

__all__ = ["ManifestLastCommit", "attempt_started", "manifest_key", "new_attempt"]

log = logging.getLogger("killsafe.store")

_TIME_DIGITS = 12  # milliseconds since the epoch, in hex
_CHECKPOINT_MANIFEST = re.compile(r"^step-[^/]+/manifest\.json$")


def manifest_key(checkpoint: Path | str) -> str:
    """The commit object of a checkpoint: ``step-000500/manifest.json``."""
    return f"{checkpoint}/{fmt.MANIFEST_NAME}"


def new_attempt(now: float | None = None) -> str:
    """A unique attempt id that begins with its start time: 12 + 12 hex digits."""
    millis = int((time.time() if now is None else now) * 1000)
    return f"{millis:0{_TIME_DIGITS}x}{uuid.uuid4().hex[:12]}"


def attempt_started(attempt: str) -> float | None:
    """When an attempt began (epoch seconds), or None for a name that is not an attempt id."""
    if len(attempt) != 2 * _TIME_DIGITS:
        return None
    try:
        return int(attempt[:_TIME_DIGITS], 16) / 1000
    except ValueError:
        return None


class ManifestLastCommit:
    """Commits checkpoints into an object store by writing their manifest last.

    The caller holds the store's mutex around ``begin``, ``commit``,
    ``remove`` and ``sweep``; ``write`` runs on any thread.
    """

    def __init__(
        self, backend: Backend, lock: LeaseLock, *, sweep_after: float, incremental: bool = False
    ) -> None:
        self.backend = backend
        self.lock = lock
        self.sweep_after = sweep_after
        self.incremental = incremental

    def begin(self, step: int, name: str | None, final: Path) -> Staging:
        """A new attempt at the checkpoint ``final``: nothing is written yet."""
        return Staging(step=step, name=name, tmp_path=final / new_attempt(), final_path=final)

    def write(
        self,
        staging: Staging,
        encoded: fmt.Encoded,
        fields: fmt.ManifestFields,
        *,
        compression: str | None,
    ) -> dict[str, Any]:
        """Upload the checkpoint's files under the attempt's prefix; return its manifest.

        A failed upload raises ``SaveFailed`` (the URL, the status, what to check).
        Incremental: the pieces ``pieces/`` lacks, then the manifest is returned.
        """
        if self.incremental:
            held = held_pieces((i.key, i.size) for i in self.backend.list(PIECES_PREFIX))
            return write_pieces_at(
                self.backend, encoded, held, fields, attempt=staging.tmp_path.name
            )
        return write_files(
            self.backend,
            f"{staging.tmp_path}/",
            encoded,
            fields,
            attempt=staging.tmp_path.name,
            compression=compression,
        )

    def adopt(
        self, staging: Staging, manifest: dict[str, Any], files: dict[str, Iterator[memoryview]]
    ) -> dict[str, Any]:
        """Upload a copied checkpoint's files under the attempt; return its manifest."""
        transfer.write_objects(self.backend, f"{staging.tmp_path}/", files)
        return transfer.restamp(manifest, staging.tmp_path.name)

    def adopt_pieces(
        self, staging: Staging, manifest: dict[str, Any], pieces: dict[str, Iterator[memoryview]]
    ) -> dict[str, Any]:
        """Upload the pieces of a copied incremental checkpoint that ``pieces/`` lacks;
        return its manifest (``added``: the bytes uploaded here)."""
        held = held_pieces((i.key, i.size) for i in self.backend.list(PIECES_PREFIX))
        written = 0
        for digest, chunks in pieces.items():
            if held.get(digest) != fmt.piece_nbytes(manifest["pieces"][digest]):
                transfer.write_objects(self.backend, "", {fmt.piece_key(digest): chunks})
                written += fmt.piece_nbytes(manifest["pieces"][digest])
        return transfer.restamp({**manifest, "added": written}, staging.tmp_path.name)

    def commit(self, staging: Staging) -> None:
        """Write the manifest, create-only: the commit point.

        Raises ``StoreLocked`` when the lease was lost, ``CheckpointExists``
        when another attempt committed this checkpoint first, ``SaveFailed``
        when the put fails. The attempt is aborted then (its data kept should
        the put have landed after all, see ``abort``).
        """
        assert staging.manifest is not None
        try:
            self.lock.check()
            self.backend.create_if_absent(
                manifest_key(staging.final_path), json_file_bytes(staging.manifest)
            )
        except KeyExists as exc:
            self.abort(staging)
            raise CheckpointExists(
                f"{self.backend.url}{staging.final_path} was committed by another attempt "
                "while saving; not replaced",
                path=staging.final_path,
            ) from exc
        except StorageError as exc:  # the lease could not be read: nothing committed
            self.abort(staging)
            raise SaveFailed(f"{exc}; the checkpoint was not committed") from exc
        except KillsafeError:
            self.abort(staging)
            raise

    def abort(self, staging: Staging) -> None:
        """Remove an attempt that will not be committed.

        Unless a manifest names it: a put reported failed may have landed
        (the answer was lost), and its data must then stay.
        """
        attempt = staging.tmp_path.name
        try:
            if attempt not in self._committed_attempts(str(staging.final_path)):
                self._delete_under(f"{staging.tmp_path}/")
        except KillsafeError as exc:  # the medium failed again: the sweep removes it later
            log.warning("could not remove the attempt %s: %s", staging.tmp_path, exc)

    def remove(self, path: Path) -> None:
        """Delete a committed checkpoint: its manifest first (gone at once), then its data."""
        self.backend.delete(manifest_key(path))
        self._delete_under(f"{path}/")

    def drop_unreferenced(self) -> None:
        """Delete the pieces no committed manifest names (the rules are in the module doc).

        Whether or not this store saves incrementally: a store opened without
        the keyword (``killsafe prune``) must not leave pieces behind.
        """
        held = held_pieces((info.key, info.size) for info in self.backend.list(PIECES_PREFIX))
        if not held:
            return
        manifests = [i.key for i in self.backend.list("") if _CHECKPOINT_MANIFEST.match(i.key)]
        referenced = self._referenced_pieces(manifests)
        if referenced is None:
            return
        doomed = sorted(set(held) - referenced)
        for digest in doomed:
            self.backend.delete(fmt.piece_key(digest))
        if doomed:
            log.info("removed %d pieces no checkpoint refers to", len(doomed))

    def _referenced_pieces(self, manifests: list[str]) -> set[str] | None:
        """The pieces the committed ``manifests`` name; None when one cannot be read."""
        referenced: set[str] = set()
        for key in manifests:
            where = f"{self.backend.url}{key.rsplit('/', 1)[0]}"
            try:
                manifest = read_manifest_at(self.backend, key, where)
            except CheckpointNotFound:
                continue  # deleted since the listing
            except KillsafeError as exc:
                log.warning("pieces kept: %s cannot be read (%s)", where, exc)
                return None
            referenced.update(manifest.get("pieces", ()))
        return referenced

    def settle(self) -> None:
        """Nothing is removed in the background."""

    def sweep(self) -> None:
        """Remove attempts that no manifest names, once older than ``sweep_after`` seconds."""
        cutoff = time.time() - self.sweep_after
        attempts: dict[str, set[str]] = {}
        for info in self.backend.list(""):
            parts = info.key.split("/")
            if info.key.startswith(LEASE_PREFIX) or len(parts) < 3:
                continue
            started = attempt_started(parts[1])
            if started is not None and started < cutoff:
                attempts.setdefault(parts[0], set()).add(parts[1])
        for checkpoint, found in attempts.items():
            for attempt in found - self._committed_attempts(checkpoint):
                log.info("removing leftover attempt %s%s/%s", self.backend.url, checkpoint, attempt)
                self._delete_under(f"{checkpoint}/{attempt}/")
        self.drop_unreferenced()

    def _committed_attempts(self, checkpoint: str) -> set[str]:
        """The attempt a checkpoint's manifest names; every one when it cannot be read."""
        where = f"{self.backend.url}{checkpoint}"
        try:
            manifest = read_manifest_at(self.backend, manifest_key(checkpoint), where)
        except CheckpointNotFound:
            return set()
        except KillsafeError:
            return self._attempts_of(checkpoint)  # unreadable: keep all, for inspection
        attempt = manifest.get("attempt")
        return {attempt} if isinstance(attempt, str) else set()

    def _attempts_of(self, checkpoint: str) -> set[str]:
        return {
            info.key.split("/")[1]
            for info in self.backend.list(f"{checkpoint}/")
            if info.key.count("/") >= 2
        }

    def _delete_under(self, prefix: str) -> None:
        for info in list(self.backend.list(prefix)):
            self.backend.delete(info.key)
