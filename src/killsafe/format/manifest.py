"""The manifest: its constants, its own checksum, its schema, reading it safely.

``manifest.json`` is the commit record of a checkpoint: format and
version, step, name, reason, metrics, the tree (see ``codec``), the files
with their sizes and checksums, and the xxh3 of itself. It is read only
whole, bounded, and checked (checksum, then schema) before anything in it
is used.

The schema declares every field of the manifest and every node of its tree
once, as a ``msgspec.Struct`` with its type, range and size;
``check_schema`` raises ``SchemaError`` (one line naming the field, e.g.
``$.tree.entries.w.shape[0]``). Rules that tie fields together live in
``__post_init__`` of the struct they concern, so a new field cannot be
added without its check. The structs validate only: readers keep working
on the plain decoded JSON, which matches the schema once checked.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import msgspec
import xxhash
from msgspec import Meta, Struct

from killsafe.errors import (
    CheckpointNotFound,
    CorruptCheckpoint,
    UnsupportedFormat,
)
from killsafe.format.io import Where, corrupt, json_file_bytes, open_regular

FORMAT_VERSION = 2  # 2: the manifest carries its own checksum; 1 is still read
CHECKSUM_FIELD = "manifest_xxh3"
MAX_MANIFEST_BYTES = 1 << 27  # a manifest is read whole: bound what a hostile one costs
FORMAT_NAME = "killsafe"
FORMAT_NAMES = (FORMAT_NAME, "resumable")  # the second: manifests written before the rename
MANIFEST_NAME = "manifest.json"
TENSOR_FILE = "tensors.safetensors"
TENSOR_FILE_ZSTD = "tensors.safetensors.zst"
SHARDED_LAYOUT = "dcp-sharded"
"""``layout`` of a checkpoint saved by many processes: one ``rank-NNNNN.safetensors`` each."""
PIECES_LAYOUT = "pieces"
"""``layout`` of an incremental checkpoint: its bytes are pieces shared in the store."""
_DATA_FILES = (TENSOR_FILE, TENSOR_FILE_ZSTD)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a manifest says about one committed checkpoint (no tensor I/O)."""

    step: int
    name: str | None
    reason: str | None
    created: float
    metrics: dict[str, Any]
    size: int
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    manifest_checksum: bool = True  # False: an older manifest without its own checksum
    world_size: int = 1  # processes that saved it (a sharded checkpoint: one file each)
    sharded: bool = False  # saved by a process group: one rank file each, a DCP plan
    url: str | None = None  # on an object store: the checkpoint's URL (``path`` is its key)
    added: int | None = None  # bytes this save wrote (incremental); None: ``size``, all of it

    @property
    def location(self) -> str:
        """Where the checkpoint lives, for people: its URL, or else its directory."""
        return self.url if self.url is not None else str(self.path)

    @classmethod
    def from_manifest(
        cls,
        manifest: dict[str, Any],
        path: Path,
        url: str | None = None,
        manifest_size: int | None = None,
    ) -> CheckpointInfo:
        """Build from a manifest already checked by ``read_manifest``.

        ``manifest_size``: its file's bytes, when the caller read them
        (otherwise they are counted by encoding it again).
        """
        if manifest_size is None:
            manifest_size = len(json_file_bytes(manifest))
        return cls(
            step=manifest["step"],
            name=manifest["name"],
            reason=manifest["reason"],
            created=float(manifest["created"]),
            metrics=dict(manifest["metrics"]),
            size=checkpoint_nbytes(manifest, manifest_size),
            path=Path(path),
            metadata=dict(manifest["metadata"]),
            format_version=manifest["format_version"],
            manifest_checksum=CHECKSUM_FIELD in manifest,
            world_size=int(manifest.get("world_size", 1)),
            sharded=manifest.get("layout") == SHARDED_LAYOUT,
            url=url,
            added=added_nbytes(manifest, manifest_size),
        )


def checkpoint_nbytes(manifest: dict[str, Any], manifest_size: int | None = None) -> int:
    """A checkpoint's size: its files as the manifest records them, plus the manifest.

    A checkpoint of plain values has no other file: its manifest holds the data.
    ``manifest_size`` is the manifest file's bytes when known.
    """
    files = sum(int(f["size"]) for f in manifest["files"].values())
    if manifest.get("layout") == PIECES_LAYOUT:
        files = sum(int(row["size"]) for row in manifest["tensors"]["entries"].values())
    for shard in manifest.get("shards", {}).values():  # sharded, of an incremental store
        files += sum(int(row["size"]) for row in shard["entries"].values())
    if manifest_size is None:
        manifest_size = len(json_file_bytes(manifest))
    return files + manifest_size


