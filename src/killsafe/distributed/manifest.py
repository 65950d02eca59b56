"""The manifest of a sharded checkpoint: DCP's ``Metadata`` and our file table as JSON.

``manifest.json`` holds the usual header (format, version, step, name,
reason, created, metrics, metadata), the world size, every rank file with
its size and xxh3, DCP's metadata (tensor sizes and chunks, the flattening
map, where each piece lies and its checksum) and the manifest's own
checksum. Saved into an incremental store, it has no rank files but a
``shards`` table (each rank's entries as spans over the store's pieces,
see ``distributed.incremental``), ``pieces`` and ``added``. Reading it
validates every field, so a hostile manifest fails as
``CorruptCheckpoint`` rather than as an arbitrary error.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.storage import WriteResult

from killsafe.errors import (
    CorruptCheckpoint,
    UnsupportedFormat,
    UnsupportedState,
)
from killsafe.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARDED_LAYOUT,
    check_schema,
    manifest_digest,
)

__all__ = [
    "LAYOUT",
    "FileRecord",
    "Piece",
    "ShardRecord",
    "metadata_from_json",
    "metadata_to_json",
]

LAYOUT = SHARDED_LAYOUT


@dataclass(frozen=True)
class FileRecord:
    """One rank file as its rank wrote it: size, whole-file and header checksums."""

    name: str
    rank: int
    size: int
    xxh3: str
    header_size: int
    header_xxh3: str


@dataclass(frozen=True)
class ShardRecord:
    """One rank's shard as its rank wrote it into an incremental store (no rank file):
    its entries' spans over the store's pieces, the pieces' lengths, the bytes it added."""

    name: str
    rank: int
    entries: dict[str, Any] = field(hash=False)
    pieces: dict[str, int] = field(hash=False)
    added: int


@dataclass(frozen=True)
class Piece:
    """Where one write item's bytes are: a key of a rank file (or shard) and its byte range."""

    file: str
    key: str
    start: int  # offsets past the header, as in the safetensors header
    end: int
    xxh3: str  # empty in a shard: its pieces are checked against their names
    record: FileRecord | ShardRecord | None = None  # set on the writing side only


def metadata_to_json(metadata: Metadata, pieces: list[WriteResult]) -> dict[str, Any]:
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


def metadata_from_json(document: Any, directory: Path | str) -> tuple[Metadata, dict[str, Any]]:
    """DCP ``Metadata`` from the manifest's ``dcp`` section, and the files table (the
    shards, checked against the schema, when saved into an incremental store)."""
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
            size = _sizes(item["size"])
            chunks = [
                ChunkStorageMetadata(torch.Size(_ints(o)), torch.Size(_sizes(s)))
                for o, s in _typed(item["chunks"], list)
            ]
            _check_chunks(fqn, size, chunks)
            properties = TensorProperties(dtype=_torch_dtype(item["dtype"]))
            state[fqn] = TensorStorageMetadata(properties, torch.Size(size), chunks)
        storage = {}
        check_schema(manifest)  # rank files named as ranks', within this checkpoint
        files = _typed(manifest["files"], dict)
        if "shards" in manifest:  # saved into an incremental store: spans over its pieces
            files = manifest["shards"]
        else:
            _check_files(files)
        for row in _typed(dcp_doc["storage"], list):
            offset = None if row["offset"] is None else _ints(row["offset"])
            index = MetadataIndex(_typed(row["fqn"], str), offset)
            piece = Piece(
                _typed(row["file"], str),
                _typed(row["key"], str),
                _typed(row["start"], int),
                _typed(row["end"], int),
                _typed(row["xxh3"], str),
            )
            if piece.file not in files or not 0 <= piece.start <= piece.end:
                raise ValueError(f"piece {piece.key!r} points outside the files")
            if "shards" not in manifest and piece.end > _data_size(files[piece.file]):
                raise ValueError(f"piece {piece.key!r} ends past {piece.file}")
            storage[index] = piece
        _check_pieces(state, storage)
        paths = dcp_doc.get("paths")
        planner_data = None if paths is None else _checked_paths(paths)
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


