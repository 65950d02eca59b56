"""``ShardedWriter``: DCP's storage writer for our format, with our commit.

The coordinator makes a temporary directory next to the target while
planning; every rank writes its items into one file, ``rank-NNNNN.safetensors``
(safetensors layout, xxh3 per piece), fsyncs it and reports its pieces; the
coordinator then writes the manifest and renames the directory into place.
A save that failed anywhere never reaches the rename, so it is never
visible, and the checkpoints already there are never touched.

Into an object store (``store=``) the same steps go through a
``StoreTarget`` (``distributed.objects``): each rank uploads its file under
the save attempt's prefix, and the coordinator commits by putting the
manifest last, create-only, through the store.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from killsafe import directio
from killsafe.distributed.incremental import shard_fields, shard_results
from killsafe.distributed.manifest import LAYOUT, FileRecord, Piece, metadata_to_json
from killsafe.distributed.objects import StoreTarget
from killsafe.distributed.planners import JsonSavePlanner
from killsafe.errors import (
    CheckpointExists,
    ConfigError,
    SaveFailed,
    UnsupportedState,
)
from killsafe.format.codec import TORCH_TO_ST, TensorEntry, alignment, byte_view, clean_json
from killsafe.format.io import write_buffers, write_json_file
from killsafe.format.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, manifest_digest
from killsafe.format.tensorfile import HashThread, safetensors_header
from killsafe.host import fsync_directory

if TYPE_CHECKING:
    from killsafe.store import CheckpointStore

__all__ = ["ShardedWriter", "check_step", "tensor_file_entries", "write_plain_file"]

_STAGING_PREFIX = ".tmp-"


@dataclass(frozen=True)
class _Target:
    """Where one rank writes: the shared temporary directory (or the object store's attempt
    prefix) and its file name."""

    staging: str
    file: str


class ShardedWriter(StorageWriter):
    """A DCP ``StorageWriter`` that writes one killsafe checkpoint directory.

    ``directory`` must not exist yet; it appears, complete, only when the
    save succeeded on every rank. ``step``, ``name``, ``reason``,
    ``metrics`` and ``metadata`` go into the manifest. With ``incremental``
    the ranks write pieces shared in the store (``distributed.incremental``)
    instead of rank files. Use it with ``JsonSavePlanner`` (``save_sharded``
    does).

    With ``store`` (a ``CheckpointStore`` on an object store, the same URL
    on every rank) the checkpoint goes there instead, at the key the store
    picks for ``step`` and ``name``; ``directory`` is then ignored and
    becomes that key once the save is planned.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None,
        *,
        step: int = 0,
        name: str | None = None,
        reason: str | None = None,
        metrics: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        incremental: bool = False,
        store: CheckpointStore | None = None,
    ) -> None:
        super().__init__()
        if (directory is None) == (store is None):
            raise ConfigError("ShardedWriter writes into a directory or a store; give one of them")
        check_step(step)
        self.remote = None if store is None else StoreTarget(store, step, name)
        self.directory = Path() if directory is None else Path(directory).absolute()
        self.incremental = incremental
        self.header = {
            "step": step,
            "name": name,
            "reason": reason,
            "metrics": clean_json(dict(metrics or {}), "metrics"),
            "metadata": clean_json(dict(metadata or {}), "metadata"),
        }
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self.staging: Path | None = None

    @property
    def where(self) -> str:
        """The checkpoint, for messages: its directory or its URL."""
        if self.remote is None:
            return str(self.directory)
        return f"{self.remote.store.location}{self.directory}"

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id and self.remote is None:
            self.directory = Path(checkpoint_id).absolute()
        self.save_id = uuid.uuid4().hex
        self.staging = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)
        if kwargs.get("use_collectives") is False:
            raise ConfigError(
                "ShardedWriter commits through the coordinator; "
                "call dcp.save with use_collectives=True (the default)"
            )

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.where, save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator: refuse an existing target, make the temporary directory."""
        if self.remote is not None:
            attempt = self.remote.begin()
            return [
                dataclasses.replace(plan, storage_data=_Target(attempt, _rank_file(rank)))
                for rank, plan in enumerate(plans)
            ]
        if self.directory.exists():
            raise CheckpointExists(
                f"checkpoint {self.directory} already exists; save under a new name "
                "(a checkpoint is never overwritten)",
                self.directory,
            )
        staging = self.directory.parent / f"{_STAGING_PREFIX}{self.directory.name}-{self.save_id}"
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise SaveFailed(f"cannot create {staging} ({exc.strerror}); check the disk") from exc
        self.staging = staging
        return [
            dataclasses.replace(plan, storage_data=_Target(str(staging), _rank_file(rank)))
            for rank, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        target = plan.storage_data
        if not isinstance(target, _Target):
            raise ConfigError("ShardedWriter got a plan it did not prepare; save with dcp.save")
        entries, items = _entries(plan.items, planner)
        results: list[WriteResult] = []
        if self.remote is not None:
            self.directory = Path(target.staging).parent  # the checkpoint's key, on every rank
        if entries and self.incremental:
            sink = None if self.remote is None else self.remote.piece_sink()
            results = shard_results(self.directory, target.file, self.rank, entries, items, sink)
        elif entries:
            path = Path(target.staging) / target.file
            try:
                if self.remote is not None:
                    record, digests = self.remote.write(
                        target.staging, target.file, entries, self.rank
                    )
                else:
                    record, digests = _write_rank_file(path, entries, self.rank)
            except OSError as exc:
                raise SaveFailed(
                    f"rank {self.rank} could not write {path} ({exc.strerror or exc}); "
                    "free disk space or check the file system"
                ) from exc
            for item, entry, (start, end) in items:
                piece = Piece(target.file, entry.key, start, end, digests[entry.key], record)
                results.append(WriteResult(item.index, entry.nbytes, piece))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator, after every rank wrote: the manifest, then the rename."""
        if self.remote is not None:
            self._finish_remote(metadata, results)
            return
        staging = self.staging
        if staging is None:
            raise ConfigError("ShardedWriter.finish ran before prepare_global_plan")
        pieces, files, shards = self._reported(results)
        try:
            _check_files(staging, files.values())
            manifest = self._manifest(metadata, pieces, files, len(results), shards)
            write_json_file(staging / MANIFEST_NAME, manifest)
            fsync_directory(staging)
            self._commit(staging)
        except OSError as exc:
            raise SaveFailed(
                f"committing {self.directory} failed ({exc.strerror or exc}); "
                "nothing was committed, the earlier checkpoints stand"
            ) from exc

    def _finish_remote(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Into an object store: the manifest, naming the attempt, put last (the commit)."""
        assert self.remote is not None and self.remote.staging is not None
        pieces, files, shards = self._reported(results)
        attempt = self.remote.staging.tmp_path.name
        manifest = self._manifest(metadata, pieces, files, len(results), shards, attempt=attempt)
        self.remote.commit(manifest, list(files.values()))

    def _reported(
        self, results: list[list[WriteResult]]
    ) -> tuple[list[WriteResult], dict[str, FileRecord], dict[str, Any]]:
        """What the ranks wrote: every result, the rank files, and the shards' manifest
        fields (no rank files when they wrote into an incremental store)."""
        pieces = [result for rank_results in results for result in rank_results]
        records = {p.storage_data.record.name: p.storage_data.record for p in pieces}
        if self.incremental:
            return pieces, {}, shard_fields(records.values())
        return pieces, records, {}

    def _commit(self, staging: Path) -> None:
        # The one commit point. Every rank file and the manifest were fsynced
        # into the temporary directory first, so the rename publishes a whole
        # checkpoint; fsyncing the parent makes the rename itself durable.
        if self.directory.exists():
            raise CheckpointExists(
                f"checkpoint {self.directory} appeared while saving; not replaced"
            )
        os.rename(staging, self.directory)
        fsync_directory(self.directory.parent)
        self.staging = None

    def discard(self) -> None:
        """Remove this save's temporary directory (after a failed save; coordinator only)."""
        if self.remote is not None:
            self.remote.discard()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def _manifest(
        self,
        metadata: Metadata,
        pieces: list[WriteResult],
        records: dict[str, FileRecord],
        world_size: int,
        shards: dict[str, Any],
        *,
        attempt: str | None = None,
    ) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layout": LAYOUT,
            **self.header,
            "created": time.time(),
            "world_size": world_size,
            "files": {
                name: {
                    "rank": r.rank,
                    "size": r.size,
                    "xxh3": r.xxh3,
                    "header_size": r.header_size,
                    "header_xxh3": r.header_xxh3,
                }
                for name, r in sorted(records.items())
            },
            "dcp": metadata_to_json(metadata, pieces),
            **shards,
        }
        if attempt is not None:
            manifest["attempt"] = attempt
        manifest["manifest_xxh3"] = manifest_digest(manifest)
        return manifest

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return not Path(checkpoint_id).exists()