def added_nbytes(manifest: dict[str, Any], manifest_size: int | None = None) -> int | None:
    """The bytes an incremental save wrote (new pieces and manifest); None for other saves."""
    if not shares_pieces(manifest):
        return None
    if manifest_size is None:
        manifest_size = len(json_file_bytes(manifest))
    return int(manifest["added"]) + manifest_size


def shares_pieces(manifest: Mapping[str, Any]) -> bool:
    """Whether a (checked) manifest's bytes are pieces shared in its store: the ``pieces``
    layout, or a sharded checkpoint saved into an incremental store."""
    return manifest.get("layout") == PIECES_LAYOUT or "shards" in manifest


# ---------------------------------------------------------------- the manifest itself


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """The manifest's own checksum: xxh3 of its canonical JSON, without the checksum field.

    Canonical: keys sorted, no spaces, UTF-8. Python's JSON floats round-trip
    exactly, so a reader recomputes the writer's bytes from the decoded data.
    """
    body = {key: value for key, value in manifest.items() if key != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return xxhash.xxh3_64_hexdigest(text.encode("utf-8", "surrogatepass"))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _read_manifest_bytes(directory: Path) -> bytes:
    if os.path.islink(directory):
        raise corrupt(directory, "the checkpoint directory is a symbolic link, never followed")
    try:
        fd = open_regular(directory, MANIFEST_NAME)
    except CheckpointNotFound:
        raise CheckpointNotFound(f"checkpoint {directory} does not exist") from None
    except CorruptCheckpoint:
        if not os.path.isdir(directory):
            raise CheckpointNotFound(f"{directory} is not a checkpoint directory") from None
        if not os.path.lexists(directory / MANIFEST_NAME):
            raise CheckpointNotFound(
                f"{directory} is not a checkpoint: it has no {MANIFEST_NAME}"
            ) from None
        raise
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise corrupt(
                directory, f"{MANIFEST_NAME} has {size} bytes, over the limit {MAX_MANIFEST_BYTES}"
            )
        with open(fd, "rb", buffering=0, closefd=False) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise corrupt(directory, f"cannot read {MANIFEST_NAME} ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise corrupt(directory, f"{MANIFEST_NAME} grew over the limit while being read")
    return raw


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``manifest.json`` and check it: its own checksum, then the schema.

    Only a regular file of at most ``MAX_MANIFEST_BYTES`` is read, never
    through a symbolic link. Raises ``CheckpointNotFound`` when the directory
    or its manifest is missing, ``UnsupportedFormat`` for a newer format
    version and ``CorruptCheckpoint`` for anything else that does not check out.
    """
    return read_manifest_sized(directory)[0]


def read_manifest_sized(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """``read_manifest``, and the manifest file's size in bytes."""
    directory = Path(directory)
    raw = _read_manifest_bytes(directory)
    return parse_manifest(raw, directory), len(raw)


def parse_manifest(raw: bytes, directory: Where) -> dict[str, Any]:
    """Check a manifest's bytes (JSON, version, own checksum, schema); return it decoded.

    ``directory`` names the checkpoint in messages (a path or a URL).
    """
    try:
        manifest = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise corrupt(directory, f"{MANIFEST_NAME} is not valid JSON") from exc
    _check_version(directory, manifest)
    _check_digest(directory, manifest)
    try:
        check_schema(manifest)
    except SchemaError as exc:
        raise corrupt(directory, f"{MANIFEST_NAME} does not match the format: {exc}") from exc
    return manifest


def _check_version(directory: Where, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMAT_NAMES:
        raise corrupt(directory, f"{MANIFEST_NAME} is not a killsafe manifest")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"checkpoint {directory} has format version {version}, newer than {FORMAT_VERSION}; "
            "upgrade killsafe to read it"
        )


def _check_digest(directory: Where, manifest: dict[str, Any]) -> None:
    """Version 2 manifests carry their checksum; version 1 ones (older releases) may not."""
    stored = manifest.get(CHECKSUM_FIELD)
    if stored is None and manifest.get("format_version") == 1:
        return
    try:
        actual = manifest_digest(manifest)
    except (ValueError, RecursionError) as exc:
        raise corrupt(directory, f"{MANIFEST_NAME} cannot be checksummed") from exc
    if stored is None:
        raise corrupt(directory, f"{MANIFEST_NAME} has no {CHECKSUM_FIELD}")
    if stored != actual:
        raise corrupt(directory, f"{MANIFEST_NAME} fails its own checksum")


# ---------------------------------------------------------------- schema

MAX_ELEMENTS = 2**62  # elements of one tensor or array; bytes of one file
MAX_DIMS = 64  # dimensions of one tensor or array
_MAX_TEXT = 1 << 20

Hex64 = Annotated[str, Meta(pattern=r"^[0-9a-f]{16}$")]
Count = Annotated[int, Meta(ge=0, le=MAX_ELEMENTS)]
Shape = Annotated[list[Count], Meta(max_length=MAX_DIMS)]
Base64 = Annotated[str, Meta(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=_MAX_TEXT)]
EntryKey = Annotated[str, Meta(min_length=1, max_length=4096)]
NumpyDtype = Annotated[str, Meta(pattern=r"^[<>|=][biufcmMSU]\d{1,6}(\[[0-9a-zA-Z]{1,4}\])?$")]
DataFile = Literal["tensors.safetensors", "tensors.safetensors.zst"]


class SchemaError(ValueError):
    """A manifest that does not match the schema; the message names the field."""


def _exactly_one(node: Any, first: str, second: str) -> None:
    if (getattr(node, first) is None) == (getattr(node, second) is None):
        raise ValueError(f"a {node.__class__.__name__} has exactly one of {first!r}, {second!r}")


def _elements(shape: list[int]) -> int:
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise ValueError(f"shape {shape} holds more than 2**62 elements")
    return count


class _Node(Struct, tag_field="type", forbid_unknown_fields=True):
    pass


class NoneNode(_Node, tag="none"):
    pass


class BoolNode(_Node, tag="bool"):
    value: bool


class IntNode(_Node, tag="int"):
    """``value`` for ints that fit 64 bits, ``hex`` (any size, no decimal digit limit) otherwise."""

    value: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    hex: Annotated[str, Meta(pattern=r"^-?[0-9a-f]+$", max_length=_MAX_TEXT)] | None = None

    def __post_init__(self) -> None:
        _exactly_one(self, "value", "hex")


class FloatNode(_Node, tag="float"):
    """``value`` for finite floats, ``bits`` (the little-endian double as hex) for nan and inf."""

    value: float | None = None
    bits: Hex64 | None = None

    def __post_init__(self) -> None:
        _exactly_one(self, "value", "bits")


class StrNode(_Node, tag="str"):
    value: str


class BytesNode(_Node, tag="bytes"):
    base64: Base64 | None = None
    entry: EntryKey | None = None
    size: Count | None = None

    def __post_init__(self) -> None:
        _exactly_one(self, "base64", "entry")
        if (self.entry is None) != (self.size is None):
            raise ValueError("a bytes node stored in the tensor file has both 'entry' and 'size'")


class _Sequence(_Node):
    items: list[Node]


class ListNode(_Sequence, tag="list"):
    pass


class TupleNode(_Sequence, tag="tuple"):
    pass


class SetNode(_Sequence, tag="set"):
    pass


class FrozensetNode(_Sequence, tag="frozenset"):
    pass


class DictNode(_Node, tag="dict"):
    """``entries`` when every key is a str, else ``items``: ``[key node, value node]`` pairs."""

    entries: dict[str, Node] | None = None
    items: list[tuple[Node, Node]] | None = None

    def __post_init__(self) -> None:
        _exactly_one(self, "entries", "items")
        for key, _ in self.items or ():
            if not isinstance(key, (StrNode, IntNode)):
                raise ValueError("a dict key node is not a str or an int")


class TensorNode(_Node, tag="tensor"):
    dtype: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
    shape: Shape
    stride: Shape
    entry: EntryKey | None = None
    offset: Count | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.stride):
            raise ValueError("a tensor's shape and stride differ in length")
        count = _elements(self.shape)
        if (self.entry is None) != (self.offset is None):
            raise ValueError("a tensor has both 'entry' and 'offset' or neither")
        if self.entry is None and count:
            raise ValueError("a non-empty tensor has no entry")


class NdarrayNode(_Node, tag="ndarray"):
    dtype: NumpyDtype
    shape: Shape
    order: Literal["C", "F"] = "C"
    entry: EntryKey | None = None

    def __post_init__(self) -> None:
        if self.entry is None and _elements(self.shape):
            raise ValueError("a non-empty array has no entry")


class NpscalarNode(_Node, tag="npscalar"):
    dtype: NumpyDtype
    base64: Base64


Node = Union[  # noqa: UP007 (msgspec resolves this name at run time on Python 3.10)
    NoneNode,
    BoolNode,
    IntNode,
    FloatNode,
    StrNode,
    BytesNode,
    ListNode,
    TupleNode,
    SetNode,
    FrozensetNode,
    DictNode,
    TensorNode,
    NdarrayNode,
    NpscalarNode,
]


class FileInfo(Struct, forbid_unknown_fields=True):
    size: Count
    xxh3: Hex64
    codec: Literal["zstd"] | None = None
    raw_size: Count | None = None

    def __post_init__(self) -> None:
        if (self.codec is None) != (self.raw_size is None):
            raise ValueError("a compressed file has both 'codec' and 'raw_size'")

    @property
    def data_size(self) -> int:
        return self.size if self.raw_size is None else self.raw_size


class TableEntry(Struct, forbid_unknown_fields=True):
    dtype: Annotated[str, Meta(pattern=r"^[A-Z0-9_]{1,16}$")]
    shape: Shape
    offsets: tuple[Count, Count]
    xxh3: Hex64


class Tensors(Struct, forbid_unknown_fields=True):
    entries: dict[EntryKey, TableEntry]
    file: DataFile | None = None
    header_size: Count | None = None
    header_xxh3: Hex64 | None = None


Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
AttemptId = Annotated[str, Meta(pattern=r"^[0-9a-f]{16,32}$")]
"""On an object store: the save attempt whose prefix holds the files, beside the manifest."""
Created = Annotated[float, Meta(ge=0, le=1e11)]  # Unix time, up to the year 5138


class _Saved(Struct):
    """What every manifest says of its checkpoint besides its data."""

    step: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    name: Name | None
    reason: Annotated[str, Meta(max_length=4096)] | None
    created: Created
    metrics: dict[str, Any]
    metadata: dict[str, Any]


class Manifest(_Saved):
    """The whole manifest; unknown top-level fields are allowed (added by newer writers)."""

    format: Literal["killsafe", "resumable"]
    format_version: Annotated[int, Meta(ge=1)]
    files: dict[DataFile, FileInfo]
    tensors: Tensors
    tree: Node
    manifest_xxh3: Hex64 | None = None
    attempt: AttemptId | None = None

    def __post_init__(self) -> None:
        tensors = self.tensors
        if not tensors.entries:
            return
        if tensors.file is None or tensors.header_size is None or tensors.header_xxh3 is None:
            raise ValueError("tensors has entries but no file, header_size or header_xxh3")
        info = self.files.get(tensors.file)
        if info is None:
            raise ValueError(f"tensors.file {tensors.file!r} is not listed in files")
        if not 8 <= tensors.header_size <= info.data_size:
            raise ValueError("tensors.header_size is out of range")
        room = info.data_size - tensors.header_size
        for key, row in tensors.entries.items():
            start, end = row.offsets
            if not start <= end <= room:
                raise ValueError(f"tensors.entries[{key!r}].offsets lie outside the tensor file")


Hex128 = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$")]
RankFileName = Annotated[str, Meta(pattern=r"^rank-[0-9]{5}\.safetensors$")]


class RankFile(Struct, forbid_unknown_fields=True):
    """One rank's file of a sharded checkpoint; the pieces in it are listed under ``dcp``."""

    rank: Count
    size: Count
    xxh3: Hex64
    header_size: Count
    header_xxh3: Hex64


class ShardedManifest(_Saved):
    """The manifest of a sharded checkpoint (``layout: dcp-sharded``).

    ``dcp`` (the tensors' chunks and where each piece lies) is checked in
    full by the reader that uses it (``killsafe.distributed``). Saved into
    an incremental store, it has no rank files: ``shards`` holds each rank's
    entries as spans over the store's pieces (named like the rank files of
    the other variant), ``pieces`` and ``added`` as in the ``pieces`` layout.
    """

    format: Literal["killsafe"]
    format_version: Annotated[int, Meta(ge=2)]
    layout: Literal["dcp-sharded"]
    world_size: Annotated[int, Meta(ge=1, le=1 << 20)]
    files: dict[RankFileName, RankFile]
    dcp: dict[str, Any]
    manifest_xxh3: Hex64
    shards: dict[RankFileName, Shard] | None = None
    pieces: dict[Hex128, Count] | None = None
    added: Count | None = None
    attempt: AttemptId | None = None  # on an object store: the prefix holding the rank files

    def __post_init__(self) -> None:
        for name, info in self.files.items():
            if info.rank >= self.world_size or name != f"rank-{info.rank:05d}.safetensors":
                raise ValueError(f"files[{name!r}] does not belong to a rank of the world size")
        if self.shards is None:
            if self.pieces is not None or self.added is not None:
                raise ValueError("pieces or added without shards")
            return
        if self.pieces is None or self.added is None or self.files:
            raise ValueError("shards need pieces and added, and no rank files")
        for name, shard in self.shards.items():
            if shard.rank >= self.world_size or name != f"rank-{shard.rank:05d}.safetensors":
                raise ValueError(f"shards[{name!r}] does not belong to a rank of the world size")
            check_spans(shard.entries, self.pieces, f"shards[{name!r}].entries")


class PieceEntry(Struct, forbid_unknown_fields=True):
    """One entry of an incremental checkpoint: its spans ``[piece, offset, length]``."""

    dtype: Annotated[str, Meta(pattern=r"^[A-Z0-9_]{1,16}$")]
    shape: Shape
    size: Count
    pieces: Annotated[list[tuple[Hex128, Count, Count]], Meta(max_length=1 << 24)]
    xxh3: Hex64 | None = None  # written by earlier releases; pieces are checked by their names


class PieceTensors(Struct, forbid_unknown_fields=True):
    entries: dict[EntryKey, PieceEntry]


class Shard(Struct, forbid_unknown_fields=True):
    """One rank's part of a sharded checkpoint of an incremental store."""

    rank: Count
    added: Count  # bytes this rank wrote
    entries: dict[EntryKey, PieceEntry]


def check_spans(entries: Mapping[str, PieceEntry], pieces: Mapping[str, int], where: str) -> None:
    """Every entry's spans lie inside their pieces and add up to its size."""
    for key, row in entries.items():
        total = 0
        for digest, offset, length in row.pieces:
            size = pieces.get(digest)
            if size is None or offset + length > size:
                raise ValueError(f"{where}[{key!r}].pieces lie outside their pieces")
            total += length
        if total != row.size:
            raise ValueError(f"{where}[{key!r}].pieces do not add up to its size")


class PiecesManifest(_Saved):
    """The manifest of an incremental checkpoint (``layout: pieces``, see ``format.pieces``)."""

    format: Literal["killsafe"]
    format_version: Annotated[int, Meta(ge=2)]
    layout: Literal["pieces"]
    files: Annotated[dict[DataFile, FileInfo], Meta(max_length=0)]
    tensors: PieceTensors
    pieces: dict[Hex128, Count]
    added: Count
    tree: Node
    manifest_xxh3: Hex64

    def __post_init__(self) -> None:
        check_spans(self.tensors.entries, self.pieces, "tensors.entries")


def is_sharded(manifest: Mapping[str, Any]) -> bool:
    """Whether a (checked) manifest is a sharded checkpoint's."""
    return manifest.get("layout") == SHARDED_LAYOUT


def check_schema(manifest: Any) -> None:
    """Validate a decoded manifest; raise ``SchemaError`` with the field's path."""
    schema: type[Struct] = Manifest
    if isinstance(manifest, dict) and "layout" in manifest:
        schema = PiecesManifest if manifest["layout"] == PIECES_LAYOUT else ShardedManifest
    try:
        msgspec.convert(manifest, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise SchemaError(str(exc).replace("\n", " ")) from exc
    except RecursionError as exc:
        raise SchemaError("the state tree is nested too deeply") from exc
