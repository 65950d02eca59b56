"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), in our format.

DCP plans the save (who writes which shard of each DTensor, replicated
tensors written once, spread over the ranks) and the load (resharding to
any world size). This module is the storage underneath, with our rules:

- every rank writes one file, ``rank-NNNNN.safetensors``, in the
  safetensors layout (readable by ``safetensors`` without killsafe), and
  records an xxh3 checksum of every piece; pieces are verified on load;
- the metadata is ``manifest.json``: DCP's ``Metadata`` as plain JSON, the
  files with their sizes and checksums, and the manifest's own checksum;
- values that are not tensors are stored as JSON (our tree codec), never
  pickled; ``JsonSavePlanner`` / ``JsonLoadPlanner`` do that and the writer
  and reader refuse any other planner for such values;
- the commit is ours: the ranks write into a temporary directory next to
  the target, and only after every rank reported its files does the
  coordinator write the manifest, fsync and rename the directory into
  place. A save that failed anywhere is never visible; the checkpoints
  already there are never touched.

``save_sharded`` and ``load_sharded`` wrap ``dcp.save`` / ``dcp.load`` with
these parts and turn DCP's errors into killsafe's.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from killsafe import directio
from killsafe.errors import (
    CheckpointExists,
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    KillsafeError,
    SaveFailed,
    StateMismatch,
    UnsupportedFormat,
    UnsupportedState,
)
from killsafe.format import (
    _TORCH_TO_ST,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TensorEntry,
    _alignment,
    _byte_view,
    _Decoder,
    _HashThread,
    _safetensors_header,
    _write_buffers,
    clean_json,
    encode,
)

__all__ = [
    "LAYOUT",
    "JsonLoadPlanner",
    "JsonSavePlanner",
    "ShardedReader",
    "ShardedWriter",
    "load_sharded",
    "save_sharded",
]

log = logging.getLogger("killsafe.distributed")

LAYOUT = "dcp-sharded"
_STAGING_PREFIX = ".tmp-"
_READ_THREADS = 4
_READS_IN_FLIGHT = 8


# ---------------------------------------------------------------- values as JSON


def encode_value(value: Any, fqn: str) -> bytes:
    """A non-tensor state value as JSON bytes (our tree codec); refuses what it cannot store."""
    try:
        encoded = encode(value, copy=False)
    except UnsupportedState as exc:
        raise UnsupportedState(f"in {fqn!r}: {exc}") from exc
    entries = {e.key: base64.b64encode(e.data).decode("ascii") for e in encoded.entries}
    return json.dumps({"tree": encoded.tree, "entries": entries}, allow_nan=False).encode()


def decode_value(data: bytes, fqn: str, where: Path) -> Any:
    """The value ``encode_value`` stored; ``CorruptCheckpoint`` when it is malformed."""
    try:
        document = json.loads(data)
        buffers = {}
        for key, text in document["entries"].items():
            raw = bytearray(base64.b64decode(text, validate=True))
            buffers[key] = (raw, 0, len(raw))
        return _Decoder(where, buffers).decode(document["tree"])
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise CorruptCheckpoint(
            f"checkpoint {where}: the value of {fqn!r} is malformed ({exc}); "
            "restore from another checkpoint"
        ) from exc


class JsonSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, with non-tensor values encoded as JSON, not pickled.

    Every value is encoded while planning, so a value that cannot be stored
    fails the save on every rank before anything is written.
    """

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        self._payloads = {
            item.index.fqn: encode_value(self.lookup_object(item.index), item.index.fqn)
            for item in plan.items
            if item.type == WriteItemType.BYTE_IO
        }
        return plan

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type != WriteItemType.BYTE_IO:
            return object
        payload = self._payloads.get(write_item.index.fqn)
        if payload is None:
            payload = encode_value(object, write_item.index.fqn)
        return io.BytesIO(payload)


class JsonLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values as JSON (never unpickling)."""

    where = Path(".")

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = decode_value(value.getvalue(), fqn, self.where)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class _Target:
    """Where one rank writes: the shared temporary directory and its file name."""

    staging: str
    file: str


