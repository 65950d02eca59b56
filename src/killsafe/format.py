"""One checkpoint on disk: encode a state tree, write it, read it back, verify it.

A checkpoint directory holds ``manifest.json`` (the tree as JSON, metadata,
sizes and xxh3 checksums) and ``tensors.safetensors`` (every tensor, array
and large bytes value, in the safetensors layout so that
``safetensors.safe_open`` reads the weights without killsafe). See
docs/format.md for the full description.

Writing is split in two so a background saver can use it:
``encode(tree) -> Encoded`` (JSON tree plus entries that reference live
buffers, no copies) and ``write_encoded(directory, encoded, ...)``. Reading
never executes code: the manifest is JSON, tensor bytes are raw bytes.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import json
import math
import mmap as mmap_module
import os
import re
import stat
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from killsafe import directio, schema
from killsafe.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    KillsafeError,
    UnsupportedFormat,
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

__all__ = [
    "CHECKSUM_FIELD",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "TENSOR_FILE",
    "TENSOR_FILE_ZSTD",
    "CheckpointInfo",
    "Encoded",
    "TensorEntry",
    "check_files",
    "encode",
    "float_value",
    "int_value",
    "manifest_digest",
    "read_manifest",
    "read_tree",
    "verify_checkpoint",
    "write_checkpoint",
    "write_encoded",
]

FORMAT_VERSION = 2  # 2: the manifest carries its own checksum; 1 is still read
CHECKSUM_FIELD = "manifest_xxh3"
MAX_MANIFEST_BYTES = 1 << 27  # a manifest is read whole: bound what a hostile one costs
FORMAT_NAME = "killsafe"
FORMAT_NAMES = (FORMAT_NAME, "resumable")  # the second: manifests written before the rename
MANIFEST_NAME = "manifest.json"
TENSOR_FILE = "tensors.safetensors"
TENSOR_FILE_ZSTD = "tensors.safetensors.zst"
_DATA_FILES = (TENSOR_FILE, TENSOR_FILE_ZSTD)
_ZSTD_MAX_FRAME_HEADER = 18
_INLINE_BYTES = 64  # bytes values up to this size live in the manifest (base64)
_WRITE_CHUNK = 1 << 28  # stay far below Linux's 2 GiB per write() call
_IOV_MAX = 512
# Level 1: on float tensors it compresses as well as level 3 (about 0.92 of
# the raw size) and runs faster; the write is the bottleneck either way.
ZSTD_LEVEL = 1

# torch dtype name -> safetensors dtype name, for dtypes safetensors can name.
_TORCH_TO_ST = {
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


# ---------------------------------------------------------------- info


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

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], path: Path) -> CheckpointInfo:
        """Build from a manifest already checked by ``read_manifest``."""
        size = sum(int(f["size"]) for f in manifest["files"].values())
        return cls(
            step=manifest["step"],
            name=manifest["name"],
            reason=manifest["reason"],
            created=float(manifest["created"]),
            metrics=dict(manifest["metrics"]),
            size=size,
            path=Path(path),
            metadata=dict(manifest["metadata"]),
            format_version=manifest["format_version"],
            manifest_checksum=CHECKSUM_FIELD in manifest,
        )


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
        align = _alignment(value.dtype.itemsize)
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


def _alignment(itemsize: int) -> int:
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


def _byte_view(u8: Any) -> memoryview:
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
    st_dtype = _TORCH_TO_ST.get(str(only).removeprefix("torch.")) if only is not None else None
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
    return TensorEntry(key, st_dtype, shape, widest, _byte_view(u8), u8)


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


# ---------------------------------------------------------------- writing


def _safetensors_header(entries: Sequence[TensorEntry]) -> tuple[bytes, dict[str, Any]]:
    header: dict[str, Any] = {"__metadata__": {"format": FORMAT_NAME}}
    table: dict[str, Any] = {}
    offset = 0
    for entry in entries:
        span = [offset, offset + entry.nbytes]
        header[entry.key] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": span}
        table[entry.key] = {"dtype": entry.dtype, "shape": list(entry.shape), "offsets": span}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, table


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


class _HashingFile:
    """Write-only file over a descriptor that hashes what goes through it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hasher = xxhash.xxh3_64()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        _write_buffers(self.fd, [view])
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        pass


