"""The tensor file: safetensors layout, xxh3 checksums, optional zstd.

Writing hashes on one thread while another writes; reading takes only the
entries a tree needs (or maps the file) and verifies their checksums.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import xxhash

from killsafe.format.codec import TensorEntry
from killsafe.format.io import (
    BackgroundFsync,
    FastWrite,
    Where,
    anonymous_buffer,
    chunked,
    corrupt,
    map_file,
    open_regular,
    read_full,
    write_buffers,
)
from killsafe.format.manifest import FORMAT_NAME, TENSOR_FILE, TENSOR_FILE_ZSTD

ZSTD_MAX_FRAME_HEADER = 18
# Level 1: on float tensors it compresses as well as level 3 (about 0.92 of
# the raw size) and runs faster; the write is the bottleneck either way.
ZSTD_LEVEL = 1


def safetensors_header(entries: Sequence[TensorEntry]) -> tuple[bytes, dict[str, Any]]:
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


class HashingWriter:
    """Write-only file over a ``write`` callable that hashes and counts what goes through it."""

    def __init__(self, write: Callable[[memoryview], None]) -> None:
        self._write = write
        self.hasher = xxhash.xxh3_64()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self._write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        pass


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


class HashThread(threading.Thread):
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


def write_tensor_file(
    directory: Path,
    header: bytes,
    entries: Sequence[TensorEntry],
    compression: str | None,
    fast_write: FastWrite | None = None,
) -> tuple[str, dict[str, Any], dict[str, Any], BackgroundFsync]:
    """Write the tensor file; its fsync is left running (join the returned thread).

    An uncompressed file is offered to ``fast_write`` first (the medium's
    way, say ``O_DIRECT``); when it declines, the buffers are written here.
    """
    name = TENSOR_FILE_ZSTD if compression else TENSOR_FILE
    hasher = HashThread(header, entries, whole=not compression)
    hasher.start()
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if compression:
            file_info = write_zstd(lambda view: write_buffers(fd, [view]), header, entries)
        else:
            buffers = [memoryview(header), *(e.data for e in entries)]
            if fast_write is None or not fast_write(fd, buffers):
                write_buffers(fd, buffers, kick=True)
            file_info = {"size": len(header) + sum(e.nbytes for e in entries)}
    except BaseException:
        os.close(fd)
        hasher.join()
        raise
    # fsync in the background while the manifest is written and fsynced:
    # both must finish before the commit, and the disk can overlap them.
    syncing = BackgroundFsync(fd)
    syncing.start()
    try:
        digests = hasher.digests()
    except BaseException:
        syncing.join()
        raise
    if not compression:
        file_info["xxh3"] = digests["file"]
    return name, file_info, digests, syncing


def write_zstd(
    write: Callable[[memoryview], None], header: bytes, entries: Sequence[TensorEntry]
) -> dict[str, Any]:
    """Compress the tensor file through ``write``; return its file info (size, xxh3, raw size)."""
    import zstandard

    raw_size = len(header) + sum(e.nbytes for e in entries)
    out = HashingWriter(write)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    writer_cm = compressor.stream_writer(out, size=raw_size, closefd=False)  # type: ignore[arg-type]
    with writer_cm as writer:
        writer.write(header)
        for chunk in chunked(e.data for e in entries):
            writer.write(chunk)
    return {"size": out.size, "xxh3": out.hasher.hexdigest(), "codec": "zstd", "raw_size": raw_size}


def check_frame_size(directory: Path, name: str, raw_size: int) -> None:
    """The zstd frame header must announce the ``raw_size`` the manifest claims."""
    fd = open_regular(directory, name)
    try:
        head = os.pread(fd, ZSTD_MAX_FRAME_HEADER, 0)
    finally:
        os.close(fd)
    check_frame_head(directory, name, head, raw_size)


def check_frame_head(directory: Where, name: str, head: bytes, raw_size: int) -> None:
    """The zstd frame header ``head`` must announce ``raw_size`` bytes."""
    import zstandard

    try:
        framed = zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise corrupt(directory, f"{name} is not a zstd frame") from exc
    if framed != raw_size:
        raise corrupt(directory, f"{name} holds {framed} bytes, raw_size says {raw_size}")


def open_data(directory: Path, manifest: dict[str, Any]) -> tuple[int, Path, dict[str, Any]]:
    """A descriptor of the tensor file (a regular file of the recorded size), its path and info."""
    tensors = manifest["tensors"]
    info = manifest["files"][tensors["file"]]
    path = directory / tensors["file"]
    fd = open_regular(directory, tensors["file"])
    size = os.fstat(fd).st_size
    if size != info["size"]:
        os.close(fd)
        raise corrupt(directory, f"{tensors['file']} has {size} bytes, expected {info['size']}")
    return fd, path, info


def decompress(
    directory: Where, compressed: Any, name: str, info: dict[str, Any], verify: bool
) -> Any:
    """The raw tensor file from its zstd bytes, checked against ``info`` before allocating."""
    import zstandard

    if verify and xxhash.xxh3_64_hexdigest(compressed) != info["xxh3"]:
        raise corrupt(directory, f"{name} fails its checksum")
    raw_size = int(info.get("raw_size", 0))
    head = bytes(memoryview(compressed)[:ZSTD_MAX_FRAME_HEADER])
    check_frame_head(directory, name, head, raw_size)  # before allocating what it claims
    try:
        buffer = anonymous_buffer(raw_size)
    except (OSError, MemoryError, OverflowError) as exc:
        raise corrupt(
            directory, f"{name} claims {raw_size} bytes, more than can be allocated"
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
        raise corrupt(directory, f"{name} does not decompress") from exc
    finally:
        view.release()
    if done != raw_size or extra:
        raise corrupt(directory, f"{name} does not decompress to {raw_size} bytes")
    return buffer


def check_needed(directory: Where, tensors: dict[str, Any], needed: set[str]) -> None:
    """Every entry the tree needs must be in the table."""
    missing = needed - set(tensors["entries"])
    if missing:
        raise corrupt(
            directory, f"the tree names tensor entries {sorted(missing)[:3]} not in the table"
        )


def load_buffers(
    directory: Path,
    manifest: dict[str, Any],
    needed: set[str],
    full: bool,
    mmap: bool,
    verify: bool,
) -> dict[str, tuple[Any, int, int]]:
    """Map entry key -> (buffer, absolute offset, size), reading as little as possible."""
    tensors = manifest["tensors"]
    check_needed(directory, tensors, needed)
    if not needed:
        return {}
    fd, path, info = open_data(directory, manifest)
    try:
        if info.get("codec") == "zstd":
            raw = read_full(fd, path, info["size"])
            buffer: Any = decompress(directory, raw, path.name, info, verify)
        elif mmap:
            buffer = map_file(fd)
        elif full:
            buffer = read_full(fd, path, info["size"])
        else:
            buffer = None

        def pread(offset: int, out: bytearray) -> bool:
            return bool(os.preadv(fd, [out], offset) == len(out))

        return collect_entries(directory, path.name, tensors, needed, buffer, pread, verify)
    finally:
        os.close(fd)


Pread = Callable[[int, bytearray], bool]
"""Fill the buffer from an offset of the tensor file; False when the file is too short."""


def collect_entries(
    directory: Where,
    name: str,
    tensors: dict[str, Any],
    needed: set[str],
    buffer: Any,
    pread: Pread,
    verify: bool,
) -> dict[str, tuple[Any, int, int]]:
    """The needed entries: views of ``buffer`` (the whole raw file) or, without one, each
    entry read on its own with ``pread``; checksums verified when asked."""
    table = tensors["entries"]
    base = tensors["header_size"]
    result: dict[str, tuple[Any, int, int]] = {}
    if buffer is not None:
        if verify and xxhash.xxh3_64_hexdigest(memoryview(buffer)[:base]) != tensors["header_xxh3"]:
            raise corrupt(directory, f"{name} header fails its checksum")
        for key in needed:
            start, end = table[key]["offsets"]
            result[key] = (buffer, base + start, end - start)
    else:
        for key in sorted(needed, key=lambda k: table[k]["offsets"][0]):
            start, end = table[key]["offsets"]
            chunk = bytearray(end - start)
            if not pread(base + start, chunk):
                raise corrupt(directory, f"{name} is truncated")
            result[key] = (chunk, 0, len(chunk))
    if verify:
        bad = first_bad_entry(result, table)
        if bad is not None:
            raise corrupt(directory, f"tensor {bad!r} fails its checksum")
    return result


_PARALLEL_HASH_BYTES = 1 << 26


def first_bad_entry(buffers: dict[str, tuple[Any, int, int]], table: dict[str, Any]) -> str | None:
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


def file_digest(f: Any) -> str:
    digest = xxhash.xxh3_64()
    while chunk := f.read(1 << 24):
        digest.update(chunk)
    return str(digest.hexdigest())