@dataclass(frozen=True)
class _FileRecord:
    name: str
    rank: int
    size: int
    xxh3: str
    header_size: int
    header_xxh3: str


@dataclass(frozen=True)
class _Piece:
    """Where one write item's bytes are: a key of a rank file and its byte range."""

    file: str
    key: str
    start: int  # offsets past the header, as in the safetensors header
    end: int
    xxh3: str
    record: _FileRecord | None = None  # set on the writing side only


# ---------------------------------------------------------------- writing


class ShardedWriter(StorageWriter):
    """A DCP ``StorageWriter`` that writes one killsafe checkpoint directory.

    ``directory`` must not exist yet; it appears, complete, only when the
    save succeeded on every rank. ``step``, ``name``, ``reason``,
    ``metrics`` and ``metadata`` go into the manifest. Use it with
    ``JsonSavePlanner`` (``save_sharded`` does).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        step: int = 0,
        name: str | None = None,
        reason: str | None = None,
        metrics: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.directory = Path(directory).absolute()
        self.header = {
            "step": int(step),
            "name": name,
            "reason": reason,
            "metrics": clean_json(dict(metrics or {}), "metrics"),
            "metadata": clean_json(dict(metadata or {}), "metadata"),
        }
        self.save_id = uuid.uuid4().hex
        self.rank = 0
        self.is_coordinator = True
        self.staging: Path | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
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
        return StorageMeta(checkpoint_id=str(self.directory), save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """On the coordinator: refuse an existing target, make the temporary directory."""
        if self.directory.exists():
            raise CheckpointExists(
                f"checkpoint {self.directory} already exists; save under a new name "
                "(a checkpoint is never overwritten)"
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
        if entries:
            path = Path(target.staging) / target.file
            try:
                record, digests = _write_rank_file(path, entries, self.rank)
            except OSError as exc:
                raise SaveFailed(
                    f"rank {self.rank} could not write {path} ({exc.strerror or exc}); "
                    "free disk space or check the file system"
                ) from exc
            for item, entry, (start, end) in items:
                piece = _Piece(target.file, entry.key, start, end, digests[entry.key], record)
                results.append(WriteResult(item.index, entry.nbytes, piece))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On the coordinator, after every rank wrote: the manifest, then the rename."""
        staging = self.staging
        if staging is None:
            raise ConfigError("ShardedWriter.finish ran before prepare_global_plan")
        pieces = [result for rank_results in results for result in rank_results]
        records = {p.storage_data.record.name: p.storage_data.record for p in pieces}
        try:
            _check_files(staging, records.values())
            manifest = self._manifest(metadata, pieces, records, len(results))
            _write_json(staging / MANIFEST_NAME, manifest)
            _fsync_directory(staging)
            self._commit(staging)
        except OSError as exc:
            raise SaveFailed(
                f"committing {self.directory} failed ({exc.strerror or exc}); "
                "nothing was committed, the earlier checkpoints stand"
            ) from exc

    def _commit(self, staging: Path) -> None:
        # The one commit point. Every rank file and the manifest were fsynced
        # into the temporary directory first, so the rename publishes a whole
        # checkpoint; fsyncing the parent makes the rename itself durable.
        if self.directory.exists():
            raise CheckpointExists(
                f"checkpoint {self.directory} appeared while saving; not replaced"
            )
        os.rename(staging, self.directory)
        _fsync_directory(self.directory.parent)
        self.staging = None

    def discard(self) -> None:
        """Remove this save's temporary directory (after a failed save; coordinator only)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def _manifest(
        self,
        metadata: Metadata,
        pieces: list[WriteResult],
        records: dict[str, _FileRecord],
        world_size: int,
    ) -> dict[str, Any]:
        manifest = {
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
            "dcp": _metadata_to_json(metadata, pieces),
        }
        manifest["manifest_xxh3"] = _self_checksum(manifest)
        return manifest

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return not Path(checkpoint_id).exists()


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
        if item.type == WriteItemType.BYTE_IO:
            if not isinstance(planner, JsonSavePlanner):
                raise ConfigError(
                    f"{item.index.fqn!r} is not a tensor and the planner would pickle it; "
                    "save with planner=JsonSavePlanner() (save_sharded does)"
                )
            assert isinstance(data, io.BytesIO)  # JsonSavePlanner made it
            payload = data.getvalue()
            pairs.append((item, TensorEntry(key, "U8", (len(payload),), 1, memoryview(payload))))
        else:
            assert isinstance(data, torch.Tensor)
            pairs.append((item, _tensor_entry(key, data)))
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
    st_dtype = _TORCH_TO_ST.get(dtype)
    nbytes = tensor.numel() * tensor.element_size()
    data = _byte_view(tensor.reshape(-1).view(torch.uint8)) if nbytes else memoryview(b"")
    shape = tuple(tensor.shape) if st_dtype else (nbytes,)
    return TensorEntry(
        key, st_dtype or "U8", shape, _alignment(tensor.element_size()), data, tensor
    )


def _write_rank_file(
    path: Path, entries: list[TensorEntry], rank: int
) -> tuple[_FileRecord, dict[str, str]]:
    """Write, fsync and check one rank file; its record and per-entry checksums."""
    header, _ = _safetensors_header(entries)
    hasher = _HashThread(header, entries, whole=True)
    hasher.start()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        buffers = [memoryview(header), *(e.data for e in entries)]
        if not directio.write_direct(fd, buffers):
            _write_buffers(fd, buffers, kick=True)
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
        hasher.join()
    digests = hasher.digests()
    expected = len(header) + sum(e.nbytes for e in entries)
    if size != expected:
        raise OSError(f"{path.name} has {size} bytes after writing, expected {expected}")
    record = _FileRecord(path.name, rank, size, digests["file"], len(header), digests["header"])
    return record, digests["entries"]


def _check_files(staging: Path, records: Any) -> None:
    for record in records:
        size = (staging / record.name).stat().st_size
        if size != record.size:
            raise OSError(f"{record.name} has {size} bytes, its rank wrote {record.size}")


def _write_json(path: Path, document: dict[str, Any]) -> None:
    text = json.dumps(document, indent=1, allow_nan=False).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_buffers(fd, [memoryview(text)])
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _self_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_xxh3"}
    return xxhash.xxh3_64_hexdigest(json.dumps(body, sort_keys=True, allow_nan=False).encode())


# ---------------------------------------------------------------- metadata as JSON


def _metadata_to_json(metadata: Metadata, pieces: list[WriteResult]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            state[fqn] = {
                "kind": "tensor",
                "dtype": str(item.properties.dtype).removeprefix("torch."),
                "size": list(item.size),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in item.chunks],
            }
        elif isinstance(item, BytesStorageMetadata):
            state[fqn] = {"kind": "bytes"}
        else:
            raise UnsupportedState(
                f"{fqn!r} has DCP metadata of unknown kind {type(item).__name__}"
            )
    storage = []
    for result in pieces:
        piece, index = result.storage_data, result.index
        storage.append(
            {
                "fqn": index.fqn,
                "offset": None if index.offset is None else list(index.offset),
                "file": piece.file,
                "key": piece.key,
                "start": piece.start,
                "end": piece.end,
                "xxh3": piece.xxh3,
            }
        )
    return {
        "version": metadata.version,
        "state": state,
        "paths": _paths_to_json(metadata.planner_data),
        "storage": storage,
    }


def _paths_to_json(planner_data: Any) -> dict[str, list[str | int]] | None:
    """DCP's flattening map (key -> path in the nested state), which is plain data."""
    if planner_data is None:
        return None
    if isinstance(planner_data, dict) and all(
        isinstance(path, (tuple, list))
        and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)
        for path in planner_data.values()
    ):
        return {str(fqn): list(path) for fqn, path in planner_data.items()}
    raise UnsupportedState(
        f"the save planner's data ({type(planner_data).__name__}) is not plain key paths; "
        "save with JsonSavePlanner"
    )