def _chunks(buffers: Iterable[memoryview]) -> Iterator[memoryview]:
    for view in buffers:
        for start in range(0, view.nbytes, _WRITE_CHUNK):
            yield view[start : start + _WRITE_CHUNK]


def _libc_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2
_KICK_EVERY = 1 << 26


def _write_buffers(fd: int, buffers: Iterable[memoryview], *, kick: bool = False) -> None:
    """Write buffers in order with writev, straight from their memory.

    With ``kick``, writeback of every 64 MiB written is started at once
    (``sync_file_range``), so the disk works while later bytes are still
    being copied and the final fsync has little left to do.
    """
    limit = _KICK_EVERY if kick else _WRITE_CHUNK
    batch: list[memoryview] = []
    size = 0
    offset = 0
    for chunk in _chunks(buffers):
        batch.append(chunk)
        size += chunk.nbytes
        if len(batch) >= _IOV_MAX or size >= limit:
            _writev_all(fd, batch)
            if kick and _SYNC_FILE_RANGE is not None:
                _SYNC_FILE_RANGE(fd, offset, size, _SYNC_FILE_RANGE_WRITE)
            offset += size
            batch, size = [], 0
    if batch:
        _writev_all(fd, batch)


class _Fsync(threading.Thread):
    """fsync a descriptor in the background, then close it."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="killsafe-fsync", daemon=True)
        self.fd = fd
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self.fd)

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _writev_all(fd: int, batch: list[memoryview]) -> None:
    while batch:
        written = os.writev(fd, batch)
        if written <= 0:
            raise OSError("writev wrote nothing")
        while batch and written >= batch[0].nbytes:
            written -= batch[0].nbytes
            batch.pop(0)
        if written:
            batch[0] = batch[0][written:]


def _hash_entries(header: bytes, entries: Sequence[TensorEntry], whole: bool) -> dict[str, Any]:
    """Per-entry and header xxh3 digests, plus the whole file's when asked."""
    result: dict[str, Any] = {"header": xxhash.xxh3_64_hexdigest(header), "entries": {}}
    file_hasher = xxhash.xxh3_64(header) if whole else None
    for entry in entries:
        result["entries"][entry.key] = xxhash.xxh3_64_hexdigest(entry.data)
        if file_hasher is not None:
            file_hasher.update(entry.data)
    if file_hasher is not None:
        result["file"] = file_hasher.hexdigest()
    return result


class _HashThread(threading.Thread):
    """Hash while the main thread writes: xxhash releases the GIL on big buffers."""

    def __init__(self, header: bytes, entries: Sequence[TensorEntry], whole: bool) -> None:
        super().__init__(name="killsafe-hash", daemon=True)
        self.args = (header, entries, whole)
        self.result: dict[str, Any] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = _hash_entries(*self.args)
        except BaseException as exc:  # reported to the writer thread
            self.error = exc

    def digests(self) -> dict[str, Any]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


def _write_tensor_file(
    directory: Path, header: bytes, entries: Sequence[TensorEntry], compression: str | None
) -> tuple[str, dict[str, Any], dict[str, Any], _Fsync]:
    """Write the tensor file; its fsync is left running (join the returned thread)."""
    name = TENSOR_FILE_ZSTD if compression else TENSOR_FILE
    hasher = _HashThread(header, entries, whole=not compression)
    hasher.start()
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if compression:
            file_info = _write_zstd(fd, header, entries)
        else:
            buffers = [memoryview(header), *(e.data for e in entries)]
            if not directio.write_direct(fd, buffers):
                _write_buffers(fd, buffers, kick=True)
            file_info = {"size": len(header) + sum(e.nbytes for e in entries)}
    except BaseException:
        os.close(fd)
        hasher.join()
        raise
    # fsync in the background while the manifest is written and fsynced:
    # both must finish before the commit, and the disk can overlap them.
    syncing = _Fsync(fd)
    syncing.start()
    try:
        digests = hasher.digests()
    except BaseException:
        syncing.join()
        raise
    if not compression:
        file_info["xxh3"] = digests["file"]
    return name, file_info, digests, syncing


def _write_zstd(fd: int, header: bytes, entries: Sequence[TensorEntry]) -> dict[str, Any]:
    import zstandard

    raw_size = len(header) + sum(e.nbytes for e in entries)
    out = _HashingFile(fd)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    writer_cm = compressor.stream_writer(out, size=raw_size, closefd=False)  # type: ignore[arg-type]
    with writer_cm as writer:
        writer.write(header)
        for chunk in _chunks(e.data for e in entries):
            writer.write(chunk)
    return {"size": out.size, "xxh3": out.hasher.hexdigest(), "codec": "zstd", "raw_size": raw_size}


