"""What an object store holds: checkpoints listed from their manifests, read by ranges.

A checkpoint exists exactly when ``step-…/manifest.json`` exists and checks
out; listing reads those manifests only (a few at a time) and checks the
recorded file sizes against the same listing, so no data is read. A
checkpoint's ``path`` is its key (``step-000500``), its ``url`` the full URL.
Ranking, references and skipping corrupt checkpoints are ``Catalog``'s.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from killsafe import format as fmt
from killsafe.errors import (
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    UnsupportedFormat,
)
from killsafe.format import CheckpointInfo
from killsafe.format.io import corrupt
from killsafe.format.keyed import (
    PIECES_PREFIX,
    data_prefix,
    read_manifest_at,
    read_tree_at,
    verify_at,
)
from killsafe.storage import Backend
from killsafe.store import transfer
from killsafe.store.catalog import Catalog
from killsafe.store.manifest_commit import manifest_key

__all__ = ["KeyedCatalog"]

_MANIFEST_KEY = re.compile(r"^(step-[^/]+)/manifest\.json$")
_READERS = 8


class KeyedCatalog(Catalog):
    """The checkpoints under an object-store (or memory) backend's root."""

    def __init__(self, backend: Backend, best: tuple[str, str] | None) -> None:
        super().__init__(Path(), best)
        self.backend = backend
        self.where = backend.url

    def url_of(self, path: Path | str) -> str:
        return f"{self.backend.url}{path}"

    def manifest_of(self, path: Path) -> dict[str, Any]:
        return self._manifest(path)

    def file_chunks(self, path: Path, manifest: dict[str, Any], name: str) -> Iterator[memoryview]:
        prefix = data_prefix(str(path), manifest, self.url_of(path))
        return transfer.object_chunks(self.backend, prefix + name)

    def piece_chunks(self, digest: str) -> Iterator[memoryview]:
        return transfer.object_chunks(self.backend, fmt.piece_key(digest))

    def place(self, name: str) -> Path:
        return Path(name)

    def info_of(self, manifest: dict[str, Any], path: Path) -> CheckpointInfo:
        return CheckpointInfo.from_manifest(manifest, path, url=self.url_of(path))

    def location_of(self, path: Path) -> str:
        return self.url_of(path)

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, by step then time."""
        sizes = {info.key: info.size for info in self.backend.list("")}
        names = [m.group(1) for key in sizes if (m := _MANIFEST_KEY.match(key))]
        with ThreadPoolExecutor(_READERS, "killsafe-list") as pool:
            found = list(pool.map(lambda name: self._listed_or_none(name, sizes), names))
        infos = [info for info in found if info is not None]
        infos.sort(key=lambda info: (info.step, info.created))
        return infos

    def _listed_or_none(self, name: str, sizes: dict[str, int]) -> CheckpointInfo | None:
        try:
            return self._listed(name, sizes)
        except CheckpointNotFound:
            self._vanished += 1  # deleted since the listing
        except (CorruptCheckpoint, UnsupportedFormat) as exc:
            self.warn_once(self.url_of(name), f"skipping {self.url_of(name)}: {exc}")
        return None

    def _listed(self, name: str, sizes: dict[str, int], *, fresh: bool = False) -> CheckpointInfo:
        """``sizes``: a listing of the store; ``fresh`` when it was taken for this checkpoint."""
        where = self.url_of(name)
        manifest = read_manifest_at(self.backend, manifest_key(name), where)
        try:
            self._check_sizes(name, manifest, sizes, where)
        except CorruptCheckpoint:
            if fresh:
                raise
            # A listing comes in pages, not as one snapshot: a checkpoint committed
            # while it ran names objects its earlier pages had passed. Look again.
            self._check_sizes(name, manifest, self._sizes_of(name), where)
        return CheckpointInfo.from_manifest(
            manifest, Path(name), url=where, manifest_size=sizes.get(manifest_key(name))
        )

    def _sizes_of(self, name: str) -> dict[str, int]:
        """The sizes of a checkpoint's objects and of the store's pieces, listed now."""
        listing = [*self.backend.list(f"{name}/"), *self.backend.list(PIECES_PREFIX)]
        return {info.key: info.size for info in listing}

    def _check_sizes(
        self, name: str, manifest: dict[str, Any], sizes: dict[str, int], where: str
    ) -> None:
        """Raise ``CorruptCheckpoint`` unless every file and piece is listed at its size."""
        for file_name, info in manifest["files"].items():
            key = data_prefix(name, manifest, where) + file_name
            size = sizes.get(key)
            if size is None:
                raise corrupt(where, f"{file_name} is missing")
            if size != info["size"]:
                raise corrupt(where, f"{file_name} has {size} bytes, expected {info['size']}")
        for digest, length in manifest.get("pieces", {}).items():
            key = fmt.piece_key(digest)
            if sizes.get(key) != fmt.piece_nbytes(length):
                found = "missing" if key not in sizes else f"of {sizes[key]} bytes, not its size"
                raise corrupt(where, f"piece {key} is {found}")

    def listed(self, path: Path) -> CheckpointInfo:
        """What ``list()`` sees of one checkpoint, or the typed error that skips it."""
        return self._listed(str(path), self._sizes_of(str(path)), fresh=True)

    def from_ref(self, ref: str | os.PathLike[str]) -> CheckpointInfo:
        """A checkpoint given by its URL in this store, or its key (``step-000500``)."""
        text = os.fspath(ref).rstrip("/")
        if "://" in text:
            if not text.startswith(self.backend.url):
                raise ConfigError(f"{text} is not in the store {self.backend.url}")
            text = text[len(self.backend.url) :]
        return self.from_path(Path(text))

    def from_path(self, path: Path) -> CheckpointInfo:
        return CheckpointInfo.from_manifest(self._manifest(path), path, url=self.url_of(path))

    def _manifest(self, path: Path) -> dict[str, Any]:
        return read_manifest_at(self.backend, manifest_key(path), self.url_of(path))

    def exists(self, path: Path) -> bool:
        """Whether the checkpoint's manifest is (still) there."""
        try:
            self.backend.source(manifest_key(path)).close()
        except CheckpointNotFound:
            return False
        return True

    def verifies(self, path: Path) -> bool:
        try:
            self.verify_at(path)
        except (CorruptCheckpoint, CheckpointNotFound, UnsupportedFormat):
            return False
        return True

    def verify_at(self, path: Path) -> None:
        verify_at(self.backend, str(path), self._manifest(path), self.url_of(path))

    def read(self, path: Path, *, subtree: str | None, mmap: bool, verify: bool) -> Any:
        """The tree of a checkpoint; ``mmap`` does not apply (objects are fetched)."""
        return read_tree_at(
            self.backend,
            str(path),
            self._manifest(path),
            self.url_of(path),
            subtree=subtree,
            verify=verify,
        )
