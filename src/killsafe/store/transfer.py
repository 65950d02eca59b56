"""Copy a committed checkpoint from one store to another, on any media, without decoding it.

The files' bytes are streamed as they are (a local file read in large
chunks, an object fetched by ranged reads) and hashed on the way: a copy
whose bytes do not match the source manifest's checksums is aborted, never
committed. The target writes them through its own commit strategy, so the
copy appears whole or not at all, as a save would.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from killsafe import format as fmt
from killsafe.errors import CheckpointNotFound
from killsafe.format.io import (
    corrupt,
    open_regular,
    write_buffers,
    write_file_atomically,
    write_json_file,
)
from killsafe.storage import Backend

__all__ = [
    "CHUNK",
    "checked_piece",
    "local_chunks",
    "object_chunks",
    "restamp",
    "write_local",
    "write_objects",
    "write_piece_file",
]

CHUNK = 16 << 20


def local_chunks(directory: Path, name: str) -> Iterator[memoryview]:
    """The bytes of ``directory/name`` (a regular file, never a link), chunk by chunk."""
    fd = open_regular(directory, name)
    try:
        while chunk := os.read(fd, CHUNK):
            yield memoryview(chunk)
    finally:
        os.close(fd)


def object_chunks(backend: Backend, key: str) -> Iterator[memoryview]:
    """The bytes of the object at ``key``, by ranged reads."""
    with backend.source(key) as source:
        for start in range(0, source.size, CHUNK):
            yield source.read(start, min(CHUNK, source.size - start))


def checked(
    where: str,
    name: str,
    info: dict[str, Any],
    chunks: Iterator[memoryview],
    pace: Callable[[], None] | None = None,
) -> Any:
    """Pass ``chunks`` through, raising ``CorruptCheckpoint`` at the end unless they match.

    ``pace`` is called before each chunk (it may wait: a copy running beside
    a training loop gives way while the loop takes a snapshot).
    """
    digest = xxhash.xxh3_64()
    size = 0
    for chunk in chunks:
        if pace is not None:
            pace()
        digest.update(chunk)
        size += chunk.nbytes
        yield chunk
    if size != info["size"] or digest.hexdigest() != info["xxh3"]:
        raise corrupt(where, f"{name} does not match its checksum; not copied")


def checked_piece(
    where: str,
    digest: str,
    length: int,
    chunks: Iterator[memoryview],
    pace: Callable[[], None] | None = None,
) -> Iterator[memoryview]:
    """Pass a piece's bytes through, raising ``CorruptCheckpoint`` at the end unless its
    header, size and name (the xxh3-128 of the bytes past the header) match."""
    header = fmt.piece_header(length)
    head = bytearray()
    hasher = xxhash.xxh3_128()
    size = 0
    for chunk in _piece_or_corrupt(where, digest, chunks):
        if pace is not None:
            pace()
        if size < len(header):
            head += chunk[: len(header) - size]
        hasher.update(chunk[max(0, len(header) - size) :])
        size += chunk.nbytes
        yield chunk
    if size != len(header) + length or head != header or hasher.hexdigest() != digest:
        raise corrupt(where, f"piece {fmt.piece_key(digest)} does not match its name; not copied")


def _piece_or_corrupt(
    where: str, digest: str, chunks: Iterator[memoryview]
) -> Iterator[memoryview]:
    """A source's piece that is missing makes the source corrupt, not the copy unfound."""
    try:
        yield from chunks
    except CheckpointNotFound:
        raise corrupt(where, f"piece {fmt.piece_key(digest)} is missing; not copied") from None


def restamp(manifest: dict[str, Any], attempt: str | None) -> dict[str, Any]:
    """The manifest for the copy: the target's attempt (or none), its checksum again."""
    copy = {k: v for k, v in manifest.items() if k not in ("attempt", fmt.CHECKSUM_FIELD)}
    if attempt is not None:
        copy["attempt"] = attempt
    copy[fmt.CHECKSUM_FIELD] = fmt.manifest_digest(copy)
    return copy


def write_local(directory: Path, files: dict[str, Iterator[memoryview]]) -> None:
    """Write the copied files into a staging directory, fsynced."""
    for name, chunks in files.items():
        fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for chunk in chunks:
                write_buffers(fd, [chunk])
            os.fsync(fd)
        finally:
            os.close(fd)


def write_manifest_file(directory: Path, manifest: dict[str, Any]) -> None:
    write_json_file(directory / fmt.MANIFEST_NAME, manifest)


def write_piece_file(pieces_dir: Path, digest: str, chunks: Iterator[memoryview]) -> int:
    """Write a copied piece into place (temporary name, fsync, rename); return its size.

    The caller fsyncs the directories (``piece_path(...).parent``, ``pieces_dir`` and
    the store) before it writes a manifest naming the piece.
    """
    final = fmt.piece_path(pieces_dir, digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{fmt.PIECE_TMP_PREFIX}{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return write_file_atomically(final, tmp, chunks, exclusive=True)


def write_objects(backend: Backend, prefix: str, files: dict[str, Iterator[memoryview]]) -> None:
    """Upload the copied files under an attempt's prefix."""
    for name, chunks in files.items():
        with backend.open_write(prefix + name) as sink:
            for chunk in chunks:
                sink.write(chunk)
