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

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import xxhash

from killsafe.errors import CheckpointNotFound, UnsupportedFormat
from killsafe.format.checkpoint import (
    ManifestFields,
    build_manifest,
    check_compression,
    decode_tree,
    tensor_table,
)
from killsafe.format.codec import Encoded, TensorEntry, needed_entries, select_subtree
from killsafe.format.io import Where, anonymous_buffer, chunked, corrupt
from killsafe.format.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    PIECES_LAYOUT,
    TENSOR_FILE,
    TENSOR_FILE_ZSTD,
    is_sharded,
    parse_manifest,
    shares_pieces,
)
from killsafe.format.pieces import (
    PIECE_SUFFIX,
    PIECES_DIR,
    Piece,
    check_piece_headers,
    is_pieces,
    load_piece_buffers,
    piece_header,
    piece_key,
    piece_nbytes,
    verify_pieces,
    write_pieces,
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
    "PIECES_PREFIX",
    "KeyedMedium",
    "KeyedPieceSource",
    "held_pieces",
    "read_manifest_at",
    "read_tree_at",
    "upload_tensor_file",
    "verify_at",
    "write_files",
    "write_pieces_at",
]

RANGE_BYTES = 16 << 20  # one ranged read of a whole-file fetch
_READERS = 8
PIECES_PREFIX = f"{PIECES_DIR}/"


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
    fields: ManifestFields,
    *,
    attempt: str,
    compression: str | None = None,
) -> dict[str, Any]:
    """Write the tensor file under ``prefix`` and return the manifest naming ``attempt``.

    ``prefix`` is the attempt's own (``.../<attempt>/``); the manifest goes
    one level up, written by the caller. Lets the medium's errors through.
    """
    check_compression(compression)
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {"entries": {}}
    if encoded.entries:
        header, table = safetensors_header(encoded.entries)
        file_name = TENSOR_FILE_ZSTD if compression else TENSOR_FILE
        info, digests = upload_tensor_file(
            medium, prefix + file_name, header, encoded.entries, compression
        )
        files[file_name] = info
        tensors = tensor_table(file_name, header, table, digests)
    return build_manifest(encoded, files, tensors, fields, attempt=attempt)


