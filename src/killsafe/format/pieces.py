"""Incremental checkpoints: tensor bytes cut into content-addressed pieces shared by a store.

A checkpoint of the ``pieces`` layout holds only its manifest. Its tensor
bytes live beside the checkpoints, in the store's ``pieces/`` area, once
per store however many checkpoints refer to them (a directory locally, a
key prefix on an object store)::

    <store>/pieces/<first 2 hex>/<xxh3-128 of the bytes>.safetensors

Cutting: an entry of at least ``SMALL_ENTRY`` bytes is cut into pieces of
``PIECE_SIZE`` bytes (the last one shorter), so a tensor changed in one
region writes the pieces of that region again and one grown at its end
writes its last piece and the new ones. Smaller entries are packed, in
order, into shared pieces of up to ``PIECE_SIZE`` (thousands of biases
would otherwise be thousands of files). Each piece is a valid safetensors
file holding one ``U8`` tensor named ``data`` (readable without killsafe);
its name is the xxh3-128 of those bytes, so equal bytes are one file.

The manifest lists, for each entry, its dtype, shape, size and its spans
``[piece, offset in the piece, length]``; ``pieces`` maps every referenced
piece to its length, and ``added`` counts the bytes this save wrote. Each
byte is hashed once, for the piece's name: loading checks every piece it
reads against its name, so the name is the checksum (manifests written by
earlier releases also carry each entry's xxh3-64, still checked).

Writing (``write_pieces``) goes through a ``PieceSink``: the medium says
which pieces it already holds and writes the others durably before the
manifest is written, so a committed manifest never names a piece that is
not durable. ``LocalPieces`` is the sink of a local directory; removing
pieces that no manifest names is the store's job (``store.pieces``).
Sharded saves into an incremental store cut and write each rank's entries
the same way (``killsafe.distributed.incremental``).
Format knows nothing of the store: it only knows that a local ``pieces``
checkpoint's bytes are in ``<its parent>/pieces``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import struct
import threading
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

from killsafe.format.codec import TensorEntry
from killsafe.format.io import (
    FastWrite,
    Where,
    anonymous_buffer,
    corrupt,
    write_buffers,
)
from killsafe.format.manifest import FORMAT_NAME, PIECES_LAYOUT
from killsafe.format.tensorfile import first_bad_entry

PIECES_DIR = "pieces"
PIECE_SIZE = 8 << 20
"""Bytes of one piece. Measured in benchmarks/bench_incremental.py: smaller pieces
write less when a region changes, larger ones cost fewer files and fsyncs."""
SMALL_ENTRY = 1 << 20
"""Entries smaller than this are packed together into shared pieces."""
PIECE_TMP_PREFIX = ".tmp-"
PIECE_SUFFIX = ".safetensors"
_WORKERS = 8


@dataclass
class Piece:
    """The bytes of one piece (views of the entries' memory) and their digest."""

    parts: list[memoryview] = field(default_factory=list)
    size: int = 0
    digest: str = ""


Span = tuple[int, int, int]
"""(index of the piece, offset in the piece, length)."""


class PieceSink(Protocol):
    """Where a save's pieces go: what the medium holds, and the new pieces written durably."""

    written: int  # bytes written so far, headers included

    def has(self, digest: str, length: int) -> bool: ...

    def write(self, piece: Piece) -> None: ...

    def finish(self) -> None: ...

    def discard(self) -> None: ...


class PieceSource(Protocol):
    """Reads ranges of a store's pieces (local files, objects)."""

    def read_into(self, digest: str, length: int, offset: int, out: memoryview) -> None:
        """Fill ``out`` from the piece's bytes at ``offset`` (past its header)."""

    def read_header(self, digest: str, length: int) -> bytes:
        """The piece's first bytes, as many as its header should have."""

    def close(self) -> None: ...


def cut(
    entries: Sequence[TensorEntry], piece_size: int = PIECE_SIZE, small: int = SMALL_ENTRY
) -> tuple[list[Piece], dict[str, list[Span]]]:
    """Cut entries into pieces; return the pieces and each entry's spans over them."""
    pieces: list[Piece] = []
    spans: dict[str, list[Span]] = {}
    pack: int | None = None
    for entry in entries:
        data, size = entry.data, entry.nbytes
        if 0 < size < small:
            if pack is None or pieces[pack].size + size > piece_size:
                pack = len(pieces)
                pieces.append(Piece())
            spans[entry.key] = [(pack, pieces[pack].size, size)]
            pieces[pack].parts.append(data)
            pieces[pack].size += size
            continue
        spans[entry.key] = []
        for start in range(0, size, piece_size):
            length = min(piece_size, size - start)
            spans[entry.key].append((len(pieces), 0, length))
            pieces.append(Piece([data[start : start + length]], length))
    return pieces, spans


@functools.lru_cache(maxsize=256)
def piece_header(length: int) -> bytes:
    """The safetensors header of a piece of ``length`` bytes (one ``U8`` tensor ``data``)."""
    header = {
        "__metadata__": {"format": f"{FORMAT_NAME}-piece"},
        "data": {"dtype": "U8", "shape": [length], "data_offsets": [0, length]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def piece_nbytes(length: int) -> int:
    """The size of a piece's file or object: its header and its bytes."""
    return len(piece_header(length)) + length


def piece_key(digest: str) -> str:
    """A piece's name relative to the store: ``pieces/<xx>/<digest>.safetensors``."""
    return f"{PIECES_DIR}/{digest[:2]}/{digest}{PIECE_SUFFIX}"


def piece_path(pieces_dir: Path, digest: str) -> Path:
    """Where the piece named ``digest`` lives."""
    return pieces_dir / digest[:2] / f"{digest}{PIECE_SUFFIX}"


def _piece_file(pieces_dir: str, digest: str) -> str:
    """``piece_path`` as a string, built without pathlib (thousands per listing)."""
    return f"{pieces_dir}/{digest[:2]}/{digest}{PIECE_SUFFIX}"


def pieces_dir_of(checkpoint: Path) -> Path:
    """The pieces directory of a ``pieces`` checkpoint: beside it, in its store."""
    return checkpoint.parent / PIECES_DIR


def piece_digest(data: Any) -> str:
    """The name of a piece holding ``data``: its xxh3-128 in hex."""
    return str(xxhash.xxh3_128_hexdigest(data))


def _digest(piece: Piece) -> str:
    if len(piece.parts) == 1:
        return piece_digest(piece.parts[0])
    hasher = xxhash.xxh3_128()
    for part in piece.parts:
        hasher.update(part)
    return str(hasher.hexdigest())


def present(pieces_dir: Path, digest: str, length: int) -> bool:
    """Whether the piece is in place: a regular file of its full size (one ``lstat``)."""
    try:
        found = os.lstat(_piece_file(os.fspath(pieces_dir), digest))
    except FileNotFoundError:
        return False
    return stat.S_ISREG(found.st_mode) and found.st_size == piece_nbytes(length)


class LocalPieces:
    """The ``PieceSink`` of a local store: new pieces under temporary names, then renamed.

    ``finish`` fsyncs every new piece, renames it into place and fsyncs the
    directories it touched (all on a few threads: the disk coalesces them).
    """

    def __init__(self, pieces_dir: Path, fast_write: FastWrite | None) -> None:
        self.pieces_dir = pieces_dir
        self.fast_write = fast_write
        self.pending: list[tuple[int, Path, Path]] = []  # fd, temporary path, final path
        self.new_dirs: set[Path] = set()
        self.written = 0

    def has(self, digest: str, length: int) -> bool:
        return present(self.pieces_dir, digest, length)

    def write(self, piece: Piece) -> None:
        final = piece_path(self.pieces_dir, piece.digest)
        self._make_dir(final.parent)
        unique = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = final.parent / f"{PIECE_TMP_PREFIX}{piece.digest}-{unique}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.pending.append((fd, tmp, final))
        header = piece_header(piece.size)
        buffers = [memoryview(header), *piece.parts]
        if self.fast_write is None or not self.fast_write(fd, buffers):
            write_buffers(fd, buffers, kick=True)
        self.written += len(header) + piece.size

    def _make_dir(self, directory: Path) -> None:
        if directory in self.new_dirs or directory.is_dir():
            return
        if not self.pieces_dir.is_dir():
            self.pieces_dir.mkdir(exist_ok=True)
            self.new_dirs.add(self.pieces_dir)
        directory.mkdir(exist_ok=True)
        self.new_dirs.add(directory)

    def finish(self) -> None:
        """fsync every new piece, rename it into place, fsync the directories named."""
        if not self.pending:
            return
        workers = max(1, min(_WORKERS, len(self.pending)))
        with ThreadPoolExecutor(workers, thread_name_prefix="killsafe-fsync") as pool:
            list(pool.map(lambda item: os.fsync(item[0]), self.pending))
            self.close()
            touched: set[Path] = set()
            for _, tmp, final in self.pending:
                os.rename(tmp, final)  # an equal piece written meanwhile is replaced by equal bytes
                touched.add(final.parent)
            touched |= {d.parent for d in self.new_dirs}
            # Parents after children: a new directory is durable before its entry is.
            for depth in sorted({len(d.parts) for d in touched}, reverse=True):
                list(pool.map(_fsync_dir, [d for d in touched if len(d.parts) == depth]))

    def close(self) -> None:
        for fd, _, _ in self.pending:
            if fd >= 0:
                os.close(fd)
        self.pending = [(-1, tmp, final) for _, tmp, final in self.pending]

    def discard(self) -> None:
        """Remove the temporary files of a failed write."""
        self.close()
        for _, tmp, _ in self.pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pieces(
    sink: PieceSink, entries: Sequence[TensorEntry], piece_size: int = PIECE_SIZE
) -> tuple[dict[str, Any], dict[str, int], int]:
    """Write the pieces of ``entries`` that ``sink`` lacks, durably.

    Every byte is hashed once, for its piece's name, on a few threads
    (xxhash releases the GIL) while this thread writes the pieces already
    named. Returns the manifest's ``tensors`` section (``{"entries": {key:
    dtype, shape, size, spans}}``), its ``pieces`` map (digest to length)
    and the bytes written. Lets the sink's errors through.
    """
    pieces, spans = cut(entries, piece_size)
    lengths: dict[str, int] = {}
    workers = max(1, min(_WORKERS, os.cpu_count() or 1, len(pieces)))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="killsafe-hash") as pool:
            for piece, digest in zip(pieces, pool.map(_digest, pieces), strict=True):
                piece.digest = digest
                if digest not in lengths:
                    lengths[digest] = piece.size
                    if not sink.has(digest, piece.size):
                        sink.write(piece)
        sink.finish()
    except BaseException:
        sink.discard()
        raise
    table = {
        entry.key: {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "size": entry.nbytes,
            "pieces": [[pieces[i].digest, start, length] for i, start, length in spans[entry.key]],
        }
        for entry in entries
    }
    return {"entries": table}, lengths, sink.written


# ---------------------------------------------------------------- reading


def is_pieces(manifest: Mapping[str, Any]) -> bool:
    """Whether a (checked) manifest is of the ``pieces`` layout."""
    return manifest.get("layout") == PIECES_LAYOUT


def check_pieces(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Check with one ``lstat`` each that every piece is a regular file of its size."""
    pieces_dir = os.fspath(pieces_dir_of(directory))
    for digest, length in sorted(manifest["pieces"].items()):
        path = _piece_file(pieces_dir, digest)
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            raise corrupt(directory, f"piece {path} is missing") from None
        if not stat.S_ISREG(found.st_mode):
            raise corrupt(directory, f"piece {path} is not a regular file")
        if found.st_size != piece_nbytes(length):
            raise corrupt(directory, f"piece {path} has {found.st_size} bytes, not its size")


class LocalPieceSource:
    """The ``PieceSource`` of a local checkpoint: its store's piece files, opened once each."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pieces_dir = pieces_dir_of(directory)
        self.opened: dict[str, int] = {}
        self.lock = threading.Lock()  # reads run on several threads

    def read_into(self, digest: str, length: int, offset: int, out: memoryview) -> None:
        self._pread(digest, length, len(piece_header(length)) + offset, out)

    def read_header(self, digest: str, length: int) -> bytes:
        out = memoryview(bytearray(len(piece_header(length))))
        self._pread(digest, length, 0, out)
        return bytes(out)

    def _pread(self, digest: str, length: int, position: int, out: memoryview) -> None:
        with self.lock:
            fd = self.opened.get(digest)
            if fd is None:
                fd = self.opened[digest] = self._open(digest, length)
        if os.preadv(fd, [out], position) != out.nbytes:
            raise corrupt(self.directory, f"piece {digest} shrank while being read")

    def _open(self, digest: str, length: int) -> int:
        """A read descriptor of a piece that is a regular file of its size."""
        path = piece_path(self.pieces_dir, digest)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise corrupt(self.directory, f"piece {path} is missing") from None
        except OSError as exc:
            raise corrupt(self.directory, f"cannot open piece {path} ({exc.strerror})") from exc
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_size != piece_nbytes(length):
            os.close(fd)
            raise corrupt(
                self.directory,
                f"piece {path} is not a regular file of {piece_nbytes(length)} bytes",
            )
        return fd

    def close(self) -> None:
        with self.lock:
            for fd in self.opened.values():
                os.close(fd)
            self.opened.clear()


class _PieceReads:
    """Reads pieces on a few threads (xxhash and ``preadv`` release the GIL; an object
    store answers ranged reads in parallel), each checked against its name when asked."""

    def __init__(self, where: Where, source: PieceSource, verify: bool) -> None:
        self.where = where
        self.source = source
        self.verify = verify
        self.pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="killsafe-pieces")
        self.pending: list[Future[None]] = []

    def submit(self, digest: str, length: int, out: memoryview) -> None:
        self.pending.append(self.pool.submit(self._read, digest, length, out))

    def _read(self, digest: str, length: int, out: memoryview) -> None:
        self.source.read_into(digest, length, 0, out)
        if self.verify and piece_digest(out) != digest:
            raise corrupt(self.where, f"piece {digest} fails its checksum")

    def wait(self) -> None:
        """Wait for every read; raise the first failure."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def load_piece_buffers(
    where: Where,
    manifest: dict[str, Any],
    needed: set[str],
    verify: bool,
    source: PieceSource,
) -> dict[str, tuple[Any, int, int]]:
    """Map entry key -> (buffer, 0, size), each entry assembled from its pieces.

    A piece an entry spans whole is read straight into the entry's buffer;
    a shared (packed) piece is read whole once, then copied from. Reads run
    on a few threads. With ``verify`` every piece read is checked against
    its name.
    """
    table = manifest["tensors"]["entries"]
    missing = needed - set(table)
    if missing:
        raise corrupt(
            where, f"the tree names tensor entries {sorted(missing)[:3]} not in the table"
        )
    lengths = manifest["pieces"]
    shared: dict[str, memoryview] = {}
    copies: list[tuple[memoryview, str, int, int]] = []  # into, shared piece, offset, length
    reads = _PieceReads(where, source, verify)
    result: dict[str, tuple[Any, int, int]] = {}
    try:
        for key in sorted(needed):
            row = table[key]
            buffer = anonymous_buffer(row["size"])
            view = memoryview(buffer)
            done = 0
            for digest, offset, length in row["pieces"]:
                out = view[done : done + length]
                if offset == 0 and length == lengths[digest]:
                    reads.submit(digest, length, out)
                else:
                    if digest not in shared:
                        shared[digest] = memoryview(anonymous_buffer(lengths[digest]))
                        reads.submit(digest, lengths[digest], shared[digest])
                    copies.append((out, digest, offset, length))
                done += length
            result[key] = (buffer, 0, row["size"])
        reads.wait()
    finally:
        reads.pool.shutdown(wait=True, cancel_futures=True)
        source.close()
    for out, digest, offset, length in copies:
        out[:] = shared[digest][offset : offset + length]
    if verify:
        _check_entry_sums(where, result, table)
    return result


def _check_entry_sums(where: Where, buffers: dict[str, Any], table: dict[str, Any]) -> None:
    """Entries of manifests from earlier releases also carry their own xxh3-64."""
    summed = {key: buffers[key] for key in buffers if table[key].get("xxh3") is not None}
    bad = first_bad_entry(summed, table)
    if bad is not None:
        raise corrupt(where, f"tensor {bad!r} fails its checksum")


def verify_pieces(where: Where, lengths: Mapping[str, int], source: PieceSource) -> None:
    """Read every piece whole and check its header and its bytes against its name.

    A few pieces at a time, on threads: memory stays bounded by their size.
    """

    def check(item: tuple[str, int]) -> None:
        digest, length = item
        if source.read_header(digest, length) != piece_header(length):
            raise corrupt(where, f"piece {piece_key(digest)} has a bad header")
        out = memoryview(bytearray(length))
        source.read_into(digest, length, 0, out)
        if piece_digest(out) != digest:
            raise corrupt(where, f"piece {piece_key(digest)} fails its checksum")

    try:
        with ThreadPoolExecutor(_WORKERS, thread_name_prefix="killsafe-verify") as pool:
            list(pool.map(check, sorted(lengths.items())))
    finally:
        source.close()


def check_piece_headers(where: Where, manifest: dict[str, Any], source: PieceSource) -> None:
    """Every piece starts with the safetensors header of its length (readable without us)."""
    try:
        for digest, length in sorted(manifest["pieces"].items()):
            if source.read_header(digest, length) != piece_header(length):
                raise corrupt(where, f"piece {piece_key(digest)} has a bad header")
    finally:
        source.close()
