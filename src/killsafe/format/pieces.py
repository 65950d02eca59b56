"""Incremental checkpoints: tensor bytes cut into content-addressed pieces shared by a store.

A checkpoint of the ``pieces`` layout holds only ``manifest.json``. Its
tensor bytes live beside the checkpoints, in the store's ``pieces/``
directory, once per store however many checkpoints refer to them::

    <store>/pieces/<first 2 hex>/<xxh3-128 of the bytes>.safetensors

Cutting: an entry of at least ``SMALL_ENTRY`` bytes is cut into pieces of
``PIECE_SIZE`` bytes (the last one shorter), so a tensor changed in one
region writes the pieces of that region again and one grown at its end
writes its last piece and the new ones. Smaller entries are packed, in
order, into shared pieces of up to ``PIECE_SIZE`` (thousands of biases
would otherwise be thousands of files). Each piece is a valid safetensors
file holding one ``U8`` tensor named ``data`` (readable without killsafe);
its name is the xxh3-128 of those bytes, so equal bytes are one file.

The manifest lists, for each entry, its dtype, shape, size, the xxh3-64
that loading verifies (as in the single-file layout) and its spans
``[piece, offset in the piece, length]``; ``pieces`` maps every referenced
piece to its length, and ``added`` counts the bytes this save wrote.

Writing (``write_pieces``): hash every piece, write those not already in
``pieces/`` (a regular file of the right size at its name: one ``lstat``)
under a temporary name, fsync them, rename them into place, fsync their
directories, and only then write the manifest: a committed manifest never
names a piece that is not durable. A piece already present is only
referenced. Removing pieces that no manifest names is the store's job
(``store.pieces``). Format knows nothing of the store: it only knows that
a ``pieces`` checkpoint's bytes are in ``<its parent>/pieces``.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from killsafe.format.codec import Encoded, TensorEntry
from killsafe.format.io import (
    FastWrite,
    anonymous_buffer,
    corrupt,
    write_buffers,
    write_json_file,
)
from killsafe.format.manifest import FORMAT_NAME, MANIFEST_NAME, PIECES_LAYOUT
from killsafe.format.tensorfile import first_bad_entry

PIECES_DIR = "pieces"
PIECE_SIZE = 8 << 20
"""Bytes of one piece. Measured in benchmarks/bench_incremental.py: smaller pieces
write less when a region changes, larger ones cost fewer files and fsyncs."""
SMALL_ENTRY = 1 << 20
"""Entries smaller than this are packed together into shared pieces."""
PIECE_TMP_PREFIX = ".tmp-"
PIECE_SUFFIX = ".safetensors"
_HASH_WORKERS = 4


@dataclass
class Piece:
    """The bytes of one piece (views of the entries' memory) and their digest."""

    parts: list[memoryview] = field(default_factory=list)
    size: int = 0
    digest: str = ""


Span = tuple[int, int, int]
"""(index of the piece, offset in the piece, length)."""


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


def piece_header(length: int) -> bytes:
    """The safetensors header of a piece of ``length`` bytes (one ``U8`` tensor ``data``)."""
    header = {
        "__metadata__": {"format": f"{FORMAT_NAME}-piece"},
        "data": {"dtype": "U8", "shape": [length], "data_offsets": [0, length]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def piece_path(pieces_dir: Path, digest: str) -> Path:
    """Where the piece named ``digest`` lives."""
    return pieces_dir / digest[:2] / f"{digest}{PIECE_SUFFIX}"


def pieces_dir_of(checkpoint: Path) -> Path:
    """The pieces directory of a ``pieces`` checkpoint: beside it, in its store."""
    return checkpoint.parent / PIECES_DIR


def _digest(piece: Piece) -> str:
    hasher = xxhash.xxh3_128()
    for part in piece.parts:
        hasher.update(part)
    return str(hasher.hexdigest())


def present(pieces_dir: Path, digest: str, length: int) -> bool:
    """Whether the piece is in place: a regular file of its full size (one ``lstat``)."""
    try:
        found = os.lstat(piece_path(pieces_dir, digest))
    except FileNotFoundError:
        return False
    return stat.S_ISREG(found.st_mode) and found.st_size == len(piece_header(length)) + length


class _PieceWriter:
    """Writes new pieces under temporary names, then makes them durable and renames them."""

    def __init__(self, pieces_dir: Path, fast_write: FastWrite | None) -> None:
        self.pieces_dir = pieces_dir
        self.fast_write = fast_write
        self.pending: list[tuple[int, Path, Path]] = []  # fd, temporary path, final path
        self.new_dirs: set[Path] = set()
        self.written = 0

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
        workers = max(1, min(_HASH_WORKERS, len(self.pending)))
        with ThreadPoolExecutor(workers, thread_name_prefix="killsafe-fsync") as pool:
            list(pool.map(lambda item: os.fsync(item[0]), self.pending))
        self.close()
        touched: set[Path] = set()
        for _, tmp, final in self.pending:
            os.rename(tmp, final)  # an equal piece written meanwhile is replaced by equal bytes
            touched.add(final.parent)
        touched |= {d.parent for d in self.new_dirs}
        for directory in sorted(touched, key=lambda d: -len(d.parts)):
            _fsync_dir(directory)

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
    pieces_dir: Path,
    encoded: Encoded,
    piece_size: int = PIECE_SIZE,
    fast_write: FastWrite | None = None,
) -> tuple[dict[str, Any], dict[str, int], int]:
    """Write the pieces of ``encoded`` that ``pieces_dir`` lacks, durably.

    Pieces are hashed on a few threads (xxhash releases the GIL) while this
    thread writes the ones already named; the entries' checksums are taken
    on the same threads. A new piece is offered to ``fast_write`` first.
    Returns the manifest's ``tensors`` section, its ``pieces`` map (digest
    to length) and the bytes written. Lets ``OSError`` through.
    """
    pieces, spans = cut(encoded.entries, piece_size)
    writer = _PieceWriter(pieces_dir, fast_write)
    lengths: dict[str, int] = {}
    workers = max(1, min(_HASH_WORKERS, os.cpu_count() or 1))
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="killsafe-hash") as pool:
            digests = pool.map(_digest, pieces)
            sums = pool.map(lambda e: (e.key, xxhash.xxh3_64_hexdigest(e.data)), encoded.entries)
            for piece, digest in zip(pieces, digests, strict=True):
                piece.digest = digest
                if digest not in lengths:
                    lengths[digest] = piece.size
                    if not present(pieces_dir, digest, piece.size):
                        writer.write(piece)
            checksums = dict(sums)
        writer.finish()
    except BaseException:
        writer.discard()
        raise
    table = {
        entry.key: {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "size": entry.nbytes,
            "xxh3": checksums[entry.key],
            "pieces": [[pieces[i].digest, start, length] for i, start, length in spans[entry.key]],
        }
        for entry in encoded.entries
    }
    return {"entries": table}, lengths, writer.written


def write_pieces_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest of a ``pieces`` checkpoint (its pieces are already durable)."""
    write_json_file(directory / MANIFEST_NAME, manifest)


# ---------------------------------------------------------------- reading


def is_pieces(manifest: Mapping[str, Any]) -> bool:
    """Whether a (checked) manifest is of the ``pieces`` layout."""
    return manifest.get("layout") == PIECES_LAYOUT


def check_pieces(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Check with one ``lstat`` each that every piece is a regular file of its size."""
    pieces_dir = pieces_dir_of(directory)
    for digest, length in sorted(manifest["pieces"].items()):
        path = piece_path(pieces_dir, digest)
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            raise corrupt(directory, f"piece {path} is missing") from None
        if not stat.S_ISREG(found.st_mode):
            raise corrupt(directory, f"piece {path} is not a regular file")
        if found.st_size != len(piece_header(length)) + length:
            raise corrupt(directory, f"piece {path} has {found.st_size} bytes, not its size")


def _open_piece(directory: Path, pieces_dir: Path, digest: str, length: int) -> tuple[int, int]:
    """A read descriptor of a piece (regular, its size) and where its bytes start."""
    path = piece_path(pieces_dir, digest)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise corrupt(directory, f"piece {path} is missing") from None
    except OSError as exc:
        raise corrupt(directory, f"cannot open piece {path} ({exc.strerror})") from exc
    found = os.fstat(fd)
    base = len(piece_header(length))
    if not stat.S_ISREG(found.st_mode) or found.st_size != base + length:
        os.close(fd)
        raise corrupt(directory, f"piece {path} is not a regular file of {base + length} bytes")
    return fd, base


def load_piece_buffers(
    directory: Path, manifest: dict[str, Any], needed: set[str], verify: bool
) -> dict[str, tuple[Any, int, int]]:
    """Map entry key -> (buffer, 0, size), each entry assembled from its pieces."""
    table = manifest["tensors"]["entries"]
    missing = needed - set(table)
    if missing:
        raise corrupt(
            directory, f"the tree names tensor entries {sorted(missing)[:3]} not in the table"
        )
    pieces_dir = pieces_dir_of(directory)
    lengths = manifest["pieces"]
    opened: dict[str, tuple[int, int]] = {}
    result: dict[str, tuple[Any, int, int]] = {}
    try:
        for key in sorted(needed):
            row = table[key]
            buffer = anonymous_buffer(row["size"])
            view = memoryview(buffer)
            done = 0
            for digest, offset, length in row["pieces"]:
                if digest not in opened:
                    opened[digest] = _open_piece(directory, pieces_dir, digest, lengths[digest])
                fd, base = opened[digest]
                if os.preadv(fd, [view[done : done + length]], base + offset) != length:
                    raise corrupt(directory, f"piece {digest} shrank while being read")
                done += length
            view.release()
            result[key] = (buffer, 0, row["size"])
    finally:
        for fd, _ in opened.values():
            os.close(fd)
    if verify:
        bad = first_bad_entry(result, table)
        if bad is not None:
            raise corrupt(directory, f"tensor {bad!r} fails its checksum")
    return result


def check_piece_headers(directory: Path, manifest: dict[str, Any]) -> None:
    """Every piece starts with the safetensors header of its length (readable without us)."""
    pieces_dir = pieces_dir_of(directory)
    for digest, length in sorted(manifest["pieces"].items()):
        fd, base = _open_piece(directory, pieces_dir, digest, length)
        try:
            head = os.pread(fd, base, 0)
        finally:
            os.close(fd)
        if head != piece_header(length):
            raise corrupt(directory, f"piece {piece_path(pieces_dir, digest)} has a bad header")
