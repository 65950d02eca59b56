"""Sharded checkpoints of an incremental store: each rank's bytes as shared pieces.

When the store is incremental (``CheckpointStore(incremental=True)``), a
rank does not write ``rank-NNNNN.safetensors``: it cuts the entries it
would have written into the store's content-addressed pieces
(``format.pieces``: the same cutting, names and files as a one-process
save), writes only the pieces the store lacks, fsyncs and renames them into
place, and reports each entry's spans. Rank 0's manifest then records, for
each rank, a ``shard`` (named like the rank file it replaces) with its
entries' spans and the bytes it added, and at the top the ``pieces`` every
shard spans and the ``added`` bytes of the whole save. DCP's storage rows
keep naming the shard and the entry key, so planning and resharding are
unchanged; only where the bytes come from differs.

A rank's pieces are durable before it reports them, so a committed manifest
never names a piece that is not; a save that fails anywhere commits no
manifest, and the pieces it put in place are unreferenced, removed by the
store's next sweep (``store.pieces``), which counts the pieces of sharded
manifests too (the top-level ``pieces`` map).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from killsafe import directio
from killsafe.distributed.manifest import Piece, ShardRecord
from killsafe.errors import SaveFailed
from killsafe.format.codec import TensorEntry
from killsafe.format.pieces import (
    LocalPieces,
    LocalPieceSource,
    PieceSink,
    load_piece_buffers,
    pieces_dir_of,
    write_pieces,
)

__all__ = ["READ_BATCH", "read_shard_pieces", "shard_fields", "shard_results"]

READ_BATCH = 1 << 30
"""Bytes of entries a reader assembles before handing them on."""


def shard_results(
    directory: Path,
    name: str,
    rank: int,
    entries: list[TensorEntry],
    items: list[tuple[WriteItem, TensorEntry, tuple[int, int]]],
    sink: PieceSink | None = None,
) -> list[WriteResult]:
    """Write this rank's ``entries`` as shard ``name`` of checkpoint ``directory``: the
    pieces its store lacks, durably, through ``sink`` (by default the local store's
    ``pieces/`` beside ``directory``). Returns DCP's results naming the shard and each
    entry. Raises ``SaveFailed`` (temporary pieces removed) when the medium fails."""
    if sink is None:
        sink = LocalPieces(pieces_dir_of(directory), directio.write_direct)
    try:
        table, lengths, written = write_pieces(sink, entries)
    except OSError as exc:
        raise SaveFailed(
            f"rank {rank} could not write its pieces for {directory} "
            f"({exc.strerror or exc}); free disk space or check the file system"
        ) from exc
    shard = ShardRecord(name, rank, table["entries"], lengths, written)
    return [
        WriteResult(item.index, entry.nbytes, Piece(name, entry.key, 0, entry.nbytes, "", shard))
        for item, entry, _ in items
    ]


def shard_fields(records: Iterable[ShardRecord]) -> dict[str, Any]:
    """The manifest's fields for the shards the ranks reported (no rank files)."""
    ordered = sorted(records, key=lambda record: record.name)
    pieces: dict[str, int] = {}
    for record in ordered:
        pieces.update(record.pieces)
    return {
        "shards": {
            r.name: {"rank": r.rank, "added": r.added, "entries": r.entries} for r in ordered
        },
        "pieces": dict(sorted(pieces.items())),
        "added": sum(r.added for r in ordered),
    }


def read_shard_pieces(
    directory: Path | str,
    shards: Mapping[str, Any],
    lengths: Mapping[str, int],
    wanted: Iterable[Piece],
    verify: bool,
    source: Any = None,
) -> Iterator[tuple[Piece, torch.Tensor]]:
    """Each wanted storage piece with its bytes (a flat uint8 tensor), assembled from its
    spans, a batch of up to ``READ_BATCH`` bytes at a time (memory stays bounded).

    The store's pieces are read through ``source`` (a ``PieceSource``; by
    default the local store's ``pieces/`` beside ``directory``). With
    ``verify`` every piece read is checked against its name. Raises
    ``CorruptCheckpoint`` for a missing, short or damaged piece.
    """
    by_shard: dict[str, list[Piece]] = {}
    for piece in wanted:
        by_shard.setdefault(piece.file, []).append(piece)
    for name, pieces in sorted(by_shard.items()):
        table = {"tensors": {"entries": shards[name]["entries"]}, "pieces": dict(lengths)}
        for batch in _batches(sorted(pieces, key=lambda p: p.key)):
            needed = {piece.key for piece in batch}
            reader = source if source is not None else LocalPieceSource(Path(directory))
            buffers = load_piece_buffers(directory, table, needed, verify, reader)
            for piece in batch:
                buffer, _, size = buffers.pop(piece.key)
                if not size:
                    yield piece, torch.empty(0, dtype=torch.uint8)
                else:
                    yield piece, torch.frombuffer(buffer, dtype=torch.uint8)


def _batches(pieces: list[Piece]) -> Iterator[list[Piece]]:
    """``pieces`` in consecutive runs of at most ``READ_BATCH`` bytes (or one piece)."""
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        if batch and size + piece.end - piece.start > READ_BATCH:
            yield batch
            batch, size = [], 0
        batch.append(piece)
        size += piece.end - piece.start
    if batch:
        yield batch