def _write_json_file(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=1, allow_nan=False).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_buffers(fd, [memoryview(text)])
        os.fsync(fd)
    finally:
        os.close(fd)


def write_encoded(
    directory: str | os.PathLike[str],
    encoded: Encoded,
    *,
    step: int,
    name: str | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    compression: str | None = None,
    created: float | None = None,
) -> dict[str, Any]:
    """Write an encoded tree into an existing (temporary) directory.

    Writes the tensor file (when there are entries) and then
    ``manifest.json``, fsyncing each. The directory itself is neither
    fsynced nor renamed: committing is the store's job. Returns the
    manifest. Raises ``ConfigError`` for bad metrics/metadata/compression
    and lets ``OSError`` through (the store turns it into ``SaveFailed``).
    """
    if compression not in (None, "zstd"):
        raise ConfigError(f"compression {compression!r} is not supported; use None or 'zstd'")
    clean_metrics = clean_json(dict(metrics or {}), "metrics")
    clean_metadata = clean_json(dict(metadata or {}), "metadata")
    directory = Path(directory)
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {"entries": {}}
    syncing: _Fsync | None = None
    if encoded.entries:
        header, table = _safetensors_header(encoded.entries)
        file_name, file_info, digests, syncing = _write_tensor_file(
            directory, header, encoded.entries, compression
        )
        files[file_name] = file_info
        for key, row in table.items():
            row["xxh3"] = digests["entries"][key]
        tensors = {
            "file": file_name,
            "header_size": len(header),
            "header_xxh3": digests["header"],
            "entries": table,
        }
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": step,
        "name": name,
        "reason": reason,
        "created": time.time() if created is None else created,
        "metrics": clean_metrics,
        "metadata": clean_metadata,
        "files": files,
        "tensors": tensors,
        "tree": encoded.tree,
    }
    manifest[CHECKSUM_FIELD] = manifest_digest(manifest)
    try:
        _write_json_file(directory / MANIFEST_NAME, manifest)
    finally:
        if syncing is not None:
            syncing.wait()
    return manifest


def write_checkpoint(
    directory: str | os.PathLike[str],
    tree: Any,
    *,
    step: int,
    name: str | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    compression: str | None = None,
) -> dict[str, Any]:
    """``encode`` then ``write_encoded``: write one checkpoint into ``directory``."""
    return write_encoded(
        directory,
        encode(tree),
        step=step,
        name=name,
        reason=reason,
        metrics=metrics,
        metadata=metadata,
        compression=compression,
    )


# ---------------------------------------------------------------- reading