def check_step(step: Any) -> None:
    """Refuse a step that is not a non-negative int, as ``store.save`` does."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"step={step!r} must be a non-negative int")


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def _entry_key(index: MetadataIndex, item: WriteItem) -> str:
    data = item.tensor_data
    if data is None or (
        not any(index.offset or ()) and tuple(data.chunk.sizes) == tuple(data.size)
    ):
        return index.fqn  # a whole tensor or a value keeps its own name
    return f"{index.fqn}@{','.join(str(o) for o in index.offset or ())}"


def _entries(
    items: Sequence[WriteItem], planner: SavePlanner
) -> tuple[list[TensorEntry], list[tuple[WriteItem, TensorEntry, tuple[int, int]]]]:
    """The file entries of a plan's items, ordered for alignment, and their byte ranges."""
    pairs = []
    for item in items:
        data = planner.resolve_data(item)
        key = _entry_key(item.index, item)
        if key == "__metadata__":
            raise UnsupportedState("a state key may not be '__metadata__' (safetensors uses it)")
        if isinstance(data, torch.Tensor):
            pairs.append((item, _tensor_entry(key, data)))
        elif item.type == WriteItemType.BYTE_IO and isinstance(planner, JsonSavePlanner):
            payload = data.getvalue()  # JSON, made by JsonSavePlanner
            pairs.append((item, TensorEntry(key, "U8", (len(payload),), 1, memoryview(payload))))
        else:
            raise ConfigError(
                f"{item.index.fqn!r} is not a tensor and the planner would pickle it; "
                "save with planner=JsonSavePlanner() (save_sharded does)"
            )
    pairs.sort(key=lambda pair: -pair[1].align)
    ranges = []
    offset = 0
    for _, entry in pairs:
        ranges.append((offset, offset + entry.nbytes))
        offset += entry.nbytes
    entries = [entry for _, entry in pairs]
    return entries, [(item, entry, r) for (item, entry), r in zip(pairs, ranges, strict=True)]