def _checked_manifest(document: Any, directory: Path | str) -> dict[str, Any]:
    manifest = _typed(document, dict)
    if manifest.get("format") != FORMAT_NAME or manifest.get("layout") != LAYOUT:
        raise ValueError(f"not a killsafe {LAYOUT} manifest")
    version = _typed(manifest.get("format_version"), int)
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"checkpoint {directory} has format version {version}, newer than {FORMAT_VERSION}; "
            "upgrade killsafe to read it"
        )
    if manifest.get("manifest_xxh3") != manifest_digest(manifest):
        raise ValueError(f"{MANIFEST_NAME} fails its own checksum")
    return manifest


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def _ints(value: Any) -> list[int]:
    return [_typed(v, int) for v in _typed(value, list)]


def _checked_paths(paths: Any) -> dict[str, tuple[str | int, ...]]:
    """DCP's flattening map, each path a name then names or list indices. An index is
    below the number of paths (each element of a saved list has one), so that rebuilding
    the state cannot be made to grow a list without bound."""
    checked = {}
    for fqn, path in _typed(paths, dict).items():
        steps = _typed(path, list)
        if not steps or not isinstance(steps[0], str):
            raise ValueError(f"the path of {fqn!r} does not start with a name")
        for step in steps:
            if isinstance(step, int) and not isinstance(step, bool):
                if not 0 <= step < len(paths):
                    raise ValueError(f"the path of {fqn!r} has the list index {step}")
            elif not isinstance(step, str):
                raise ValueError(f"the path of {fqn!r} holds a {type(step).__name__}")
        checked[fqn] = tuple(steps)
    return checked


def _sizes(value: Any) -> list[int]:
    sizes = _ints(value)
    if any(size < 0 for size in sizes):
        raise ValueError(f"negative size in {sizes}")
    return sizes


def _check_chunks(fqn: str, size: list[int], chunks: list[ChunkStorageMetadata]) -> None:
    """Each chunk inside the tensor, and the chunks covering it (DCP writes each element
    once), so that no load leaves part of a target unfilled."""
    covered = 0
    for chunk in chunks:
        offsets, sizes = list(chunk.offsets), list(chunk.sizes)
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise ValueError(f"a chunk of {fqn!r} has other dimensions than {size}")
        if any(o < 0 or o + s > whole for o, s, whole in zip(offsets, sizes, size, strict=True)):
            raise ValueError(f"a chunk of {fqn!r} lies outside its size {size}")
        covered += math.prod(sizes)
    if covered != math.prod(size):
        raise ValueError(f"the chunks of {fqn!r} do not cover its size {size}")


def _check_pieces(state: dict[str, Any], storage: dict[MetadataIndex, Piece]) -> None:
    """Each tensor chunk stored in a piece of its size, so that no reader allocates for a
    chunk more than the files hold."""
    for fqn, item in state.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        itemsize = item.properties.dtype.itemsize
        for chunk in item.chunks:
            piece = storage.get(MetadataIndex(fqn, chunk.offsets))
            if piece is None or piece.end - piece.start != math.prod(chunk.sizes) * itemsize:
                raise ValueError(f"a chunk of {fqn!r} has no piece of its size")


def _check_files(files: dict[str, Any]) -> None:
    """Each rank file's row: its size and header size, numbers within each other."""
    for name, row in files.items():
        size = _typed(_typed(row, dict).get("size"), int)
        header = _typed(row.get("header_size"), int)
        if not 0 <= header <= size:
            raise ValueError(f"{name} has a header of {header} bytes in {size}")


def _data_size(row: dict[str, Any]) -> int:
    """Bytes of a rank file past its header (``_check_files`` checked the row)."""
    return int(row["size"]) - int(row["header_size"])


def _torch_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, _typed(name, str), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype
