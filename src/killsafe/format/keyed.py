"""One checkpoint on a keyed medium (an object store, memory): written through
sinks, read through ranged sources.

The medium is anything with ``open_write(key)`` and ``source(key)`` (the
storage backends are, structurally; format imports none of them). A
checkpoint's files live under a prefix of their own (one save attempt);
the manifest is returned, not written: writing it, create-only and last,
is the store's commit. Reading is bounded by what the manifest records, as
on disk; there are no memory maps, so a whole tensor file is fetched in
parallel ranged reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from killsafe.format.checkpoint import (
    build_manifest,
    check_compression,
    clean_fields,
    decode_tree,
    tensor_table,
)
from killsafe.format.codec import Encoded, TensorEntry, needed_entries, select_subtree
from killsafe.format.io import Where, anonymous_buffer, chunked, corrupt
from killsafe.format.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    TENSOR_FILE,
    TENSOR_FILE_ZSTD,
    parse_manifest,
)
from killsafe.format.tensorfile import (
    HashThread,
    check_needed,
    collect_entries,
    decompress,
    safetensors_header,
    write_zstd,
)

__all__ = [
    "KeyedMedium",
    "read_manifest_at",
    "read_tree_at",
    "verify_at",
    "write_files",
]

RANGE_BYTES = 16 << 20  # one ranged read of a whole-file fetch
_READERS = 8


class KeyedSink(Protocol):
    def write(self, data: Any) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class KeyedSource(Protocol):
    size: int

    def read(self, offset: int = 0, length: int | None = None) -> memoryview: ...

    def close(self) -> None: ...


class KeyedMedium(Protocol):
    """What the format needs of a medium: write an object whole, read ranges of one."""

    def open_write(self, key: str) -> Any: ...

    def source(self, key: str) -> Any: ...


def write_files(
    medium: KeyedMedium,
    prefix: str,
    encoded: Encoded,
    *,
    attempt: str,
    step: int,
    name: str | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    compression: str | None = None,
    created: float | None = None,
) -> dict[str, Any]:
    """Write the tensor file under ``prefix`` and return the manifest naming ``attempt``.

    ``prefix`` is the attempt's own (``.../<attempt>/``); the manifest goes
    one level up, written by the caller. Lets the medium's errors through.
    """
    check_compression(compression)
    metrics, metadata = clean_fields(metrics, metadata)
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {"entries": {}}
    if encoded.entries:
        header, table = safetensors_header(encoded.entries)
        file_name = TENSOR_FILE_ZSTD if compression else TENSOR_FILE
        info, digests = _upload(medium, prefix + file_name, header, encoded.entries, compression)
        files[file_name] = info
        tensors = tensor_table(file_name, header, table, digests)
    return build_manifest(
        encoded,
        files,
        tensors,
        step=step,
        name=name,
        reason=reason,
        metrics=metrics,
        metadata=metadata,
        created=created,
        attempt=attempt,
    )


def _upload(
    medium: KeyedMedium,
    key: str,
    header: bytes,
    entries: Sequence[TensorEntry],
    compression: str | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stream the tensor file into one object while another thread hashes the entries."""
    hasher = HashThread(header, entries, whole=not compression)
    hasher.start()
    sink: KeyedSink = medium.open_write(key)
    try:
        if compression:
            info = write_zstd(sink.write, header, entries)
        else:
            for view in chunked([memoryview(header), *(e.data for e in entries)]):
                sink.write(view)
            info = {"size": len(header) + sum(e.nbytes for e in entries)}
        digests = hasher.digests()
        if not compression:
            info["xxh3"] = digests["file"]
        sink.commit()
    except BaseException:
        sink.abort()
        hasher.join()
        raise
    return info, digests


def read_manifest_at(medium: KeyedMedium, key: str, where: Where) -> dict[str, Any]:
    """Read and check the manifest object at ``key`` (bounded, checksum, schema)."""
    source: KeyedSource = medium.source(key)
    try:
        if source.size > MAX_MANIFEST_BYTES:
            raise corrupt(
                where,
                f"{MANIFEST_NAME} has {source.size} bytes, over the limit {MAX_MANIFEST_BYTES}",
            )
        raw = bytes(source.read())
    finally:
        source.close()
    return parse_manifest(raw, where)


def data_prefix(checkpoint: str, manifest: dict[str, Any], where: Where) -> str:
    """Where a manifest's files are: ``<checkpoint>/<attempt>/``."""
    attempt = manifest.get("attempt")
    if attempt is None and manifest["files"]:
        raise corrupt(where, f"{MANIFEST_NAME} names files but no attempt holding them")
    return f"{checkpoint}/{attempt}/"


def read_tree_at(
    medium: KeyedMedium,
    checkpoint: str,
    manifest: dict[str, Any],
    where: Where,
    *,
    subtree: str | None = None,
    verify: bool = True,
) -> Any:
    """Rebuild the saved tree (or ``subtree``) of the checkpoint under key ``checkpoint``."""
    node = select_subtree(where, manifest["tree"], subtree)
    needed: set[str] = set()
    needed_entries(node, needed)
    buffers = _load_buffers(medium, checkpoint, manifest, where, needed, not subtree, verify)
    return decode_tree(where, node, buffers)


def verify_at(medium: KeyedMedium, checkpoint: str, manifest: dict[str, Any], where: Where) -> None:
    """Check every checksum and the tree of the checkpoint under key ``checkpoint``."""
    tensors = manifest["tensors"]
    used: set[str] = set()
    needed_entries(manifest["tree"], used)
    if used - set(tensors["entries"]):
        raise corrupt(where, "the tree names tensor entries that are not in the table")
    read_tree_at(medium, checkpoint, manifest, where, verify=True)


def _load_buffers(
    medium: KeyedMedium,
    checkpoint: str,
    manifest: dict[str, Any],
    where: Where,
    needed: set[str],
    full: bool,
    verify: bool,
) -> dict[str, tuple[Any, int, int]]:
    tensors = manifest["tensors"]
    check_needed(where, tensors, needed)
    if not needed:
        return {}
    name = tensors["file"]
    info = manifest["files"][name]
    source: KeyedSource = medium.source(data_prefix(checkpoint, manifest, where) + name)
    try:
        if source.size != info["size"]:
            raise corrupt(where, f"{name} has {source.size} bytes, expected {info['size']}")
        buffer: Any = None
        if info.get("codec") == "zstd":
            buffer = decompress(where, _fetch(source), name, info, verify)
        elif full:
            buffer = _fetch(source)

        def pread(offset: int, out: bytearray) -> bool:
            if offset + len(out) > source.size:
                return False
            out[:] = source.read(offset, len(out))
            return True

        return collect_entries(where, name, tensors, needed, buffer, pread, verify)
    finally:
        source.close()


def _fetch(source: KeyedSource) -> Any:
    """The whole object, fetched in ranged reads running in parallel."""
    buffer = anonymous_buffer(source.size)
    view = memoryview(buffer)

    def fill(start: int) -> None:
        end = min(start + RANGE_BYTES, source.size)
        view[start:end] = source.read(start, end - start)

    starts = range(0, source.size, RANGE_BYTES)
    if len(starts) <= 1:
        for start in starts:
            fill(start)
    else:
        with ThreadPoolExecutor(min(_READERS, len(starts)), "killsafe-fetch") as pool:
            list(pool.map(fill, starts))
    view.release()
    return buffer