def _metadata_from_json(document: Any, directory: Path) -> tuple[Metadata, dict[str, Any]]:
    """DCP ``Metadata`` from the manifest's ``dcp`` section, and the files table."""
    try:
        manifest = _checked_manifest(document, directory)
        dcp_doc = manifest["dcp"]
        state: dict[str, Any] = {}
        for fqn, item in _typed(dcp_doc["state"], dict).items():
            if item["kind"] == "bytes":
                state[fqn] = BytesStorageMetadata()
                continue
            if item["kind"] != "tensor":
                raise ValueError(f"unknown kind {item['kind']!r}")
            chunks = [
                ChunkStorageMetadata(torch.Size(_ints(o)), torch.Size(_ints(s)))
                for o, s in _typed(item["chunks"], list)
            ]
            properties = TensorProperties(dtype=_torch_dtype(item["dtype"]))
            state[fqn] = TensorStorageMetadata(properties, torch.Size(_ints(item["size"])), chunks)
        storage = {}
        files = _typed(manifest["files"], dict)
        for row in _typed(dcp_doc["storage"], list):
            offset = None if row["offset"] is None else _ints(row["offset"])
            index = MetadataIndex(_typed(row["fqn"], str), offset)
            piece = _Piece(
                _typed(row["file"], str),
                _typed(row["key"], str),
                _typed(row["start"], int),
                _typed(row["end"], int),
                _typed(row["xxh3"], str),
            )
            if piece.file not in files or not 0 <= piece.start <= piece.end:
                raise ValueError(f"piece {piece.key!r} points outside the files")
            storage[index] = piece
        paths = dcp_doc.get("paths")
        planner_data = None if paths is None else {k: tuple(v) for k, v in paths.items()}
        metadata = Metadata(
            state_dict_metadata=state,
            planner_data=planner_data,
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=str(directory), load_id=uuid.uuid4().hex),
            version=dcp_doc.get("version"),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpoint(
            f"checkpoint {directory}: {MANIFEST_NAME} is malformed ({exc}); "
            "restore from another checkpoint"
        ) from exc
    return metadata, files


