"""What a store holds: list, resolve references, load and verify checkpoints.

Reads manifests, never locks, never writes. A checkpoint that fails to
verify is skipped with a warning (logged once), never deleted; one that
vanished while being read was pruned by a writer and is looked for again.
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from killsafe import format as fmt
from killsafe.errors import CheckpointNotFound, ConfigError, CorruptCheckpoint, UnsupportedFormat
from killsafe.format import CheckpointInfo
from killsafe.retention import best_of
from killsafe.store import transfer

__all__ = ["Catalog", "verifies"]

log = logging.getLogger("killsafe.store")

_NONE_LEFT = object()  # no candidate checkpoint could be used
_MAX_RANKINGS = 1000  # a reader racing a pruner ranks again; bounded against endless churn
_UNUSABLE = (CorruptCheckpoint, CheckpointNotFound, UnsupportedFormat)


def verifies(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint that passes every check."""
    try:
        fmt.verify_checkpoint(path)
    except _UNUSABLE:
        return False
    return True


class Catalog:
    """The checkpoints of ``directory``, ranked by step (and by ``best`` when given).

    The medium's part is a handful of methods (``list``, ``listed``,
    ``from_path``, ``exists``, ``read``, ``verify_at``, ``verifies``); ranking,
    resolving references and skipping corrupt checkpoints are shared with the
    object-store catalog (``store.keyed_catalog``).
    """

    def __init__(self, directory: Path, best: tuple[str, str] | None) -> None:
        self.directory = directory
        self.where = str(directory)
        self.best_spec = best
        self._warned: set[str] = set()
        self._vanished = 0  # checkpoints seen by list() that were gone when read (pruned)

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints with a readable manifest, by step then time.

        Reads manifests only. Unreadable ones, and symbolic links (never
        followed), are skipped with a warning logged once; one that vanished
        while being listed (pruned by a writer) is skipped silently.
        """
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        except NotADirectoryError as exc:
            raise ConfigError(f"checkpoint store {self.directory} is not a directory") from exc
        infos = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.startswith("step-"):
                continue
            try:
                infos.append(self.listed(Path(entry.path)))
            except CheckpointNotFound as exc:
                if os.path.lexists(entry.path):
                    self.warn_once(entry.path, f"skipping {entry.path}: {exc}")
                else:
                    self._vanished += 1
            except (CorruptCheckpoint, UnsupportedFormat) as exc:
                self.warn_once(entry.path, f"skipping {entry.path}: {exc}")
        infos.sort(key=lambda info: (info.step, info.created))
        return infos

    def manifest_of(self, path: Path) -> dict[str, Any]:
        """The checked manifest of the checkpoint at ``path``."""
        return fmt.read_manifest(path)

    def file_chunks(self, path: Path, manifest: dict[str, Any], name: str) -> Iterator[memoryview]:
        """The bytes of one of the checkpoint's files, chunk by chunk."""
        return transfer.local_chunks(path, name)

    def piece_chunks(self, digest: str) -> Iterator[memoryview]:
        """The bytes of one of the store's pieces (incremental stores), chunk by chunk."""
        path = fmt.piece_path(self.directory / fmt.PIECES_DIR, digest)
        return transfer.local_chunks(path.parent, path.name)

    def place(self, name: str) -> Path:
        """Where the checkpoint called ``name`` (``step-000500``) lives."""
        return self.directory / name

    def info_of(self, manifest: dict[str, Any], path: Path) -> CheckpointInfo:
        """What a just-committed manifest says about the checkpoint at ``path``."""
        size = os.lstat(path / fmt.MANIFEST_NAME).st_size  # rather than encoding it again
        return CheckpointInfo.from_manifest(manifest, path, manifest_size=size)

    def location_of(self, path: Path) -> str:
        """A checkpoint's place, for messages."""
        return str(path)

    def exists(self, path: Path) -> bool:
        """Whether anything is at a checkpoint's place (a vanished one was pruned)."""
        return os.path.lexists(path)

    def verifies(self, path: Path) -> bool:
        """Whether ``path`` holds a checkpoint that passes every check."""
        return verifies(path)

    def verify_at(self, path: Path) -> None:
        """Check every checksum of the checkpoint at ``path``."""
        fmt.verify_checkpoint(path)

    def read(self, path: Path, *, subtree: str | None, mmap: bool, verify: bool) -> Any:
        """The tree of the checkpoint at ``path``."""
        return fmt.read_tree(path, subtree=subtree, mmap=mmap, verify=verify)

    def listed(self, path: Path) -> CheckpointInfo:
        """What ``list()`` sees of one checkpoint directory, or the typed error that skips it.

        Reads the manifest (checksum, schema) and checks with ``lstat`` only
        that its files are regular files of their recorded sizes.
        """
        manifest, manifest_size = fmt.read_manifest_sized(path)
        fmt.check_files(path, manifest)
        return CheckpointInfo.from_manifest(manifest, path, manifest_size=manifest_size)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def first_good(
        self,
        rank: Callable[[], Sequence[Any]],
        use: Callable[[CheckpointInfo], Any],
    ) -> Any:
        """``use(info)`` on the first candidate of ``rank()`` for which it succeeds.

        A candidate that fails as corrupt is skipped with a warning. One that
        vanished meanwhile was pruned by a writer, not damaged: the
        candidates are ranked again (newer ones may have been committed) and
        the first good one of the new ranking is used; so too when every
        candidate vanished while being listed. Returns ``None`` when none is
        left (``use`` never returns ``None``).
        """
        failed: set[Path] = set()
        for _ in range(_MAX_RANKINGS):
            vanished = self._vanished
            for info in rank():
                if info.path in failed:
                    continue
                try:
                    return use(info)
                except _UNUSABLE as exc:
                    failed.add(info.path)
                    if self.exists(info.path):
                        self.warn_once(
                            info.location, f"skipping corrupt checkpoint {info.location}: {exc}"
                        )
                        continue
                    break  # pruned while we read it: rank again
            else:
                if self._vanished == vanished:
                    return None
        return None

    def latest(self, *, verify: bool = True) -> CheckpointInfo | None:
        """The newest checkpoint that verifies (corrupt ones skipped with a warning)."""
        found: CheckpointInfo | None = self.first_good(self._newest_first, self._checked(verify))
        return found

    def best(self, *, verify: bool = True) -> CheckpointInfo | None:
        """The best checkpoint on the ``best`` metric that verifies."""
        spec = self.best_spec
        if spec is None:
            raise ConfigError("best() needs the store to be created with best=(metric, mode)")
        found: CheckpointInfo | None = self.first_good(
            lambda: best_of(self.list(), spec), self._checked(verify)
        )
        return found

    def get(self, ref: Any = "latest") -> CheckpointInfo:
        """Resolve a reference: "latest", "best", a step, a name, a CheckpointInfo or a path."""
        if isinstance(ref, CheckpointInfo):
            return self.from_path(ref.path)
        if ref == "latest" or ref == "best":
            info = self.latest() if ref == "latest" else self.best()
            if info is None:
                raise CheckpointNotFound(f"no {ref} checkpoint in {self.where}; save one first")
            return info
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)  # names are never all digits, so this is a step
        if isinstance(ref, int) and not isinstance(ref, bool):
            matches = [info for info in self.list() if info.step == ref]
            unnamed = [info for info in matches if info.name is None]
            if not matches:
                raise CheckpointNotFound(f"no checkpoint of step {ref} in {self.where}")
            return (unnamed or matches)[-1]
        if isinstance(ref, str) and "/" not in ref and ref not in (".", ".."):
            for info in self.list():
                if info.name == ref or info.path.name == ref:
                    return info
            raise CheckpointNotFound(
                f"no checkpoint named {ref!r} in {self.where}; `killsafe list` shows them"
            )
        if isinstance(ref, (str, os.PathLike)):
            return self.from_ref(ref)
        raise ConfigError(
            f"checkpoint reference {ref!r} must be a step, name, path or CheckpointInfo"
        )

    def from_ref(self, ref: str | os.PathLike[str]) -> CheckpointInfo:
        """A checkpoint given by its path (or, on an object store, its URL or key)."""
        return self.from_path(Path(ref))

    def from_path(self, path: Path) -> CheckpointInfo:
        return CheckpointInfo.from_manifest(fmt.read_manifest(path), path)

    def load(self, ref: Any = "latest", *, subtree: str | None, mmap: bool, verify: bool) -> Any:
        """Load a checkpoint's tree; with ``"latest"``, the newest one that loads."""

        def read(info: CheckpointInfo) -> Any:
            return self.read(info.path, subtree=subtree, mmap=mmap, verify=verify)

        if ref != "latest":
            return read(self.get(ref))
        found = self.first_good(self._newest_first, lambda info: (read(info),))
        if found is None:
            raise CheckpointNotFound(f"no loadable checkpoint in {self.where}; save one first")
        return found[0]  # boxed: a saved tree may be None

    def verify(self, ref: Any = "latest") -> CheckpointInfo:
        """Check every checksum of a checkpoint; raise ``CorruptCheckpoint`` if one fails."""
        info = self.get(ref) if ref != "latest" else self._newest_listed()
        self.verify_at(info.path)
        return info

    def protected(self) -> set[Path]:
        """The newest and the best checkpoint: deleting them needs ``force``."""
        infos = self.list()
        protected = {infos[-1].path} if infos else set()
        if self.best_spec is not None:
            ranked = best_of(infos, self.best_spec)
            if ranked:
                protected.add(ranked[0].path)  # type: ignore[attr-defined]
        return protected

    def _checked(self, verify: bool) -> Callable[[CheckpointInfo], CheckpointInfo]:
        def check(info: CheckpointInfo) -> CheckpointInfo:
            if verify:
                self.verify_at(info.path)
            return info

        return check

    def _newest_first(self) -> builtins.list[CheckpointInfo]:
        return self.list()[::-1]

    def _newest_listed(self) -> CheckpointInfo:
        infos = self.list()
        if not infos:
            raise CheckpointNotFound(f"no checkpoint in {self.where}")
        return infos[-1]
