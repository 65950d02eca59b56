"""The manifest's schema, declared once and checked by msgspec.

Every field of ``manifest.json`` and every node of its state tree is a
``msgspec.Struct`` here, with its type, range and size. ``check(manifest)``
validates a decoded manifest against it and raises ``SchemaError`` (one line
naming the field, e.g. ``$.tree.entries.w.shape[0]``). Rules that tie fields
together (a tensor's shape and stride have one length, an entry's offsets lie
inside the tensor file) live in ``__post_init__`` of the struct they concern,
so a new field cannot be added without its check.

The structs validate only: readers keep working on the plain decoded JSON,
which is guaranteed to match this schema once ``check`` has passed.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Struct

__all__ = ["MAX_DIMS", "MAX_ELEMENTS", "SchemaError", "check"]

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
Created = Annotated[float, Meta(ge=0, le=1e11)]  # Unix time, up to the year 5138


class Manifest(Struct):
    """The whole manifest; unknown top-level fields are allowed (added by newer writers)."""

    format: Literal["killsafe", "resumable"]
    format_version: Annotated[int, Meta(ge=1)]
    step: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    name: Name | None
    reason: Annotated[str, Meta(max_length=4096)] | None
    created: Created
    metrics: dict[str, Any]
    metadata: dict[str, Any]
    files: dict[DataFile, FileInfo]
    tensors: Tensors
    tree: Node
    manifest_xxh3: Hex64 | None = None

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


def check(manifest: Any) -> None:
    """Validate a decoded manifest; raise ``SchemaError`` with the field's path."""
    try:
        msgspec.convert(manifest, Manifest, strict=True)
    except msgspec.ValidationError as exc:
        raise SchemaError(str(exc).replace("\n", " ")) from exc
    except RecursionError as exc:
        raise SchemaError("the state tree is nested too deeply") from exc