def _checked_manifest(document: Any, directory: Path) -> dict[str, Any]:
    manifest = _typed(document, dict)
    if manifest.get("format") != FORMAT_NAME or manifest.get("layout") != LAYOUT:
        raise ValueError(f"not a killsafe {LAYOUT} manifest")
    version = _typed(manifest.get("format_version"), int)
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"checkpoint {directory} has format version {version}, newer than {FORMAT_VERSION}; "
            "upgrade killsafe to read it"
        )
    if manifest.get("manifest_xxh3") != _self_checksum(manifest):
        raise ValueError(f"{MANIFEST_NAME} fails its own checksum")
    return manifest


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _ints(value: Any) -> list[int]:
    return [_typed(v, int) for v in _typed(value, list)]


def _torch_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, _typed(name, str), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


# ---------------------------------------------------------------- reading


class ShardedReader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints ``ShardedWriter`` wrote.

    Reads only the pieces this rank's plan needs, on a few threads, and
    (with ``verify``) checks each against its xxh3 before copying it into
    the target tensors. Use it with ``JsonLoadPlanner`` (``load_sharded``
    does).
    """

    def __init__(self, directory: str | os.PathLike[str], *, verify: bool = True) -> None:
        super().__init__()
        self.directory = Path(directory).absolute()
        self.verify = verify
        self.pieces: dict[MetadataIndex, _Piece] = {}
        self.files: dict[str, Any] = {}
        self.state: dict[str, Any] = {}
        self.error: KillsafeError | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.directory = Path(checkpoint_id).absolute()
        self.pieces = {}
        self.error = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            metadata, self.files = _metadata_from_json(self._manifest(), self.directory)
        except KillsafeError as exc:
            self.error = exc  # DCP hides it in an AssertionError; load_sharded raises it
            raise
        return metadata

    def _manifest(self) -> Any:
        path = self.directory / MANIFEST_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointNotFound(
                f"{self.directory} is not a committed checkpoint: it has no {MANIFEST_NAME}"
            ) from None
        except OSError as exc:
            raise CorruptCheckpoint(f"cannot read {path} ({exc.strerror})") from exc
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise CorruptCheckpoint(
                f"{path} is not valid JSON; restore another checkpoint"
            ) from exc

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.pieces = dict(metadata.storage_data or {})
        self.state = metadata.state_dict_metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if isinstance(planner, JsonLoadPlanner):
            planner.where = self.directory
        by_piece: dict[_Piece, list[ReadItem]] = {}
        for request in plan.items:
            if request.type == LoadItemType.BYTE_IO and not isinstance(planner, JsonLoadPlanner):
                raise ConfigError(
                    f"{request.dest_index.fqn!r} is not a tensor and the planner would unpickle "
                    "it; load with planner=JsonLoadPlanner() (load_sharded does)"
                )
            piece = self.pieces.get(request.storage_index)
            if piece is None:
                raise self._corrupt(f"no stored piece for {request.storage_index.fqn!r}")
            by_piece.setdefault(piece, []).append(request)
        for piece, data in self._read_pieces(list(by_piece)):
            for request in by_piece[piece]:
                self._deliver(request, data, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_pieces(self, pieces: list[_Piece]) -> Iterator[tuple[_Piece, bytearray]]:
        """Each piece's verified bytes, read on threads a few pieces ahead, in file order."""
        pieces.sort(key=lambda p: (p.file, p.start))
        descriptors: dict[str, int] = {}
        try:
            for name in {p.file for p in pieces}:
                descriptors[name] = self._open(name)
            with ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="killsafe-read") as pool:
                pending: deque[tuple[_Piece, ThreadFuture[bytearray]]] = deque()
                for piece in pieces:
                    pending.append((piece, pool.submit(self._read, descriptors[piece.file], piece)))
                    if len(pending) >= _READS_IN_FLIGHT:
                        done, future = pending.popleft()
                        yield done, future.result()
                while pending:
                    done, future = pending.popleft()
                    yield done, future.result()
        finally:
            for fd in descriptors.values():
                os.close(fd)

    def _open(self, name: str) -> int:
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise self._corrupt(f"cannot open {name} ({exc.strerror})") from exc
        size = os.fstat(fd).st_size
        expected = self.files[name].get("size") if isinstance(self.files[name], dict) else None
        if size != expected:
            os.close(fd)
            raise self._corrupt(f"{name} has {size} bytes, the manifest says {expected}")
        return fd

    def _read(self, fd: int, piece: _Piece) -> bytearray:
        header_size = self.files[piece.file]["header_size"]
        data = bytearray(piece.end - piece.start)
        if data and os.preadv(fd, [data], header_size + piece.start) != len(data):
            raise self._corrupt(f"{piece.file} is truncated")
        if self.verify and xxhash.xxh3_64_hexdigest(data) != piece.xxh3:
            raise self._corrupt(f"{piece.key!r} in {piece.file} fails its checksum")
        return data

    def _deliver(self, request: ReadItem, data: bytearray, planner: LoadPlanner) -> None:
        if request.type == LoadItemType.BYTE_IO:
            planner.load_bytes(request, io.BytesIO(data))
            return
        target = planner.resolve_tensor(request).detach()
        source = self._tensor(request, data)
        for dim, (offset, length) in enumerate(
            zip(request.storage_offsets, request.lengths, strict=True)
        ):
            source = source.narrow(dim, offset, length)
        if source.shape != target.shape:
            raise StateMismatch(
                f"{request.dest_index.fqn!r}: checkpoint piece {tuple(source.shape)} does not fit "
                f"the target {tuple(target.shape)}; load into a state of the saved shapes"
            )
        target.copy_(source)
        planner.commit_tensor(request, target)

    def _tensor(self, request: ReadItem, data: bytearray) -> torch.Tensor:
        index = request.storage_index
        chunk = self._chunk(index)
        if not data:
            return torch.empty(chunk, dtype=self._dtype(index))
        stored = self._dtype(index)
        if len(data) != torch.Size(chunk).numel() * stored.itemsize:
            raise self._corrupt(f"the piece of {index.fqn!r} has the wrong size")
        return torch.frombuffer(data, dtype=torch.uint8).view(stored).reshape(chunk)

    def _chunk(self, index: MetadataIndex) -> list[int]:
        entry = self.state[index.fqn]
        for chunk in entry.chunks:
            if tuple(chunk.offsets) == tuple(index.offset or ()):
                return list(chunk.sizes)
        raise self._corrupt(f"no chunk of {index.fqn!r} at {list(index.offset or ())}")

    def _dtype(self, index: MetadataIndex) -> torch.dtype:
        dtype: torch.dtype = self.state[index.fqn].properties.dtype
        return dtype

    def _corrupt(self, what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"checkpoint {self.directory}: {what}; restore another checkpoint")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return (Path(checkpoint_id) / MANIFEST_NAME).is_file()


