"""The local commit: write into a temporary directory, fsync, rename into place.

Order matters: the files were fsynced by their writer; fsyncing the
temporary directory makes their names durable; the rename is the atomic
commit point; fsyncing the parent makes the rename durable. A crash at any
moment leaves either no checkpoint or a whole one, and a temporary
directory that the next writer sweeps.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from killsafe import directio
from killsafe import format as fmt
from killsafe.errors import CheckpointExists, KillsafeError, SaveFailed
from killsafe.host import fsync_directory
from killsafe.store import transfer
from killsafe.store.failures import free_space, io_error
from killsafe.store.naming import TMP_PREFIX
from killsafe.store.pieces import ManifestPieces, Reaper, sweep_piece_leftovers, sweep_pieces

__all__ = ["RenameCommit", "Staging"]

log = logging.getLogger("killsafe.store")


@dataclass
class Staging:
    """A checkpoint being written: its temporary and final directories."""

    step: int
    name: str | None
    tmp_path: Path
    final_path: Path
    manifest: dict[str, Any] | None = None


class RenameCommit:
    """Commits checkpoints into ``directory`` by renaming their temporary directory.

    The caller holds the store's write lock around ``begin``, ``commit``,
    ``remove`` and ``sweep``. ``ManifestLastCommit`` (``store.manifest_commit``)
    is the same seam for object stores.
    """

    def __init__(self, directory: Path, *, incremental: bool = False, grace: float = 0.0) -> None:
        self.directory = directory
        self.incremental = incremental
        self.grace = grace
        self.reaper = Reaper()
        self.manifest_pieces: ManifestPieces = {}

    def begin(self, step: int, name: str | None, final: Path) -> Staging:
        """Create the temporary directory the checkpoint of ``final`` is written into."""
        tmp = self.directory / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
        except OSError as exc:
            raise io_error("creating", tmp, exc) from exc
        return Staging(step=step, name=name, tmp_path=tmp, final_path=final)

    def write(
        self,
        staging: Staging,
        encoded: fmt.Encoded,
        fields: fmt.ManifestFields,
        *,
        compression: str | None,
    ) -> dict[str, Any]:
        """Write the checkpoint's files into the staging directory (direct I/O when it can).

        Incremental: the pieces the store lacks, durably, then the manifest.
        """
        try:
            if self.incremental:
                return fmt.write_incremental(
                    staging.tmp_path, encoded, fields, fast_write=directio.write_direct
                )
            return fmt.write_encoded(
                staging.tmp_path,
                encoded,
                fields,
                compression=compression,
                fast_write=directio.write_direct,
            )
        except OSError as exc:
            raise SaveFailed(
                f"writing checkpoint of step {staging.step} to {self.directory} failed: "
                f"{exc.strerror or exc} ({free_space(self.directory)}); free disk space or "
                "check the device (earlier checkpoints are intact)"
            ) from exc

    def adopt(
        self, staging: Staging, manifest: dict[str, Any], files: dict[str, Iterator[memoryview]]
    ) -> dict[str, Any]:
        """Write a copied checkpoint's files and manifest into the staging directory."""
        copy = transfer.restamp(manifest, None)
        try:
            transfer.write_local(staging.tmp_path, files)
            transfer.write_manifest_file(staging.tmp_path, copy)
        except OSError as exc:
            raise io_error("copying a checkpoint into", staging.tmp_path, exc) from exc
        return copy

    def adopt_pieces(
        self, staging: Staging, manifest: dict[str, Any], pieces: dict[str, Iterator[memoryview]]
    ) -> dict[str, Any]:
        """Copy the pieces of a copied incremental checkpoint that the store lacks, then its
        manifest (``added``: the bytes copied here) into the staging directory."""
        pieces_dir = self.directory / fmt.PIECES_DIR
        written = 0
        touched: set[Path] = set()
        try:
            for digest, chunks in pieces.items():
                if not fmt.piece_present(pieces_dir, digest, manifest["pieces"][digest]):
                    written += transfer.write_piece_file(pieces_dir, digest, chunks)
                    touched.add(fmt.piece_path(pieces_dir, digest).parent)
            if touched:  # the new pieces are durable before a manifest names them
                for directory in [*sorted(touched), pieces_dir, self.directory]:
                    fsync_directory(directory)
            copy = transfer.restamp({**manifest, "added": written}, None)
            transfer.write_manifest_file(staging.tmp_path, copy)
        except OSError as exc:
            raise io_error("copying a checkpoint into", staging.tmp_path, exc) from exc
        return copy

    def commit(self, staging: Staging) -> None:
        """Rename a written staging directory into place, durably; abort it on failure."""
        try:
            fsync_directory(staging.tmp_path)
            if staging.final_path.exists():
                raise CheckpointExists(f"{staging.final_path} appeared while saving; not replaced")
            os.rename(staging.tmp_path, staging.final_path)
            fsync_directory(self.directory)
        except OSError as exc:
            self.abort(staging)
            raise SaveFailed(
                f"committing {staging.final_path} failed: {exc.strerror} "
                f"({free_space(self.directory)})"
            ) from exc
        except KillsafeError:
            self.abort(staging)
            raise

    @staticmethod
    def abort(staging: Staging) -> None:
        """Remove a staging directory that will not be committed."""
        shutil.rmtree(staging.tmp_path, ignore_errors=True)

    def remove(self, path: Path) -> None:
        """Delete a committed checkpoint; renamed away first, so no reader sees half of it."""
        doomed = self.directory / f"{TMP_PREFIX}delete-{path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        fsync_directory(self.directory)
        shutil.rmtree(doomed, ignore_errors=True)

    def sweep(self) -> None:
        """Remove what dead writers left: temporary directories and pieces never committed."""
        for entry in os.scandir(self.directory):
            if entry.name.startswith(TMP_PREFIX):
                log.info("removing leftover %s", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
        sweep_piece_leftovers(self.directory)
        self.drop_unreferenced()

    def drop_unreferenced(self) -> None:
        """Remove the pieces no checkpoint refers to (see ``store.pieces``), unlinked in the
        background; ``settle`` waits for that."""
        try:
            self.reaper.reap(sweep_pieces(self.directory, self.grace, self.manifest_pieces))
        except OSError as exc:
            log.warning("unreferenced pieces in %s were not all removed: %s", self.directory, exc)

    def settle(self) -> None:
        """Wait until the pieces dropped are unlinked."""
        self.reaper.wait()
