"""One checkpoint directory: write it, read it back, verify it.

Writing is split in two so a background saver can use it:
``encode(tree) -> Encoded`` (``codec``) and ``write_encoded(directory,
encoded, ...)``, which writes the tensor file and then the manifest and
leaves committing (fsync of the directory, rename) to the store.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from killsafe.errors import (
    ConfigError,
    UnsupportedFormat,
)
from killsafe.format.codec import (
    Decoder,
    Encoded,
    TensorEntry,
    clean_json,
    encode,
    needed_entries,
    select_subtree,
)
from killsafe.format.io import (
    BackgroundFsync,
    FastWrite,
    Where,
    corrupt,
    missing_file,
    open_regular,
    write_file_atomically,
    write_json_file,
)
from killsafe.format.manifest import (
    CHECKSUM_FIELD,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PIECES_LAYOUT,
    is_sharded,
    manifest_digest,
    read_manifest,
    shares_pieces,
)
from killsafe.format.pieces import (
    LocalPieces,
    LocalPieceSource,
    check_piece_headers,
    check_pieces,
    is_pieces,
    load_piece_buffers,
    pieces_dir_of,
    verify_pieces,
    write_pieces,
)
from killsafe.format.tensorfile import (
    check_frame_size,
    file_digest,
    load_buffers,
    open_data,
    safetensors_header,
    write_tensor_file,
)


@dataclass(frozen=True)
class ManifestFields:
    """What a manifest says of its checkpoint besides its files.

    Build it with ``ManifestFields.of``, which checks the metrics and the
    metadata (plain JSON) before anything is written.
    """

    step: int
    name: str | None = None
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float | None = None  # seconds since the epoch; None: when written

    @classmethod
    def of(
        cls,
        *,
        step: int,
        name: str | None = None,
        reason: str | None = None,
        metrics: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        created: float | None = None,
    ) -> ManifestFields:
        """The fields, with ``metrics`` and ``metadata`` cleaned to plain JSON."""
        metrics, metadata = clean_fields(metrics, metadata)
        return cls(step, name, reason, metrics, metadata, created)


def write_encoded(
    directory: str | os.PathLike[str],
    encoded: Encoded,
    fields: ManifestFields,
    *,
    compression: str | None = None,
    fast_write: FastWrite | None = None,
) -> dict[str, Any]:
    """Write an encoded tree into an existing (temporary) directory.

    Writes the tensor file (when there are entries; an uncompressed one is
    offered to the medium's ``fast_write`` first) and then
    ``manifest.json``, fsyncing each. The directory itself is neither
    fsynced nor renamed: committing is the store's job. Returns the
    manifest. Raises ``ConfigError`` for a bad compression and lets
    ``OSError`` through (the store turns it into ``SaveFailed``).
    """
    check_compression(compression)
    directory = Path(directory)
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {"entries": {}}
    syncing: BackgroundFsync | None = None
    if encoded.entries:
        header, table = safetensors_header(encoded.entries)
        file_name, file_info, digests, syncing = write_tensor_file(
            directory, header, encoded.entries, compression, fast_write
        )
        files[file_name] = file_info
        tensors = tensor_table(file_name, header, table, digests)
    manifest = build_manifest(encoded, files, tensors, fields)
    try:
        write_json_file(directory / MANIFEST_NAME, manifest)
    finally:
        if syncing is not None:
            syncing.wait()
    return manifest


def write_incremental(
    directory: str | os.PathLike[str],
    encoded: Encoded,
    fields: ManifestFields,
    *,
    fast_write: FastWrite | None = None,
) -> dict[str, Any]:
    """Write an encoded tree as an incremental checkpoint into an existing directory.

    The pieces its store (the directory's parent) lacks are written and made
    durable first (``format.pieces``), then ``manifest.json``; the pieces
    already there are only referenced. Committing is the store's job.
    Returns the manifest; raises as ``write_encoded``.
    """
    directory = Path(directory)
    sink = LocalPieces(pieces_dir_of(directory), fast_write)
    tensors, lengths, written = write_pieces(sink, encoded.entries)
    extra = {"layout": PIECES_LAYOUT, "pieces": lengths, "added": written}
    manifest = build_manifest(encoded, {}, tensors, fields, extra=extra)
    write_json_file(directory / MANIFEST_NAME, manifest)
    return manifest


def clean_fields(
    metrics: dict[str, Any] | None, metadata: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics and metadata as plain JSON, checked before anything is written."""
    return clean_json(dict(metrics or {}), "metrics"), clean_json(dict(metadata or {}), "metadata")


def check_compression(compression: str | None) -> None:
    if compression not in (None, "zstd"):
        raise ConfigError(f"compression {compression!r} is not supported; use None or 'zstd'")


def tensor_table(
    file_name: str, header: bytes, table: dict[str, Any], digests: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's ``tensors`` section: the file, its header and each entry's checksum."""
    for key, row in table.items():
        row["xxh3"] = digests["entries"][key]
    return {
        "file": file_name,
        "header_size": len(header),
        "header_xxh3": digests["header"],
        "entries": table,
    }


def build_manifest(
    encoded: Encoded,
    files: dict[str, Any],
    tensors: dict[str, Any],
    fields: ManifestFields,
    *,
    attempt: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of written files, with its own checksum (``attempt``: object stores)."""
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "step": fields.step,
        "name": fields.name,
        "reason": fields.reason,
        "created": time.time() if fields.created is None else fields.created,
        "metrics": fields.metrics,
        "metadata": fields.metadata,
        "files": files,
        "tensors": tensors,
        "tree": encoded.tree,
    }
    if attempt is not None:
        manifest["attempt"] = attempt
    manifest.update(extra or {})
    manifest[CHECKSUM_FIELD] = manifest_digest(manifest)
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
    fields = ManifestFields.of(
        step=step, name=name, reason=reason, metrics=metrics, metadata=metadata
    )
    return write_encoded(directory, encode(tree), fields, compression=compression)


# ---------------------------------------------------------------- reading


def check_files(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Check, without reading them, that the manifest's files are regular files of their size.

    One ``lstat`` each: a missing, linked, special or truncated tensor file is
    found when checkpoints are listed, not only when they are loaded.
    """
    directory = Path(directory)
    if shares_pieces(manifest):
        check_pieces(directory, manifest)
    for name, info in manifest["files"].items():
        try:
            found = os.lstat(directory / name)
        except FileNotFoundError:
            raise missing_file(directory, name) from None
        if stat.S_ISLNK(found.st_mode):
            raise corrupt(directory, f"{name} is a symbolic link, never followed")
        if not stat.S_ISREG(found.st_mode):
            raise corrupt(directory, f"{name} is not a regular file")
        if found.st_size != info["size"]:
            raise corrupt(directory, f"{name} has {found.st_size} bytes, expected {info['size']}")
        if info.get("codec") == "zstd":
            check_frame_size(directory, name, info["raw_size"])


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
    if is_sharded(manifest):
        raise UnsupportedFormat(
            f"checkpoint {directory} is sharded (saved by {manifest['world_size']} processes); "
            "load it with killsafe.distributed.load_sharded in the job, or make a one-process "
            f"copy with `killsafe consolidate {directory} OUT`"
        )
    node = select_subtree(directory, manifest["tree"], subtree)
    needed: set[str] = set()
    needed_entries(node, needed)
    if is_pieces(manifest):  # assembled from pieces: never mapped
        buffers = load_piece_buffers(
            directory, manifest, needed, verify, LocalPieceSource(directory)
        )
    else:
        buffers = load_buffers(directory, manifest, needed, not subtree, mmap, verify)
    return decode_tree(directory, node, buffers)


def decode_tree(directory: Where, node: Any, buffers: dict[str, tuple[Any, int, int]]) -> Any:
    """Rebuild a checked tree node from its entries' buffers; ``CorruptCheckpoint`` if malformed."""
    try:
        return Decoder(directory, buffers).decode(node)
    except RecursionError as exc:
        raise corrupt(directory, "the state tree is nested too deeply") from exc
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, AttributeError) as exc:
        raise corrupt(directory, f"the tree is malformed ({_one_line(exc)})") from exc
    except (RuntimeError, MemoryError) as exc:  # torch refusing a view it cannot build
        raise corrupt(directory, f"a value cannot be rebuilt ({_one_line(exc)})") from exc


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, short: torch appends C++ backtraces."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _verify_rank_files(directory: Path, manifest: Mapping[str, Any]) -> None:
    """A sharded checkpoint: every rank file whole against its xxh3, or every piece its
    shards span against its name (the DCP plan is checked on load)."""
    check_files(directory, manifest)
    for name, info in sorted(manifest["files"].items()):
        with open(open_regular(directory, name), "rb", buffering=0) as f:
            if file_digest(f) != info["xxh3"]:
                raise corrupt(directory, f"{name} (rank {info['rank']}) fails its checksum")
    if shares_pieces(manifest):
        verify_pieces(directory, manifest["pieces"], LocalPieceSource(directory))


def verify_checkpoint(
    directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None
) -> None:
    """Check every checksum and the tree of a checkpoint; raise ``CorruptCheckpoint``."""
    directory = Path(directory)
    if manifest is None:
        manifest = read_manifest(directory)
    if is_sharded(manifest):
        _verify_rank_files(directory, manifest)
        return
    tensors = manifest["tensors"]
    needed = set(tensors["entries"])
    used: set[str] = set()
    needed_entries(manifest["tree"], used)
    if used - needed:
        raise corrupt(directory, "the tree names tensor entries that are not in the table")
    if is_pieces(manifest):
        # Loading checks every piece an entry spans against its name; every
        # piece holds bytes of an entry, so that covers them all.
        check_piece_headers(directory, manifest, LocalPieceSource(directory))
        read_tree(directory, manifest, verify=True)
        return
    if needed:
        fd, path, info = open_data(directory, manifest)
        with open(fd, "rb", buffering=0) as f:
            if info.get("codec") != "zstd" and file_digest(f) != info["xxh3"]:
                raise corrupt(directory, f"{path.name} fails its checksum")
    # The whole-file checksum above covers an uncompressed file; rebuilding
    # the tree then only checks its structure and bounds.
    compressed = bool(needed) and manifest["files"][tensors["file"]].get("codec") == "zstd"
    read_tree(directory, manifest, mmap=True, verify=compressed)


def export_tensors(directory: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write every tensor entry of a checkpoint into one self-contained safetensors file.

    Works for both layouts (one tensor file, or pieces shared in a store)
    and for a sharded checkpoint of an incremental store (every rank's
    entries, ``shard_entries``); the bytes are verified against their
    checksums on the way. The keys are the manifest's entry keys. Written
    to a temporary name, fsynced, then renamed to ``out``. Returns the
    file's size. Raises ``CorruptCheckpoint`` and ``UnsupportedFormat`` (a
    sharded checkpoint with rank files: consolidate it first).
    """
    directory, out = Path(directory), Path(out)
    manifest = read_manifest(directory)
    if is_sharded(manifest) and not shares_pieces(manifest):
        raise UnsupportedFormat(
            f"checkpoint {directory} is sharded; make a one-process copy with "
            f"`killsafe consolidate {directory} OUT` (it writes OUT.safetensors too)"
        )
    if is_sharded(manifest):
        manifest = {**manifest, "tensors": {"entries": shard_entries(directory, manifest)}}
    table = manifest["tensors"]["entries"]
    needed = set(table)
    if shares_pieces(manifest):
        buffers = load_piece_buffers(directory, manifest, needed, True, LocalPieceSource(directory))
    else:
        buffers = load_buffers(directory, manifest, needed, True, False, verify=True)
    entries = [
        TensorEntry(key, table[key]["dtype"], tuple(table[key]["shape"]), 1, _view(buffers[key]))
        for key in sorted(needed)
    ]
    header, _ = safetensors_header(entries)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    parts = [memoryview(header), *(entry.data for entry in entries)]
    return write_file_atomically(out, tmp, parts)


def shard_entries(where: Where, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Every rank's entries of a sharded checkpoint of an incremental store, in one table
    (keys as in rank files: a whole tensor by its name, a shard as ``name@offsets``)."""
    table: dict[str, Any] = {}
    for name, shard in sorted(manifest["shards"].items()):
        for key, row in shard["entries"].items():
            if key in table:
                raise corrupt(where, f"entry {key!r} of {name} is also another rank's")
            table[key] = row
    return table


def _view(buffer: tuple[Any, int, int]) -> memoryview:
    data, offset, size = buffer
    return memoryview(data).cast("B")[offset : offset + size]
