"""Sharded checkpoints in an object store, for jobs whose nodes share no disk.

No rank needs to see another's files: each rank uploads its own
``rank-NNNNN.safetensors`` under the save attempt's prefix
(``step-000500/<attempt>/``), streamed while another thread hashes it,
and checks the object's size; rank 0 then checks the attempt's listing
against every rank's record and commits through the store as a
one-process save does (``store.manifest_commit``: the manifest written
last, create-only, under the store's lease). A save that failed anywhere
never reaches that put; rank 0 removes its attempt (or, when rank 0
itself died, the store's next writer sweeps it).

Reading goes through the same ``ShardedReader`` as on disk, with ranged
reads of the rank files (``StoredCheckpoint`` names where).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from killsafe.distributed.manifest import FileRecord
from killsafe.errors import SaveFailed
from killsafe.format.codec import TensorEntry
from killsafe.format.keyed import PIECES_PREFIX, KeyedPieces, held_pieces, upload_tensor_file
from killsafe.format.tensorfile import safetensors_header

if TYPE_CHECKING:
    from killsafe.store import CheckpointStore
    from killsafe.store.commit import Staging

__all__ = ["StoreTarget", "StoredCheckpoint", "stored"]


@dataclass(frozen=True)
class StoredCheckpoint:
    """A committed checkpoint in an object store: the store's backend and its key."""

    backend: Any
    key: str

    def __str__(self) -> str:
        return f"{self.backend.url}{self.key}"


def stored(store: CheckpointStore, path: Path | str) -> Path | StoredCheckpoint:
    """Where a checkpoint of ``store`` is read from: its directory, or its key in the store."""
    if store.is_local:
        return Path(path)
    return StoredCheckpoint(store.backend, str(path))


class StoreTarget:
    """A new checkpoint of ``step`` (and ``name``) in an object-store ``CheckpointStore``.

    The coordinator ``begin``s the attempt (takes the lease, picks the
    checkpoint's key as ``store.save`` would) and ``commit``s it; every rank
    ``write``s its file under the attempt.
    """

    def __init__(self, store: CheckpointStore, step: int, name: str | None) -> None:
        self.store = store
        self.step = step
        self.name = name
        self.staging: Staging | None = None

    def begin(self) -> str:
        """On the coordinator: a new attempt; its prefix (``step-000500/<attempt>``)."""
        self.staging = self.store.begin(self.step, name=self.name)
        return str(self.staging.tmp_path)

    def write(
        self, attempt: str, file: str, entries: list[TensorEntry], rank: int
    ) -> tuple[FileRecord, dict[str, str]]:
        """Upload this rank's file under ``attempt``; its record and per-entry checksums."""
        return upload_rank_file(self.store.backend, f"{attempt}/{file}", entries, rank)

    def piece_sink(self) -> KeyedPieces:
        """Where a rank puts the pieces of an incremental store that it lacks (listed now)."""
        backend = self.store.backend
        assert backend is not None  # an object store's
        held = held_pieces((info.key, info.size) for info in backend.list(PIECES_PREFIX))
        return KeyedPieces(backend, held)

    def commit(self, manifest: dict[str, Any], records: list[FileRecord]) -> None:
        """On the coordinator: check the uploaded files, then put the manifest (the commit)."""
        staging = self.staging
        if staging is None:
            raise SaveFailed(f"{self.store.location}: commit without an attempt begun")
        backend = self.store.backend
        assert backend is not None  # an object store's
        listed = {i.key: i.size for i in backend.list(f"{staging.tmp_path}/")}
        for record in records:
            size = listed.get(f"{staging.tmp_path}/{record.name}")
            if size != record.size:
                found = "missing" if size is None else f"{size} bytes"
                raise SaveFailed(
                    f"{self.store.location}{staging.tmp_path}/{record.name} is {found}, "
                    f"rank {record.rank} wrote {record.size}; nothing was committed"
                )
        staging.manifest = manifest
        self.store.commit(staging)  # create-only manifest put; aborts the attempt if refused
        self.staging = None

    def discard(self) -> None:
        """Remove this save's attempt (after a failed save; coordinator only)."""
        if self.staging is not None:
            self.store.abort(self.staging)
            self.staging = None


def upload_rank_file(
    backend: Any, key: str, entries: list[TensorEntry], rank: int
) -> tuple[FileRecord, dict[str, str]]:
    """Stream one rank file into the object ``key`` and check its size; record and checksums."""
    header, _ = safetensors_header(entries)
    info, digests = upload_tensor_file(backend, key, header, entries)
    source = backend.source(key)
    try:
        size = source.size
    finally:
        source.close()
    if size != info["size"]:
        raise SaveFailed(
            f"{backend.url}{key} has {size} bytes after the upload, expected {info['size']}; "
            "check the object store"
        )
    name = key.rsplit("/", 1)[-1]
    record = FileRecord(name, rank, size, digests["file"], len(header), digests["header"])
    return record, digests["entries"]