def upload_tensor_file(
    medium: KeyedMedium,
    key: str,
    header: bytes,
    entries: Sequence[TensorEntry],
    compression: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stream a tensor file into one object while another thread hashes the entries.

    Returns the file's ``size`` (and ``xxh3`` uncompressed) and the digests
    (``file``, ``header``, ``entries``); a failed write leaves no object.
    """
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
    if is_sharded(manifest):
        raise UnsupportedFormat(
            f"checkpoint {where} is sharded (saved by {manifest['world_size']} processes); "
            "load it with killsafe.distributed.load_sharded in the job"
        )
    node = select_subtree(where, manifest["tree"], subtree)
    needed: set[str] = set()
    needed_entries(node, needed)
    if is_pieces(manifest):
        source = KeyedPieceSource(medium, where)
        buffers = load_piece_buffers(where, manifest, needed, verify, source)
    else:
        buffers = _load_buffers(medium, checkpoint, manifest, where, needed, not subtree, verify)
    return decode_tree(where, node, buffers)


def verify_at(medium: KeyedMedium, checkpoint: str, manifest: dict[str, Any], where: Where) -> None:
    """Check every checksum and the tree of the checkpoint under key ``checkpoint``."""
    if is_sharded(manifest) and shares_pieces(manifest):  # no tree: every piece whole
        verify_pieces(where, manifest["pieces"], KeyedPieceSource(medium, where))
        return
    if is_sharded(manifest):
        _verify_rank_files_at(medium, checkpoint, manifest, where)
        return
    tensors = manifest["tensors"]
    used: set[str] = set()
    needed_entries(manifest["tree"], used)
    if used - set(tensors["entries"]):
        raise corrupt(where, "the tree names tensor entries that are not in the table")
    if is_pieces(manifest):  # every piece read is checked against its name
        check_piece_headers(where, manifest, KeyedPieceSource(medium, where))
    read_tree_at(medium, checkpoint, manifest, where, verify=True)


def _verify_rank_files_at(
    medium: KeyedMedium, checkpoint: str, manifest: dict[str, Any], where: Where
) -> None:
    """A sharded checkpoint: every rank file whole against its xxh3, in ranged reads."""
    prefix = data_prefix(checkpoint, manifest, where)
    for name, info in sorted(manifest["files"].items()):
        source: KeyedSource = medium.source(prefix + name)
        try:
            if source.size != info["size"]:
                raise corrupt(where, f"{name} has {source.size} bytes, expected {info['size']}")
            digest = xxhash.xxh3_64()
            for start in range(0, source.size, RANGE_BYTES):
                digest.update(source.read(start, min(RANGE_BYTES, source.size - start)))
        finally:
            source.close()
        if digest.hexdigest() != info["xxh3"]:
            raise corrupt(where, f"{name} (rank {info['rank']}) fails its checksum")


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


# ---------------------------------------------------------------- incremental (pieces)


class KeyedPieces:
    """The ``PieceSink`` of a keyed medium: each new piece one object at ``pieces/…``.

    ``held`` maps the digests of the pieces the medium holds (listed once
    by the caller) to their objects' sizes. A piece's object is put whole,
    on a few threads; since its key is the hash of its bytes, putting it
    again (two writers, a retry) stores the same bytes.
    """

    def __init__(self, medium: KeyedMedium, held: dict[str, int]) -> None:
        self.medium = medium
        self.held = held
        self.written = 0
        self.pool = ThreadPoolExecutor(_READERS, thread_name_prefix="killsafe-pieces")
        self.pending: list[Future[None]] = []

    def has(self, digest: str, length: int) -> bool:
        return self.held.get(digest) == piece_nbytes(length)

    def write(self, piece: Piece) -> None:
        self.pending.append(self.pool.submit(self._put, piece))
        self.written += piece_nbytes(piece.size)

    def _put(self, piece: Piece) -> None:
        sink: KeyedSink = self.medium.open_write(piece_key(piece.digest))
        try:
            for view in chunked([memoryview(piece_header(piece.size)), *piece.parts]):
                sink.write(view)
            sink.commit()
        except BaseException:
            sink.abort()
            raise

    def finish(self) -> None:
        """Wait for every put; the first failure is raised."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def discard(self) -> None:
        """Stop; pieces already put stay, unreferenced, for the store's sweep."""
        self.pool.shutdown(wait=True, cancel_futures=True)


class KeyedPieceSource:
    """The ``PieceSource`` of a keyed medium: ranged reads of the pieces' objects."""

    def __init__(self, medium: KeyedMedium, where: Where) -> None:
        self.medium = medium
        self.where = where
        self.opened: dict[str, KeyedSource] = {}
        self.lock = threading.Lock()

    def read_into(self, digest: str, length: int, offset: int, out: memoryview) -> None:
        source = self._open(digest, length)
        out[:] = source.read(len(piece_header(length)) + offset, out.nbytes)

    def read_header(self, digest: str, length: int) -> bytes:
        return bytes(self._open(digest, length).read(0, len(piece_header(length))))

    def _open(self, digest: str, length: int) -> KeyedSource:
        with self.lock:
            if digest in self.opened:
                return self.opened[digest]
        key = piece_key(digest)
        try:
            source: KeyedSource = self.medium.source(key)
        except CheckpointNotFound:
            raise corrupt(self.where, f"piece {key} is missing") from None
        if source.size != piece_nbytes(length):
            source.close()
            raise corrupt(self.where, f"piece {key} has {source.size} bytes, not its size")
        with self.lock:
            self.opened[digest] = source
        return source

    def close(self) -> None:
        with self.lock:
            for source in self.opened.values():
                source.close()
            self.opened.clear()


def write_pieces_at(
    medium: KeyedMedium,
    encoded: Encoded,
    held: dict[str, int],
    fields: ManifestFields,
    *,
    attempt: str,
) -> dict[str, Any]:
    """Put the pieces of ``encoded`` the medium lacks; return the incremental manifest.

    ``held``: digest -> object size of the pieces already there (see
    ``KeyedPieces``). Every piece is put before this returns, so the
    manifest the caller writes next names only stored pieces.
    """
    tensors, lengths, written = write_pieces(KeyedPieces(medium, held), encoded.entries)
    extra = {"layout": PIECES_LAYOUT, "pieces": lengths, "added": written}
    return build_manifest(encoded, {}, tensors, fields, attempt=attempt, extra=extra)


def held_pieces(keys: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Digest -> size of the piece objects among ``(key, size)`` pairs of a listing."""
    held: dict[str, int] = {}
    for key, size in keys:
        if key.startswith(PIECES_PREFIX) and key.endswith(PIECE_SUFFIX):
            held[key.rsplit("/", 1)[-1].removesuffix(PIECE_SUFFIX)] = size
    return held
