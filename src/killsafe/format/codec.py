"""The state tree as JSON nodes and tensor entries, and back.

``encode`` turns a captured tree into JSON nodes plus ``TensorEntry``
records that reference live memory (no copies); the decoder rebuilds
values from checked nodes and the buffers read for their entries. torch
and numpy are found through ``sys.modules`` or imported only to rebuild
what a checkpoint holds.
"""

from __future__ import annotations

import base64
import ctypes
import math
import re
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from killsafe.errors import (
    CheckpointNotFound,
    ConfigError,
    UnsupportedState,
)
from killsafe.state import (
    check_array,
    check_tensor,
    format_path,
    is_numpy_array,
    is_numpy_scalar,
    is_torch_tensor,
)

_INLINE_BYTES = 64  # bytes values up to this size live in the manifest (base64)

# torch dtype name -> safetensors dtype name, for dtypes safetensors can name.
TORCH_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}
_QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
# numpy dtype.str -> safetensors dtype name (little-endian only).
_NUMPY_TO_ST = {
    "<f8": "F64",
    "<f4": "F32",
    "<f2": "F16",
    "<i8": "I64",
    "<i4": "I32",
    "<i2": "I16",
    "|i1": "I8",
    "|u1": "U8",
    "<u2": "U16",
    "<u4": "U32",
    "<u8": "U64",
    "|b1": "BOOL",
    "<c8": "C64",
}
_NUMPY_DTYPE = re.compile(r"^[<>|=][biufcmMSU]\d{1,6}(\[[0-9a-zA-Z]{1,4}\])?$")


# ---------------------------------------------------------------- encoding


