"""``ShardedReader``: DCP's storage reader for checkpoints ``ShardedWriter`` wrote.

A checkpoint in a directory is read with ``preadv``; one in an object
store (a ``StoredCheckpoint``) with ranged reads of its rank files, each
rank fetching only the pieces its plan needs.
"""

from __future__ import annotations

import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future as ThreadFuture
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from killsafe.distributed.incremental import read_shard_pieces
from killsafe.distributed.manifest import Piece, metadata_from_json
from killsafe.distributed.objects import StoredCheckpoint
from killsafe.distributed.planners import JsonLoadPlanner
from killsafe.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    KillsafeError,
    StateMismatch,
)
from killsafe.format.codec import byte_view
from killsafe.format.keyed import KeyedPieceSource, data_prefix, read_manifest_at
from killsafe.format.manifest import MANIFEST_NAME

__all__ = ["ShardedReader"]

_READ_THREADS = 4
_READS_IN_FLIGHT = 8
_READ_CHUNK = 1 << 30
_RANGE_CHUNK = 64 << 20  # one ranged read of an object

ReadInto = Callable[[memoryview, int], int]
"""Reads into a view from a file offset; returns the bytes read (0 at the end)."""


class ShardedReader(StorageReader):
    """A DCP ``StorageReader`` for checkpoints ``ShardedWriter`` wrote.

    Reads only the pieces this rank's plan needs, on a few threads, and
    (with ``verify``) checks each against its xxh3 before copying it into
    the target tensors (a checkpoint of an incremental store: assembled
    from the store's pieces, each checked against its name). Use it with
    ``JsonLoadPlanner`` (``load_sharded`` does). ``directory`` is the
    checkpoint's directory, or a ``StoredCheckpoint`` in an object store.
    """

    def __init__(
        self, directory: str | os.PathLike[str] | StoredCheckpoint, *, verify: bool = True
    ) -> None:
        super().__init__()
        self.stored: StoredCheckpoint | None = None
        self.directory = Path()
        if isinstance(directory, StoredCheckpoint):
            self.stored = directory
        else:
            self.directory = Path(directory).absolute()
        self.where = str(self.stored or self.directory)
        self.prefix = ""  # in an object store: where the rank files are (the attempt's prefix)
        self.verify = verify
        self.pieces: dict[MetadataIndex, Piece] = {}
        self.files: dict[str, Any] = {}
        self.shared_pieces: dict[str, int] | None = None  # saved into an incremental store
        self.state: dict[str, Any] = {}
        self.error: KillsafeError | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id and self.stored is None:
            self.directory = Path(checkpoint_id).absolute()
            self.where = str(self.directory)
        self.pieces = {}
        self.error = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        try:
            manifest = self._manifest()
            metadata, self.files = metadata_from_json(manifest, self.where)
            self.shared_pieces = manifest.get("pieces") if "shards" in manifest else None
            if self.stored is not None and self.shared_pieces is None:
                self.prefix = data_prefix(self.stored.key, manifest, self.where)
        except KillsafeError as exc:
            self.error = exc  # DCP hides it in an AssertionError; load_sharded raises it
            raise
        return metadata

    def _manifest(self) -> Any:
        if self.stored is not None:
            key = f"{self.stored.key}/{MANIFEST_NAME}"
            try:
                return read_manifest_at(self.stored.backend, key, self.where)
            except CheckpointNotFound:
                raise CheckpointNotFound(
                    f"{self.where} is not a committed checkpoint: it has no {MANIFEST_NAME}"
                ) from None
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
            planner.where = self.where
        by_piece: dict[Piece, list[ReadItem]] = {}
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
        if self.shared_pieces is not None:
            source = None
            if self.stored is not None:
                source = KeyedPieceSource(self.stored.backend, self.where)
            found = read_shard_pieces(
                self.where, self.files, self.shared_pieces, by_piece, self.verify, source
            )
            for piece, data in found:
                for request in by_piece[piece]:
                    self._deliver(request, data, planner)
            return _done()
        jobs = [
            (piece, requests, self._direct_target(piece, requests, planner))
            for piece, requests in by_piece.items()
        ]
        for (_, requests, target), data in self._read_pieces(jobs):
            if target is not None:  # the bytes went straight into it
                planner.commit_tensor(requests[0], target)
                continue
            for request in requests:
                self._deliver(request, data, planner)
        return _done()

    def _direct_target(
        self, piece: Piece, requests: list[ReadItem], planner: LoadPlanner
    ) -> torch.Tensor | None:
        """The target memory a piece can be read into directly, when it is all of one target:
        the usual case when the shards line up (same world size, or rows split further)."""
        if len(requests) != 1 or requests[0].type != LoadItemType.TENSOR:
            return None
        request = requests[0]
        chunk = self._chunk(request.storage_index)
        if any(request.storage_offsets) or list(request.lengths) != chunk:
            return None
        target = planner.resolve_tensor(request).detach()
        fits = (
            target.device.type == "cpu"
            and target.dtype == self._dtype(request.storage_index)
            and target.is_contiguous()
            and list(target.shape) == chunk
            and target.numel() > 0
        )
        if not fits:
            return None
        if piece.end - piece.start != target.numel() * target.element_size():
            raise self._corrupt(f"the piece of {request.storage_index.fqn!r} has the wrong size")
        return target

    def _read_pieces(
        self, jobs: list[tuple[Piece, list[ReadItem], torch.Tensor | None]]
    ) -> Iterator[tuple[tuple[Piece, list[ReadItem], torch.Tensor | None], torch.Tensor]]:
        """Each job with its piece's verified bytes, read on threads a few pieces ahead."""
        jobs.sort(key=lambda job: (job[0].file, job[0].start))
        descriptors: dict[str, tuple[ReadInto, Callable[[], None]]] = {}
        try:
            for name in {job[0].file for job in jobs}:
                descriptors[name] = self._open(name)
            with ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="killsafe-read") as pool:
                pending: deque[tuple[Any, ThreadFuture[torch.Tensor]]] = deque()
                for job in jobs:
                    piece, _, target = job
                    read = pool.submit(self._read, descriptors[piece.file][0], piece, target)
                    pending.append((job, read))
                    if len(pending) >= _READS_IN_FLIGHT:
                        done, future = pending.popleft()
                        yield done, future.result()
                while pending:
                    done, future = pending.popleft()
                    yield done, future.result()
        finally:
            for _, close in descriptors.values():
                close()

    def _open(self, name: str) -> tuple[ReadInto, Callable[[], None]]:
        """A reader of the rank file ``name`` checked against its size, and how to close it."""
        if self.stored is not None:
            return self._open_object(name)
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
        return (lambda view, offset: os.preadv(fd, [view], offset)), lambda: os.close(fd)

    def _open_object(self, name: str) -> tuple[ReadInto, Callable[[], None]]:
        assert self.stored is not None
        try:
            source = self.stored.backend.source(self.prefix + name)
        except KillsafeError as exc:
            raise self._corrupt(f"cannot open {name} ({exc})") from exc
        expected = self.files[name].get("size") if isinstance(self.files[name], dict) else None
        if source.size != expected:
            source.close()
            raise self._corrupt(f"{name} has {source.size} bytes, the manifest says {expected}")

        def read_into(view: memoryview, offset: int) -> int:
            length = min(len(view), _RANGE_CHUNK, source.size - offset)
            if length <= 0:
                return 0
            view[:length] = source.read(offset, length)
            return length

        return read_into, source.close

    def _read(self, read_into: ReadInto, piece: Piece, target: torch.Tensor | None) -> torch.Tensor:
        """Read and verify a piece, into ``target``'s memory or a new uint8 tensor."""
        size = piece.end - piece.start
        buffer = target if target is not None else torch.empty(size, dtype=torch.uint8)
        view = byte_view(buffer.reshape(-1).view(torch.uint8)) if size else memoryview(b"")
        offset = self.files[piece.file]["header_size"] + piece.start
        done = 0
        while done < size:  # one pread moves at most about 2 GiB
            n = read_into(view[done : done + _READ_CHUNK], offset + done)
            if n <= 0:
                raise self._corrupt(f"{piece.file} is truncated")
            done += n
        if self.verify and xxhash.xxh3_64_hexdigest(view) != piece.xxh3:
            raise self._corrupt(f"{piece.key!r} in {piece.file} fails its checksum")
        return buffer

    def _deliver(self, request: ReadItem, data: torch.Tensor, planner: LoadPlanner) -> None:
        if request.type == LoadItemType.BYTE_IO:
            raw = bytes(byte_view(data)) if data.numel() else b""
            planner.load_bytes(request, io.BytesIO(raw))
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

    def _tensor(self, request: ReadItem, data: torch.Tensor) -> torch.Tensor:
        index = request.storage_index
        chunk = self._chunk(index)
        stored = self._dtype(index)
        if data.numel() != torch.Size(chunk).numel() * stored.itemsize:
            raise self._corrupt(f"the piece of {index.fqn!r} has the wrong size")
        if not data.numel():
            return torch.empty(chunk, dtype=stored)
        return data.view(stored).reshape(chunk)

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
        return CorruptCheckpoint(f"checkpoint {self.where}: {what}; restore another checkpoint")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return (Path(checkpoint_id) / MANIFEST_NAME).is_file()


def _done() -> Future[None]:
    future: Future[None] = Future()
    future.set_result(None)
    return future