# ---------------------------------------------------------------- the two calls


def save_sharded(
    state_dict: dict[str, Any],
    directory: str | os.PathLike[str],
    *,
    coordinator: Any = None,
    step: int = 0,
    name: str | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``state_dict`` (DTensors, plain tensors, JSON-able values) as one checkpoint.

    Collective: every rank calls it with its part of the state. DCP plans
    the save on ``coordinator``'s side group when it has one (a
    ``TorchCoordinator``: timeouts and the names of missing ranks), else
    on the default group, else on this process alone. Returns the committed
    directory on every rank. Raises ``SaveFailed`` (nothing committed, the
    temporary files removed), ``CheckpointExists``, ``UnsupportedState``,
    or ``RankUnresponsive`` when a rank died or hangs.
    """
    writer = ShardedWriter(
        directory, step=step, name=name, reason=reason, metrics=metrics, metadata=metadata
    )

    def save() -> None:
        dcp.save(
            state_dict,
            storage_writer=writer,
            planner=JsonSavePlanner(),
            process_group=getattr(coordinator, "group", None),
            no_dist=_single_process(),
        )

    try:
        _guarded(coordinator, f"the save of {writer.directory}", save)
    except CheckpointException as exc:
        writer.discard()
        raise _translate(exc, lambda m: SaveFailed(f"saving {writer.directory}: {m}")) from None
    except KillsafeError:
        writer.discard()
        raise
    return writer.directory


def load_sharded(
    state_dict: dict[str, Any],
    directory: str | os.PathLike[str],
    *,
    coordinator: Any = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a ``save_sharded`` checkpoint into ``state_dict`` in place, resharding as needed.

    Collective, like ``save_sharded``. Tensors (DTensors included) are
    filled in place; other values are replaced. Returns ``state_dict``.
    Raises ``CheckpointNotFound``, ``CorruptCheckpoint`` (a checksum or the
    manifest is wrong), ``StateMismatch`` (keys or shapes do not fit) or
    ``RankUnresponsive``.
    """
    reader = ShardedReader(directory, verify=verify)

    def load() -> None:
        dcp.load(
            state_dict,
            storage_reader=reader,
            planner=JsonLoadPlanner(),
            process_group=getattr(coordinator, "group", None),
            no_dist=_single_process(),
        )

    try:
        _guarded(coordinator, f"the load of {reader.directory}", load)
    except CheckpointException as exc:
        if reader.error is not None:
            raise reader.error from None
        raise _translate(exc, lambda m: StateMismatch(f"loading {reader.directory}: {m}")) from None
    return state_dict


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _guarded(coordinator: Any, what: str, call: Any) -> None:
    guard = getattr(coordinator, "guard", None)
    if guard is None:
        call()
    else:
        guard(what, call)


def _translate(exc: CheckpointException, wrap: Any) -> KillsafeError:
    """DCP's per-rank failures as one killsafe error: a killsafe error of the lowest rank
    as it is, anything else wrapped (``wrap(message)``) with its rank and first line."""
    failures = sorted(exc.failures.items())
    for _, (error, _trace) in failures:
        if isinstance(error, KillsafeError):
            return error
    rank, (error, _trace) = failures[0]
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    error = wrap(f"rank {rank} failed: {type(error).__name__}: {first_line}")
    return error
