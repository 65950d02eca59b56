"""Removing the pieces no committed checkpoint refers to (incremental stores).

The sweep runs after a checkpoint was deleted (by ``delete`` or retention),
and when the write lock is first taken. Order makes it crash-safe: a
checkpoint's manifest is removed first (``RenameCommit.remove``), then the
referenced set is read from every manifest that remains, then the pieces
outside it are renamed away (``.tmp-gone-…``: a save no longer finds
them, so it writes them again if it needs them) and unlinked on a
background thread (``Reaper``: freeing a big file's blocks takes
milliseconds that a save need not wait for). A crash at any moment leaves
at worst pieces that nothing refers to, or renamed ones, which the next
sweep removes; it never removes a piece a committed manifest names, because:

- no manifest can be committed while the sweep runs: the store's write lock
  keeps other processes out, and in this process the facade runs the sweep
  under its mutex and only when no save is in flight (a save begun and not
  yet committed or aborted may have referenced, or be writing, any piece;
  a forked writer included);
- a checkpoint whose manifest cannot be read might refer to any piece, so
  then nothing is removed (a warning says which);
- pieces younger than ``grace`` seconds are kept (``sweep_after``; 0 by
  default locally, where the two rules above already exclude a writer).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path

from killsafe import format as fmt
from killsafe.errors import CheckpointNotFound, CorruptCheckpoint, UnsupportedFormat

__all__ = ["Reaper", "referenced_pieces", "sweep_piece_leftovers", "sweep_pieces"]

log = logging.getLogger("killsafe.store")


ManifestPieces = dict[str, tuple[tuple[int, int, int], frozenset[str]]]
"""Pieces read from manifests before: path -> ((inode, size, mtime), pieces). A committed
manifest never changes in place, so an unchanged file need not be parsed again."""


def referenced_pieces(directory: Path, known: ManifestPieces | None = None) -> set[str] | None:
    """The pieces every checkpoint of ``directory`` names (``pieces`` layouts and sharded
    checkpoints of an incremental store alike: both list them under ``pieces``); None if
    one cannot be read."""
    referenced: set[str] = set()
    seen: ManifestPieces = {}
    for entry in os.scandir(directory):
        if not entry.name.startswith("step-"):
            continue
        try:
            found = os.stat(os.path.join(entry.path, fmt.MANIFEST_NAME), follow_symlinks=False)
            stamp = (found.st_ino, found.st_size, found.st_mtime_ns)
            if known is not None and known.get(entry.path, (None,))[0] == stamp:
                pieces = known[entry.path][1]
            else:
                pieces = frozenset(fmt.read_manifest(entry.path).get("pieces", ()))
        except (CheckpointNotFound, FileNotFoundError):
            if os.path.lexists(entry.path):
                log.warning("pieces kept: %s has no readable manifest", entry.path)
                return None
            continue
        except (CorruptCheckpoint, UnsupportedFormat) as exc:
            log.warning("pieces kept: %s cannot be read (%s)", entry.path, exc)
            return None
        seen[entry.path] = (stamp, pieces)
        referenced |= pieces
    if known is not None:
        known.clear()
        known.update(seen)
    return referenced


def sweep_pieces(directory: Path, grace: float, known: ManifestPieces | None = None) -> list[Path]:
    """Rename away the pieces no checkpoint names (older than ``grace`` s); return them.

    The caller holds the write lock and has no save in flight; it unlinks
    the returned paths when it likes (``Reaper``), since no save finds them.
    """
    pieces_dir = directory / fmt.PIECES_DIR
    if not pieces_dir.is_dir():
        return []
    referenced = referenced_pieces(directory, known)
    if referenced is None:
        return []
    gone: list[Path] = []
    oldest = time.time() - grace
    for sub in sorted(os.scandir(pieces_dir), key=lambda e: e.name):
        if not sub.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(sub.path):
            digest = entry.name.removesuffix(fmt.PIECE_SUFFIX)
            if entry.name.startswith(fmt.PIECE_TMP_PREFIX) or digest in referenced:
                continue
            if entry.stat(follow_symlinks=False).st_mtime > oldest:
                continue
            target = Path(sub.path) / f"{fmt.PIECE_TMP_PREFIX}gone-{digest}-{uuid.uuid4().hex[:8]}"
            os.rename(entry.path, target)  # not fsynced: a piece back after a crash is swept again
            gone.append(target)
    if gone:
        log.info("removing %d pieces no checkpoint refers to", len(gone))
    return gone


class Reaper:
    """Unlinks renamed-away pieces on one background thread; ``wait`` joins it."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def reap(self, paths: list[Path]) -> None:
        self.wait()
        if paths:
            self._thread = threading.Thread(
                target=_unlink_all, args=(paths,), name="killsafe-reaper", daemon=True
            )
            self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # swept again at the next start
            log.warning("could not remove %s: %s", path, exc)


def sweep_piece_leftovers(directory: Path) -> None:
    """Remove the temporary pieces dead writers left (the caller just took the lock)."""
    pieces_dir = directory / fmt.PIECES_DIR
    if not pieces_dir.is_dir():
        return
    for sub in os.scandir(pieces_dir):
        if not sub.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(sub.path):
            if entry.name.startswith(fmt.PIECE_TMP_PREFIX):
                log.info("removing leftover %s", entry.path)
                os.unlink(entry.path)