@dataclass
class TensorEntry:
    """One byte range of the tensor file and the live memory it comes from.

    ``data`` is a flat byte memoryview of the source (no copy); ``owner``
    keeps that memory alive. ``align`` is the element size the bytes must be
    aligned to for zero-copy views on load.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    align: int
    data: memoryview
    owner: Any = None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass
class Encoded:
    """A state tree ready to write: the JSON tree plus the tensor entries."""

    tree: dict[str, Any]
    entries: list[TensorEntry]

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)


class _Encoder:
    def __init__(self, copy: bool) -> None:
        self.copy = copy
        self.entries: list[TensorEntry] = []
        self.keys: set[str] = {"__metadata__"}
        # storage groups: (device, storage pointer) -> [(tensor, node, key)]
        self.groups: dict[tuple[str, int], list[tuple[Any, dict[str, Any], str]]] = {}

    def unique_key(self, path: tuple[Any, ...]) -> str:
        base = ".".join(str(p) for p in path) or "state"
        key, n = base, 1
        while key in self.keys:
            n += 1
            key = f"{base}#{n}"
        self.keys.add(key)
        return key

    def node(self, value: Any, path: tuple[Any, ...]) -> dict[str, Any]:
        if value is None:
            return {"type": "none"}
        if isinstance(value, bool):
            return {"type": "bool", "value": value}
        if isinstance(value, int):
            return _int_node(value)
        if isinstance(value, float):
            return _float_node(value)
        if isinstance(value, str):
            return {"type": "str", "value": value}
        if isinstance(value, bytes):
            return self.bytes_node(value, path)
        if is_torch_tensor(value):
            return self.tensor_node(value, path)
        if is_numpy_array(value):
            return self.array_node(value, path)
        if is_numpy_scalar(value):
            return _numpy_scalar_node(value)
        return self.container_node(value, path)

    def container_node(self, value: Any, path: tuple[Any, ...]) -> dict[str, Any]:
        kind = type(value)
        if isinstance(value, dict):  # OrderedDict (state_dict) too; loads as dict
            if all(isinstance(k, str) for k in value):
                entries = {k: self.node(v, (*path, k)) for k, v in value.items()}
                return {"type": "dict", "entries": entries}
            items = []
            for k, v in value.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise UnsupportedState(
                        f"cannot save {format_path(path)}: key {k!r} is not a str or int; "
                        "convert the key to str"
                    )
                items.append([self.node(k, path), self.node(v, (*path, k))])
            return {"type": "dict", "items": items}
        if kind in (list, tuple, set, frozenset):
            nodes = [self.node(v, (*path, i)) for i, v in enumerate(value)]
            return {"type": kind.__name__, "items": nodes}
        raise UnsupportedState(
            f"cannot save {format_path(path)} of type {kind.__module__}.{kind.__qualname__}: "
            "call state.capture() first, or convert it to a supported type"
        )

    def bytes_node(self, value: bytes, path: tuple[Any, ...]) -> dict[str, Any]:
        if len(value) <= _INLINE_BYTES:
            return {"type": "bytes", "base64": base64.b64encode(value).decode("ascii")}
        key = self.unique_key(path)
        data = memoryview(bytearray(value)) if self.copy else memoryview(value)
        self.entries.append(TensorEntry(key, "U8", (len(value),), 1, data, value))
        return {"type": "bytes", "entry": key, "size": len(value)}

    def array_node(self, value: Any, path: tuple[Any, ...]) -> dict[str, Any]:
        check_array(value, path)
        np = sys.modules["numpy"]
        order = "C"
        if value.flags.c_contiguous:
            flat = value
        elif value.flags.f_contiguous:
            flat, order = value.T, "F"
        else:
            flat = np.ascontiguousarray(value)
        if self.copy:
            flat = flat.copy()
        node: dict[str, Any] = {
            "type": "ndarray",
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "order": order,
        }
        if value.size == 0:
            return node
        key = self.unique_key(path)
        raw = flat.reshape(-1).view(np.uint8)
        st_dtype = _NUMPY_TO_ST.get(value.dtype.str)
        shape = tuple(flat.shape) if st_dtype else (raw.size,)
        align = alignment(value.dtype.itemsize)
        self.entries.append(TensorEntry(key, st_dtype or "U8", shape, align, memoryview(raw), flat))
        node["entry"] = key
        return node

    def tensor_node(self, value: Any, path: tuple[Any, ...]) -> dict[str, Any]:
        check_tensor(value, path)
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype in _QUANTIZED:
            raise UnsupportedState(
                f"cannot save {format_path(path)}: quantized dtype {dtype}; save .dequantize()"
            )
        value = value.detach()
        node: dict[str, Any] = {
            "type": "tensor",
            "dtype": dtype,
            "shape": list(value.shape),
            "stride": list(value.stride()),
        }
        if value.numel() == 0:
            return node
        storage = value.untyped_storage()
        group = (str(value.device), storage.data_ptr())
        self.groups.setdefault(group, []).append((value, node, self.unique_key(path)))
        return node

    def finish_tensors(self, host_copies: Mapping[tuple[str, int], Any]) -> None:
        for group, members in self.groups.items():
            self.entries.append(_storage_entry(members, self.copy, host_copies.get(group)))


def alignment(itemsize: int) -> int:
    align = 1
    while align < 16 and itemsize % (align * 2) == 0:
        align *= 2
    return align


def _int_node(value: int) -> dict[str, Any]:
    if -(2**53) < value < 2**53:
        return {"type": "int", "value": value}
    return {"type": "int", "hex": format(value, "x")}  # no digit limit, exact


def _float_node(value: float) -> dict[str, Any]:
    if math.isfinite(value):
        return {"type": "float", "value": value}  # repr round-trips exactly, -0.0 too
    return {"type": "float", "bits": struct.pack("<d", value).hex()}


def _numpy_scalar_node(value: Any) -> dict[str, Any]:
    raw = value.tobytes()
    return {"type": "npscalar", "dtype": value.dtype.str, "base64": base64.b64encode(raw).decode()}


def byte_view(u8: Any) -> memoryview:
    """A flat memoryview over a CPU uint8 tensor's memory, without numpy or copies."""
    array = (ctypes.c_ubyte * u8.numel()).from_address(u8.data_ptr())
    return memoryview(array).cast("B")


def _storage_entry(
    members: list[tuple[Any, dict[str, Any], str]], copy: bool, host_copy: Any = None
) -> TensorEntry:
    """One entry for every tensor that shares a storage (tied weights stored once).

    ``host_copy``, for a CUDA storage, is a host uint8 tensor already holding
    a copy of the whole storage: its bytes are used instead of a new copy.
    """
    torch = sys.modules["torch"]
    first, _, key = members[0]
    storage = first.untyped_storage()
    widest, start, end = _span(members)
    padded = end > storage.nbytes()
    available = min(end, storage.nbytes())
    if host_copy is not None:
        u8 = host_copy[start:available]
    else:
        u8 = torch.empty(0, dtype=torch.uint8, device=first.device)
        u8.set_(storage, start, (available - start,), (1,))
    if u8.device.type != "cpu":
        u8 = u8.cpu()
    elif copy and host_copy is None and not padded:
        u8 = u8.clone()
    if padded:  # a new tensor: the span rounded up to the widest element
        u8 = torch.cat([u8, torch.zeros(end - available, dtype=torch.uint8)])
    for tensor, node, _ in members:
        node["entry"] = key
        node["offset"] = (tensor.storage_offset() * tensor.element_size() - start) // (
            tensor.element_size()
        )
    only = first.dtype if all(t.dtype == first.dtype for t, _, _ in members) else None
    st_dtype = TORCH_TO_ST.get(str(only).removeprefix("torch.")) if only is not None else None
    # A member that is exactly the whole span (the usual weight) names the
    # entry and gives it its shape, so safetensors readers see the real tensor.
    cover = next(
        (
            (tensor, member_key)
            for tensor, _, member_key in members
            if tensor.is_contiguous()
            and tensor.storage_offset() * widest == start
            and tensor.numel() * widest == end - start
        ),
        None,
    )
    if st_dtype is not None and cover is not None:
        shape: tuple[int, ...] = tuple(cover[0].shape)
        key = cover[1]
        for _, node, _ in members:
            node["entry"] = key
    elif st_dtype is not None:
        shape = ((end - start) // widest,)
    else:
        st_dtype, shape = "U8", (end - start,)
    return TensorEntry(key, st_dtype, shape, widest, byte_view(u8), u8)


def _span(members: list[tuple[Any, dict[str, Any], str]]) -> tuple[int, int, int]:
    """The widest element size and the byte range ``[start, end)`` the members cover."""
    if len(members) == 1 and members[0][0].is_contiguous():  # the usual case, made cheap
        tensor = members[0][0]
        size = tensor.element_size()
        start = tensor.storage_offset() * size
        return size, start, start + tensor.numel() * size
    widest = max(t.element_size() for t, _, _ in members)
    start = min(t.storage_offset() * t.element_size() for t, _, _ in members)
    end = max(_byte_end(t) for t, _, _ in members)
    return widest, start - start % widest, end + -end % widest


def _byte_end(tensor: Any) -> int:
    extent = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=False) if n > 0)
    return (tensor.storage_offset() + extent + 1) * tensor.element_size()


def encode(
    tree: Any, *, copy: bool = False, host_copies: Mapping[tuple[str, int], Any] | None = None
) -> Encoded:
    """Encode a captured state tree into JSON nodes plus tensor entries.

    With ``copy=False`` the entries reference the live tensor memory (CUDA
    tensors are always copied to host memory); the caller must not modify
    the tensors until the entries are written. ``copy=True`` makes a
    private host copy of every buffer (a snapshot a background writer can
    own). Tensors sharing a storage become one entry. ``host_copies`` maps
    ``(device, storage pointer)`` of CUDA storages to host uint8 tensors that
    already hold (or are being filled with) a copy of the whole storage, as
    ``staging.PinnedStaging`` makes; their bytes are not read here. Raises
    ``UnsupportedState`` for values that cannot be stored.
    """
    encoder = _Encoder(copy)
    root = encoder.node(tree, ())
    encoder.finish_tensors(host_copies or {})
    # Widest alignment first: with sizes that are multiples of their alignment
    # and a header padded to 8 bytes, every entry starts aligned.
    encoder.entries.sort(key=lambda entry: -entry.align)
    return Encoded(tree=root, entries=encoder.entries)


# ---------------------------------------------------------------- metrics and metadata


def clean_json(value: Any, what: str) -> Any:
    """Make metrics/metadata plain JSON; refuse what cannot be represented."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{what} key {k!r} is not a str; use str keys")
            out[k] = clean_json(v, what)
        return out
    if isinstance(value, (list, tuple)):
        return [clean_json(v, what) for v in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy scalars, 0-d tensors
    if callable(item):
        try:
            return clean_json(item(), what)
        except (ValueError, RuntimeError):
            pass
    raise ConfigError(
        f"{what} value {value!r} of type {type(value).__name__} is not JSON; "
        "pass numbers, strings, bools, lists or dicts"
    )


def _kind_names(kinds: Any) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def needed_entries(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        entry = node.get("entry")
        if isinstance(entry, str):
            out.add(entry)
        for value in node.values():
            if isinstance(value, (dict, list)):
                needed_entries(value, out)
    elif isinstance(node, list):
        for value in node:
            needed_entries(value, out)


def select_subtree(
    directory: Path | str, tree: dict[str, Any], subtree: str | None
) -> dict[str, Any]:
    if not subtree:
        return tree
    node: Any = tree
    for part in subtree.split("."):
        child = None
        if isinstance(node, dict) and node.get("type") == "dict":
            entries = node.get("entries")
            if isinstance(entries, dict):
                child = entries.get(part)
            else:
                for key, value in node.get("items") or []:
                    if isinstance(key, dict) and str(key.get("value")) == part:
                        child = value
        elif isinstance(node, dict) and node.get("type") in ("list", "tuple") and part.isdigit():
            items = node.get("items") or []
            child = items[int(part)] if int(part) < len(items) else None
        if child is None:
            raise CheckpointNotFound(
                f"checkpoint {directory} has no sub-tree {subtree!r} (missing {part!r}); "
                "load without subtree to see its keys"
            )
        node = child
    return node


def int_value(node: Mapping[str, Any]) -> int:
    """The value of an ``int`` node of a checked manifest (``hex`` has no digit limit)."""
    if "value" in node:
        return int(_typed(node["value"], int))
    return int(_typed(node["hex"], str), 16)


def float_value(node: Mapping[str, Any]) -> float:
    """The value of a ``float`` node of a checked manifest (``bits``: nan and inf)."""
    if "value" in node:
        return float(_typed(node["value"], (int, float)))
    return float(struct.unpack("<d", bytes.fromhex(_typed(node["bits"], str)))[0])


class Decoder:
    def __init__(self, directory: Path | str, buffers: dict[str, tuple[Any, int, int]]) -> None:
        self.directory = directory
        self.buffers = buffers
        self.bases: dict[str, Any] = {}
        self.views: dict[tuple[Any, ...], Any] = {}

    def decode(self, node: dict[str, Any]) -> Any:
        kind = node["type"]
        if kind == "none":
            return None
        if kind == "bool":
            return _typed(node["value"], bool)
        if kind == "int":
            return int_value(node)
        if kind == "float":
            return float_value(node)
        if kind == "str":
            return _typed(node["value"], str)
        if kind == "bytes":
            if "entry" in node:
                buf, offset, size = self.buffers[node["entry"]]
                return bytes(memoryview(buf)[offset : offset + size])
            return base64.b64decode(_typed(node["base64"], str), validate=True)
        if kind in ("list", "tuple", "set", "frozenset"):
            items = [self.decode(item) for item in _typed(node["items"], list)]
            return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
        if kind == "dict":
            if "entries" in node:
                return {k: self.decode(v) for k, v in _typed(node["entries"], dict).items()}
            return {self._key(k): self.decode(v) for k, v in _typed(node["items"], list)}
        if kind == "tensor":
            return self.tensor(node)
        if kind == "ndarray":
            return self.array(node)
        if kind == "npscalar":
            np = _import("numpy")
            dtype = _numpy_dtype(node["dtype"])
            return np.frombuffer(base64.b64decode(node["base64"]), dtype=dtype)[0]
        raise ValueError(f"unknown node type {kind!r}")

    def _key(self, node: Any) -> Any:
        key = self.decode(node)
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TypeError(f"dict key {key!r} is not a str or int")
        return key

    def tensor(self, node: dict[str, Any]) -> Any:
        torch = _import("torch")
        name = _typed(node["dtype"], str)
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or name in _QUANTIZED:
            raise ValueError(f"unknown torch dtype {name!r}")
        shape = _int_list(node["shape"])
        stride = _int_list(node["stride"])
        if len(shape) != len(stride):
            raise ValueError("shape and stride differ in length")
        if "entry" not in node:
            if math.prod(shape) != 0:
                raise ValueError("a non-empty tensor has no entry")
            return torch.empty_strided(shape, stride, dtype=dtype)
        key = _typed(node["entry"], str)
        offset = _typed(node["offset"], int)
        cache_key = (key, name, tuple(shape), tuple(stride), offset)
        if cache_key in self.views:
            return self.views[cache_key]
        buf, start, size = self.buffers[key]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        extent = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=False) if n > 0) + 1
        if offset < 0 or extent * itemsize > size:
            raise ValueError(f"tensor view reaches past its entry {key!r}")
        if key not in self.bases:
            self.bases[key] = torch.frombuffer(buf, dtype=torch.uint8, count=size, offset=start)
        base = self.bases[key]
        tensor = torch.empty(0, dtype=dtype).set_(base.untyped_storage(), offset, shape, stride)
        self.views[cache_key] = tensor
        return tensor

    def array(self, node: dict[str, Any]) -> Any:
        np = _import("numpy")
        dtype = _numpy_dtype(node["dtype"])
        shape = _int_list(node["shape"])
        order = node.get("order", "C")
        count = math.prod(shape)
        if "entry" not in node:
            if count != 0:
                raise ValueError("a non-empty array has no entry")
            return np.empty(shape, dtype=dtype, order="F" if order == "F" else "C")
        buf, start, size = self.buffers[_typed(node["entry"], str)]
        if count * dtype.itemsize != size:
            raise ValueError("array size does not match its entry")
        flat = np.frombuffer(buf, dtype=dtype, count=count, offset=start)
        if order == "F":
            return flat.reshape(shape[::-1]).T
        return flat.reshape(shape)


def _typed(value: Any, kinds: Any) -> Any:
    if isinstance(value, bool) and kinds is not bool:
        raise TypeError(f"expected {_kind_names(kinds)}, got bool")
    if not isinstance(value, kinds):
        raise TypeError(f"expected {_kind_names(kinds)}, got {type(value).__name__}")
    return value


def _int_list(value: Any) -> list[int]:
    items = _typed(value, list)
    for item in items:
        if _typed(item, int) < 0:
            raise ValueError("negative dimension")
    return items


def _numpy_dtype(text: Any) -> Any:
    np = _import("numpy")
    if not isinstance(text, str) or not _NUMPY_DTYPE.match(text):
        raise ValueError(f"numpy dtype {text!r} is not allowed")
    dtype = np.dtype(text)
    if dtype.hasobject or dtype.kind not in "biufcmMSU":
        raise ValueError(f"numpy dtype {text!r} is not allowed")
    return dtype


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as exc:
        raise ConfigError(
            f"this checkpoint holds {name} values but {name} is not installed; pip install {name}"
        ) from exc