def _corrupt(directory: Path, what: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(
        f"checkpoint {directory} is corrupt: {what}; restore it from a copy or load another one"
    )


def _kind_names(kinds: Any) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


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


def _open_regular(directory: Path, name: str) -> int:
    """A read descriptor of ``directory/name``, which must be a regular file.

    The file is opened without following a symbolic link and without
    blocking (a named pipe would block ``open``), then checked with
    ``fstat``: links, pipes, devices and directories are refused as corrupt.
    A missing file is ``CheckpointNotFound`` when the whole checkpoint
    vanished meanwhile (deleted or pruned), corrupt otherwise.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(directory / name, flags)
    except FileNotFoundError:
        raise _missing(directory, name) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _corrupt(directory, f"{name} is a symbolic link, never followed") from None
        raise _corrupt(directory, f"cannot open {name} ({exc.strerror})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _corrupt(directory, f"{name} is not a regular file")
    return fd


def _missing(directory: Path, name: str) -> KillsafeError:
    if not os.path.lexists(directory):
        return CheckpointNotFound(
            f"checkpoint {directory} vanished while being read (deleted or pruned); "
            "load another one"
        )
    return _corrupt(directory, f"{name} is missing")


def _read_manifest_bytes(directory: Path) -> bytes:
    if os.path.islink(directory):
        raise _corrupt(directory, "the checkpoint directory is a symbolic link, never followed")
    try:
        fd = _open_regular(directory, MANIFEST_NAME)
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
            raise _corrupt(
                directory, f"{MANIFEST_NAME} has {size} bytes, over the limit {MAX_MANIFEST_BYTES}"
            )
        with open(fd, "rb", buffering=0, closefd=False) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise _corrupt(directory, f"cannot read {MANIFEST_NAME} ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _corrupt(directory, f"{MANIFEST_NAME} grew over the limit while being read")
    return raw


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``manifest.json`` and check it: its own checksum, then the schema.

    Only a regular file of at most ``MAX_MANIFEST_BYTES`` is read, never
    through a symbolic link. Raises ``CheckpointNotFound`` when the directory
    or its manifest is missing, ``UnsupportedFormat`` for a newer format
    version and ``CorruptCheckpoint`` for anything else that does not check out.
    """
    directory = Path(directory)
    raw = _read_manifest_bytes(directory)
    try:
        manifest = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(directory, f"{MANIFEST_NAME} is not valid JSON") from exc
    _check_version(directory, manifest)
    _check_digest(directory, manifest)
    try:
        schema.check(manifest)
    except schema.SchemaError as exc:
        raise _corrupt(directory, f"{MANIFEST_NAME} does not match the format: {exc}") from exc
    return manifest


def check_files(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Check, without reading them, that the manifest's files are regular files of their size.

    One ``lstat`` each: a missing, linked, special or truncated tensor file is
    found when checkpoints are listed, not only when they are loaded.
    """
    directory = Path(directory)
    for name, info in manifest["files"].items():
        try:
            found = os.lstat(directory / name)
        except FileNotFoundError:
            raise _missing(directory, name) from None
        if stat.S_ISLNK(found.st_mode):
            raise _corrupt(directory, f"{name} is a symbolic link, never followed")
        if not stat.S_ISREG(found.st_mode):
            raise _corrupt(directory, f"{name} is not a regular file")
        if found.st_size != info["size"]:
            raise _corrupt(directory, f"{name} has {found.st_size} bytes, expected {info['size']}")
        if info.get("codec") == "zstd":
            _check_frame_size(directory, name, info["raw_size"])


def _check_frame_size(directory: Path, name: str, raw_size: int) -> None:
    """The zstd frame header must announce the ``raw_size`` the manifest claims."""
    import zstandard

    fd = _open_regular(directory, name)
    try:
        head = os.pread(fd, _ZSTD_MAX_FRAME_HEADER, 0)
    finally:
        os.close(fd)
    try:
        framed = zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise _corrupt(directory, f"{name} is not a zstd frame") from exc
    if framed != raw_size:
        raise _corrupt(directory, f"{name} holds {framed} bytes, raw_size says {raw_size}")


def _check_version(directory: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMAT_NAMES:
        raise _corrupt(directory, f"{MANIFEST_NAME} is not a killsafe manifest")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"checkpoint {directory} has format version {version}, newer than {FORMAT_VERSION}; "
            "upgrade killsafe to read it"
        )


def _check_digest(directory: Path, manifest: dict[str, Any]) -> None:
    """Version 2 manifests carry their checksum; version 1 ones (older releases) may not."""
    stored = manifest.get(CHECKSUM_FIELD)
    if stored is None and manifest.get("format_version") == 1:
        return
    try:
        actual = manifest_digest(manifest)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(directory, f"{MANIFEST_NAME} cannot be checksummed") from exc
    if stored is None:
        raise _corrupt(directory, f"{MANIFEST_NAME} has no {CHECKSUM_FIELD}")
    if stored != actual:
        raise _corrupt(directory, f"{MANIFEST_NAME} fails its own checksum")


def _needed_entries(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        entry = node.get("entry")
        if isinstance(entry, str):
            out.add(entry)
        for value in node.values():
            if isinstance(value, (dict, list)):
                _needed_entries(value, out)
    elif isinstance(node, list):
        for value in node:
            _needed_entries(value, out)


def _select(directory: Path, tree: dict[str, Any], subtree: str | None) -> dict[str, Any]:
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


def _open_data(directory: Path, manifest: dict[str, Any]) -> tuple[int, Path, dict[str, Any]]:
    """A descriptor of the tensor file (a regular file of the recorded size), its path and info."""
    tensors = manifest["tensors"]
    info = manifest["files"][tensors["file"]]
    path = directory / tensors["file"]
    fd = _open_regular(directory, tensors["file"])
    size = os.fstat(fd).st_size
    if size != info["size"]:
        os.close(fd)
        raise _corrupt(directory, f"{tensors['file']} has {size} bytes, expected {info['size']}")
    return fd, path, info


def _anonymous_buffer(size: int) -> Any:
    """Private writable memory for ``size`` bytes, on huge pages where the kernel allows.

    Huge pages cut the page faults of filling a large buffer several-fold.
    """
    if size < (1 << 21):
        return bytearray(size)
    buffer = mmap_module.mmap(-1, size)
    advice = getattr(mmap_module, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):
            buffer.madvise(advice)
    return buffer


def _read_full(fd: int, path: Path, size: int) -> Any:
    buffer = _anonymous_buffer(size)
    view = memoryview(buffer)
    with open(fd, "rb", buffering=0, closefd=False) as f:
        done = 0
        while done < size:
            n = f.readinto(view[done : done + _WRITE_CHUNK])
            if not n:
                break
            done += n
    view.release()
    if done != size:
        raise _corrupt(path.parent, f"{path.name} shrank while being read")
    return buffer


def _map_file(fd: int) -> Any:
    """Copy-on-write map of a file, with the kernel asked to read it ahead."""
    mapped = mmap_module.mmap(fd, 0, access=mmap_module.ACCESS_COPY)
    advice = getattr(mmap_module, "MADV_WILLNEED", None)
    if advice is not None and len(mapped):
        with contextlib.suppress(OSError):
            mapped.madvise(advice)
    return mapped


def _decompress(directory: Path, fd: int, path: Path, info: dict[str, Any], verify: bool) -> Any:
    import zstandard

    compressed = _read_full(fd, path, info["size"])
    if verify and xxhash.xxh3_64_hexdigest(compressed) != info["xxh3"]:
        raise _corrupt(directory, f"{path.name} fails its checksum")
    raw_size = int(info.get("raw_size", 0))
    _check_frame_size(directory, path.name, raw_size)  # before allocating what it claims
    try:
        buffer = _anonymous_buffer(raw_size)
    except (OSError, MemoryError, OverflowError) as exc:
        raise _corrupt(
            directory, f"{path.name} claims {raw_size} bytes, more than can be allocated"
        ) from exc
    view = memoryview(buffer)
    done = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(compressed) as reader:
            while done < raw_size:
                n = reader.readinto(view[done:])
                if not n:
                    break
                done += n
            extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise _corrupt(directory, f"{path.name} does not decompress") from exc
    finally:
        view.release()
    if done != raw_size or extra:
        raise _corrupt(directory, f"{path.name} does not decompress to {raw_size} bytes")
    return buffer


def _load_buffers(
    directory: Path,
    manifest: dict[str, Any],
    needed: set[str],
    full: bool,
    mmap: bool,
    verify: bool,
) -> dict[str, tuple[Any, int, int]]:
    """Map entry key -> (buffer, absolute offset, size), reading as little as possible."""
    tensors = manifest["tensors"]
    table = tensors["entries"]
    missing = needed - set(table)
    if missing:
        raise _corrupt(
            directory, f"the tree names tensor entries {sorted(missing)[:3]} not in the table"
        )
    if not needed:
        return {}
    fd, path, info = _open_data(directory, manifest)
    try:
        return _read_entries(directory, fd, path, info, tensors, needed, full, mmap, verify)
    finally:
        os.close(fd)


def _read_entries(
    directory: Path,
    fd: int,
    path: Path,
    info: dict[str, Any],
    tensors: dict[str, Any],
    needed: set[str],
    full: bool,
    mmap: bool,
    verify: bool,
) -> dict[str, tuple[Any, int, int]]:
    table = tensors["entries"]
    base = tensors["header_size"]
    result: dict[str, tuple[Any, int, int]] = {}
    if info.get("codec") == "zstd":
        buffer: Any = _decompress(directory, fd, path, info, verify)
    elif mmap:
        buffer = _map_file(fd)
    elif full:
        buffer = _read_full(fd, path, info["size"])
    else:
        buffer = None
    if buffer is not None:
        if verify and xxhash.xxh3_64_hexdigest(memoryview(buffer)[:base]) != tensors["header_xxh3"]:
            raise _corrupt(directory, f"{path.name} header fails its checksum")
        for key in needed:
            start, end = table[key]["offsets"]
            result[key] = (buffer, base + start, end - start)
    else:
        for key in sorted(needed, key=lambda k: table[k]["offsets"][0]):
            start, end = table[key]["offsets"]
            chunk = bytearray(end - start)
            if os.preadv(fd, [chunk], base + start) != len(chunk):
                raise _corrupt(directory, f"{path.name} is truncated")
            result[key] = (chunk, 0, len(chunk))
    if verify:
        bad = _first_bad_entry(result, table)
        if bad is not None:
            raise _corrupt(directory, f"tensor {bad!r} fails its checksum")
    return result


_PARALLEL_HASH_BYTES = 1 << 26


def _first_bad_entry(buffers: dict[str, tuple[Any, int, int]], table: dict[str, Any]) -> str | None:
    """The first entry whose bytes do not match their xxh3, checked on several threads.

    xxhash releases the GIL, so the entries (biggest first, for balance) are
    hashed on up to four threads; on a mapped file that also faults the
    pages in from several threads at once.
    """

    def matches(key: str) -> bool:
        buf, offset, size = buffers[key]
        return bool(
            xxhash.xxh3_64_hexdigest(memoryview(buf)[offset : offset + size]) == table[key]["xxh3"]
        )

    keys = sorted(buffers, key=lambda k: -buffers[k][2])
    total = sum(size for _, _, size in buffers.values())
    workers = min(4, os.cpu_count() or 1, len(keys))
    if workers < 2 or total < _PARALLEL_HASH_BYTES:
        return next((key for key in keys if not matches(key)), None)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="killsafe-verify") as pool:
        results = list(pool.map(matches, keys))
    return next((key for key, ok in zip(keys, results, strict=True) if not ok), None)


def read_tree(
    directory: str | os.PathLike[str],
    manifest: dict[str, Any] | None = None,
    *,
    subtree: str | None = None,
    mmap: bool = False,
    verify: bool = True,
) -> Any:
    """Rebuild the saved tree (or the dotted ``subtree``) from a checkpoint.

    Only the tensor bytes the (sub)tree needs are read; with ``mmap=True``
    tensors are copy-on-write views of the file (writable, the file is never
    modified). Checksums of what is read are verified unless
    ``verify=False``. Raises ``CorruptCheckpoint`` for anything that does not
    check out; never executes code from the files.
    """
    directory = Path(directory)
    if manifest is None:
        manifest = read_manifest(directory)
    node = _select(directory, manifest["tree"], subtree)
    needed: set[str] = set()
    _needed_entries(node, needed)
    buffers = _load_buffers(directory, manifest, needed, not subtree, mmap, verify)
    try:
        return _Decoder(directory, buffers).decode(node)
    except RecursionError as exc:
        raise _corrupt(directory, "the state tree is nested too deeply") from exc
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as exc:
        raise _corrupt(directory, f"the tree is malformed ({_one_line(exc)})") from exc
    except (RuntimeError, MemoryError) as exc:  # torch refusing a view it cannot build
        raise _corrupt(directory, f"a value cannot be rebuilt ({_one_line(exc)})") from exc


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, short: torch appends C++ backtraces."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file_digest(f: Any) -> str:
    digest = xxhash.xxh3_64()
    while chunk := f.read(1 << 24):
        digest.update(chunk)
    return str(digest.hexdigest())


def verify_checkpoint(
    directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None
) -> None:
    """Check every checksum and the tree of a checkpoint; raise ``CorruptCheckpoint``."""
    directory = Path(directory)
    if manifest is None:
        manifest = read_manifest(directory)
    tensors = manifest["tensors"]
    needed = set(tensors["entries"])
    used: set[str] = set()
    _needed_entries(manifest["tree"], used)
    if used - needed:
        raise _corrupt(directory, "the tree names tensor entries that are not in the table")
    if needed:
        fd, path, info = _open_data(directory, manifest)
        with open(fd, "rb", buffering=0) as f:
            if info.get("codec") != "zstd" and _file_digest(f) != info["xxh3"]:
                raise _corrupt(directory, f"{path.name} fails its checksum")
    # The whole-file checksum above covers an uncompressed file; rebuilding
    # the tree then only checks its structure and bounds.
    compressed = bool(needed) and manifest["files"][tensors["file"]].get("codec") == "zstd"
    read_tree(directory, manifest, mmap=True, verify=compressed)


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


class _Decoder:
    def __init__(self, directory: Path, buffers: dict[str, tuple[Any, int, int]]) -> None:
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