def _tensor_entry(key: str, tensor: torch.Tensor) -> TensorEntry:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    st_dtype = TORCH_TO_ST.get(dtype)
    nbytes = tensor.numel() * tensor.element_size()
    data = byte_view(tensor.reshape(-1).view(torch.uint8)) if nbytes else memoryview(b"")
    shape = tuple(tensor.shape) if st_dtype else (nbytes,)
    return TensorEntry(key, st_dtype or "U8", shape, alignment(tensor.element_size()), data, tensor)


def tensor_file_entries(tensors: dict[str, torch.Tensor]) -> list[TensorEntry]:
    """File entries of named tensors, ordered for alignment."""
    entries = [_tensor_entry(key, tensor) for key, tensor in tensors.items()]
    entries.sort(key=lambda entry: -entry.align)
    return entries


def write_plain_file(path: Path, entries: list[TensorEntry]) -> None:
    """Write a plain safetensors file (created anew, fsynced)."""
    _write_rank_file(path, entries, 0)


def _write_rank_file(
    path: Path, entries: list[TensorEntry], rank: int
) -> tuple[FileRecord, dict[str, str]]:
    """Write, fsync and check one rank file; its record and per-entry checksums."""
    header, _ = safetensors_header(entries)
    hasher = HashThread(header, entries, whole=True)
    hasher.start()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        buffers = [memoryview(header), *(e.data for e in entries)]
        if not directio.write_direct(fd, buffers):
            write_buffers(fd, buffers, kick=True)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
        hasher.join()
    digests = hasher.digests()
    expected = len(header) + sum(e.nbytes for e in entries)
    if size != expected:
        raise OSError(f"{path.name} has {size} bytes after writing, expected {expected}")
    record = FileRecord(path.name, rank, size, digests["file"], len(header), digests["header"])
    return record, digests["entries"]


def _check_files(staging: Path, records: Any) -> None:
    for record in records:
        size = (staging / record.name).stat().st_size
        if size != record.size:
            raise OSError(f"{record.name} has {size} bytes, its rank wrote {record.size}")
