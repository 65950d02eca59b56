"""A directory of checkpoints: commit, list, load, verify, delete, prune, lock.

A checkpoint exists once its directory has been renamed into place; a reader
never sees a partial one. One process writes to a store at a time (an
``flock`` on ``.lock``, taken at the first mutating call); readers never lock.

Example::

    store = CheckpointStore("runs/exp1/checkpoints", keep_last=3)
    store.save({"weights": weights, "epoch": 3}, step=300)
    state = store.load("latest")
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from killsafe import directio
from killsafe import format as fmt
from killsafe.errors import (
    CheckpointExists,
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    InvalidName,
    KillsafeError,
    SaveFailed,
    StoreLocked,
    UnsupportedFormat,
)
from killsafe.format import CheckpointInfo
from killsafe.retention import Retention, best_of
from killsafe.saver import STRATEGIES, BackgroundSaver, PendingSave
from killsafe.state import capture

__all__ = ["CheckpointStore", "Staging", "free_space", "io_error", "sanitize_name"]

log = logging.getLogger("killsafe.store")

LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"
MAX_NAME_LENGTH = 64
_RESERVED = {"latest", "best"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NONE_LEFT = object()  # no candidate checkpoint could be used
_MAX_RANKINGS = 1000  # a reader racing a pruner ranks again; bounded against endless churn
MAX_BESIDE = 100
"""At most this many directories (one valid, the rest damaged) for one step and name."""
DEAD_HOLDER_GRACE_SECONDS = 5.0
"""How long a writer waits for a lock whose recorded holder is dead (see ``_lock_or_wait``)."""
_SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def sanitize_name(name: Any) -> str:
    """Return a safe checkpoint name or raise ``InvalidName``.

    Path separators, NUL, ``.``/``..``, hidden names (leading dot), names
    made of digits only (they read as steps) and the reserved ``latest`` and
    ``best`` are refused; runs of other unsafe characters become ``-``.
    """
    if not isinstance(name, str):
        raise InvalidName(f"checkpoint name {name!r} must be a str")
    text = name.strip()
    if any(sep in text for sep in ("/", "\\", "\0")):
        raise InvalidName(
            f"checkpoint name {name!r} contains a path separator; use letters, digits, . _ -"
        )
    if text.startswith("."):
        raise InvalidName(
            f"checkpoint name {name!r} starts with a dot; hidden names are not allowed"
        )
    clean = _UNSAFE.sub("-", text).strip("-")
    if not clean or clean in (".", ".."):
        raise InvalidName(
            f"checkpoint name {name!r} is empty once sanitized; use letters or digits"
        )
    if len(clean) > MAX_NAME_LENGTH:
        raise InvalidName(f"checkpoint name {name!r} is longer than {MAX_NAME_LENGTH} characters")
    if clean.isdigit() or clean.lower() in _RESERVED:
        raise InvalidName(f"checkpoint name {name!r} reads as a step or reference; add a letter")
    return clean


@dataclass
class Staging:
    """A checkpoint being written: its temporary and final directories."""

    step: int
    name: str | None
    tmp_path: Path
    final_path: Path
    manifest: dict[str, Any] | None = None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_space(path: str | os.PathLike[str]) -> str:
    """The free space of the file system holding ``path`` (or its nearest parent), as text."""
    here = Path(path).absolute()
    for candidate in (here, *here.parents):
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        return _human_bytes(free) + " free"
    return "free space unknown"


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def io_error(what: str, path: Path, exc: OSError) -> KillsafeError:
    """A failed write as one typed line: ``SaveFailed`` when the disk is the cause, else
    ``ConfigError`` (a path that cannot hold files: a directory in the way, /proc...)."""
    reason = exc.strerror or str(exc)
    if exc.errno in _SPACE_ERRORS or exc.errno == errno.EIO:
        return SaveFailed(
            f"{what} {path} failed: {reason} ({free_space(path)}); "
            "free disk space or use another directory"
        )
    if exc.errno == errno.EISDIR:
        return ConfigError(f"{what} {path} failed: it is a directory; remove it")
    if exc.errno == errno.ELOOP:
        return ConfigError(f"{what} {path} failed: it is a symbolic link; remove it")
    return ConfigError(
        f"{what} {path} failed: {reason}; use a writable directory on a local file system"
    )


def _lock_error(path: Path, exc: OSError) -> KillsafeError:
    return io_error("locking the checkpoint store at", path, exc)


_HELD_LOCKS: weakref.WeakSet[CheckpointStore] = weakref.WeakSet()


def _close_locks_in_child() -> None:
    """In a forked child, drop the inherited lock descriptors at once.

    A flock belongs to the open file, shared by every process holding a copy
    of the descriptor: a child (the fork writer, a data loader worker) would
    otherwise keep the store locked after its parent was killed. Closing the
    copy (never ``LOCK_UN``, which would unlock the parent too) leaves the
    lock to the parent alone.
    """
    for store in list(_HELD_LOCKS):
        fd, store._lock_fd = store._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    _HELD_LOCKS.clear()


_fork_hook = threading.Lock()
_fork_hook_registered = False


def _hold_lock(store: CheckpointStore) -> None:
    """Remember a store holding the lock, so forked children drop their copy of it."""
    global _fork_hook_registered
    with _fork_hook:
        if not _fork_hook_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_close_locks_in_child)
            _fork_hook_registered = True
    _HELD_LOCKS.add(store)


def _verifies(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint that passes every check."""
    try:
        fmt.verify_checkpoint(path)
    except (CorruptCheckpoint, CheckpointNotFound, UnsupportedFormat):
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointStore:
    """A directory of checkpoints with atomic commits and retention.

    Args:
        directory: where checkpoints live; created at the first save.
        keep_last: keep this many newest unnamed checkpoints (None: all).
        keep_best: keep this many best on ``best`` as well.
        best: ``(metric, "min"|"max")`` ranking checkpoints by a metric.
        compression: None or ``"zstd"`` (multithreaded) for the tensor file.
        snapshot: how ``save_async`` snapshots the state: ``"auto"``,
            ``"fork"`` or ``"copy"`` (see ``killsafe.saver``).

    Thread safety: mutating calls are serialized by an internal lock, so a
    background saver may ``commit`` while the main thread reads. One process
    writes at a time (``StoreLocked`` otherwise); readers never lock.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        best: tuple[str, str] | None = None,
        compression: str | None = None,
        snapshot: str = "auto",
    ) -> None:
        if snapshot not in STRATEGIES:
            raise ConfigError(f"snapshot={snapshot!r} is unknown; use one of {STRATEGIES}")
        if compression not in (None, "zstd"):
            raise ConfigError(f"compression={compression!r} is not supported; use None or 'zstd'")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"checkpoint store {self.directory} is a file, not a directory")
        self.retention = Retention(keep_last=keep_last, keep_best=keep_best, best=best)
        self.compression = compression
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()
        self._warned: set[str] = set()
        self._vanished = 0  # checkpoints seen by list() that were gone when read (pruned)
        self._snapshot = snapshot
        self._saver: BackgroundSaver | None = None

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.directory)!r})"

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ lock

    def _acquire(self) -> None:
        """Take the write lock (once) and sweep leftovers of dead writers.

        Every failure leaves no descriptor open and no lock held, so a later
        call (after the disk was freed, say) starts afresh.
        """
        if self._lock_fd is not None:
            return
        path = self.directory / LOCK_NAME
        fd = self._open_lock_file(path)
        try:
            self._lock_or_wait(fd)
            self._write_holder(fd, path)
        except BaseException:
            os.close(fd)  # also drops the flock, if it was taken
            raise
        self._lock_fd = fd
        _hold_lock(self)
        self._sweep()

    def _open_lock_file(self, path: Path) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error("creating the checkpoint store", self.directory, exc) from exc
        try:
            # O_NOFOLLOW: a planted symlink must not redirect the lock record.
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _lock_error(path, exc) from exc

    def _lock_or_wait(self, fd: int) -> None:
        """Take the flock; wait while the recorded holder is dead.

        A dead holder's flock outlives it only in a child it forked that has
        not yet dropped its copy of the descriptor (children close it at once,
        see ``_close_locks_in_child``): that lasts a moment, so a restart right
        after a kill waits for it instead of failing.
        """
        deadline = time.monotonic() + DEAD_HOLDER_GRACE_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise _lock_error(self.directory / LOCK_NAME, exc) from exc
            holder = self._read_holder(fd)
            pid = holder.get("pid")
            elsewhere = holder.get("host", socket.gethostname()) != socket.gethostname()
            alive = elsewhere or (isinstance(pid, int) and _pid_alive(pid))
            if alive or time.monotonic() > deadline:
                state = "" if alive or pid is None else " (no longer running)"
                raise StoreLocked(
                    f"checkpoint store {self.directory} is being written by pid "
                    f"{holder.get('pid', '?')}{state} on host {holder.get('host', '?')}; "
                    "stop that process or use another directory"
                )
            time.sleep(0.01)

    def _write_holder(self, fd: int, path: Path) -> None:
        # A flock dies with its process, so whatever the file says about an
        # earlier holder is stale now: we take the lock over.
        previous = self._read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            log.info("taking over the lock of %s from pid %s", self.directory, previous.get("pid"))
        record = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        ).encode()
        try:
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, len(record))
        except OSError as exc:
            raise _lock_error(path, exc) from exc

    @staticmethod
    def _read_holder(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _sweep(self) -> None:
        for entry in os.scandir(self.directory):
            if entry.name.startswith(TMP_PREFIX):
                log.info("removing leftover %s", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)

    def close(self) -> None:
        """Finish a save in flight, then release the write lock (if held).

        Raises the failure of that save, if any, after releasing the lock.
        The store can be used again later.
        """
        try:
            if self._saver is not None:
                self._saver.close()
        finally:
            self._saver = None
            self._release()

    def _release(self) -> None:
        with self._mutex:
            if self._lock_fd is not None:
                _HELD_LOCKS.discard(self)
                try:
                    with contextlib.suppress(OSError):  # the record is advisory
                        os.ftruncate(self._lock_fd, 0)
                finally:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    # ------------------------------------------------------------ saving

    def save(
        self,
        state: Any,
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        name: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write ``state`` as the checkpoint of ``step`` and commit it atomically.

        Raises ``UnsupportedState`` (before anything is written),
        ``CheckpointExists`` when an unnamed checkpoint of this step (or a
        checkpoint of this name) exists, ``InvalidName``, ``StoreLocked`` and
        ``SaveFailed`` (disk full, I/O error; earlier checkpoints untouched).
        """
        self.wait()
        tree = capture(state)
        encoded = fmt.encode(tree)
        staging = self.begin(step, name=name)
        try:
            self.write(staging, encoded, metrics=metrics, reason=reason, metadata=metadata)
        except BaseException:
            self.abort(staging)
            raise
        return self.commit(staging)

    def save_async(
        self,
        state: Any,
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        name: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
        if_busy: str = "wait",
    ) -> PendingSave | None:
        """Snapshot ``state`` and write it in the background; return once staged.

        The caller may change the state as soon as this returns: the
        checkpoint holds the values of this moment. One save is in flight at
        a time; when another is still being written, ``if_busy="wait"``
        waits for it and ``"skip"`` returns ``None`` without saving. The
        handle's ``wait()`` returns the ``CheckpointInfo``. A background
        failure is raised by that ``wait()``, or else by the next
        ``save_async``, ``save``, ``wait`` or ``close`` of this store.
        """
        if self._saver is None:
            self._saver = BackgroundSaver(self, strategy=self._snapshot)
        return self._saver.submit(
            state,
            step,
            metrics=metrics,
            name=name,
            reason=reason,
            metadata=metadata,
            if_busy=if_busy,
        )

    def wait(self) -> CheckpointInfo | None:
        """Wait for a save in flight; return its info, or ``None`` if none was."""
        if self._saver is None:
            return None
        return self._saver.wait()

    def begin(self, step: int, *, name: str | None = None) -> Staging:
        """Check the step and name, take the lock and create the temporary directory."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step={step!r} must be a non-negative int")
        clean = sanitize_name(name) if name is not None else None
        with self._mutex:
            self._acquire()
            final = self._free_path(step, clean)
            tmp = self.directory / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
            except OSError as exc:
                raise io_error("creating", tmp, exc) from exc
        return Staging(step=step, name=clean, tmp_path=tmp, final_path=final)

    def _free_path(self, step: int, name: str | None) -> Path:
        """Where the checkpoint of ``step`` (and ``name``) goes; never over a damaged one.

        A valid checkpoint already there is ``CheckpointExists`` (the caller
        decides whether to replace it). A directory there that does not verify
        is left for the user to inspect: the new checkpoint goes beside it,
        under the same name with ``.2``, ``.3``... appended.
        """
        base = f"step-{step:06d}" + (f"--{name}" if name else "")
        self._check_name_free(name)
        for attempt in range(1, MAX_BESIDE + 1):
            final = self.directory / (base if attempt == 1 else f"{base}.{attempt}")
            if not os.path.lexists(final):
                return final
            if _verifies(final):
                what = f"named {name!r}" if name else "unnamed"
                raise CheckpointExists(
                    f"an {what} checkpoint of step {step} exists at {final}; "
                    "save under another step or name, or delete it first",
                    path=final,
                )
            self._warn_once(
                f"beside:{final}",
                f"{final} does not verify; it is kept for inspection and the new "
                "checkpoint is written beside it",
            )
        raise SaveFailed(
            f"{MAX_BESIDE} damaged checkpoints of step {step} in {self.directory}; "
            "inspect them with `killsafe verify`, then move them away"
        )

    def _check_name_free(self, name: str | None) -> None:
        if name is None:
            return
        for info in self.list():
            if info.name == name:
                raise CheckpointExists(
                    f"a checkpoint named {name!r} exists at {info.path}; choose another name",
                    path=info.path,
                )

    def write(
        self,
        staging: Staging,
        encoded: fmt.Encoded,
        *,
        metrics: dict[str, Any] | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write the checkpoint's files into the staging directory (any thread)."""
        try:
            staging.manifest = fmt.write_encoded(
                staging.tmp_path,
                encoded,
                step=staging.step,
                name=staging.name,
                reason=reason,
                metrics=metrics,
                metadata=metadata,
                compression=self.compression,
                fast_write=directio.write_direct,
            )
        except OSError as exc:
            raise SaveFailed(
                f"writing checkpoint of step {staging.step} to {self.directory} failed: "
                f"{exc.strerror or exc} ({free_space(self.directory)}); free disk space or "
                "check the device (earlier checkpoints are intact)"
            ) from exc
        return staging.manifest

    def commit(self, staging: Staging) -> CheckpointInfo:
        """Make a written staging directory a checkpoint, then apply retention.

        Order matters: the files were fsynced by ``write``; fsyncing the
        temporary directory makes their names durable; the rename is the
        atomic commit point; fsyncing the parent makes the rename durable.
        Retention deletes only after that, so a crash at any moment leaves
        the previous checkpoints intact. Safe to call from a background thread.
        """
        if staging.manifest is None:
            raise ConfigError("commit() needs a staging directory that write() has filled")
        with self._mutex:
            try:
                _fsync_directory(staging.tmp_path)
                if staging.final_path.exists():
                    raise CheckpointExists(
                        f"{staging.final_path} appeared while saving; not replaced"
                    )
                os.rename(staging.tmp_path, staging.final_path)
                _fsync_directory(self.directory)
            except OSError as exc:
                self.abort(staging)
                raise SaveFailed(
                    f"committing {staging.final_path} failed: {exc.strerror} "
                    f"({free_space(self.directory)})"
                ) from exc
            except KillsafeError:
                self.abort(staging)
                raise
            info = CheckpointInfo.from_manifest(staging.manifest, staging.final_path)
            if self.retention.prunes:
                self._prune(dry_run=False)
            return info

    def abort(self, staging: Staging) -> None:
        """Remove a staging directory that will not be committed."""
        shutil.rmtree(staging.tmp_path, ignore_errors=True)

    # ------------------------------------------------------------ reading

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
                    self._warn_once(entry.path, f"skipping {entry.path}: {exc}")
                else:
                    self._vanished += 1
            except (CorruptCheckpoint, UnsupportedFormat) as exc:
                self._warn_once(entry.path, f"skipping {entry.path}: {exc}")
        infos.sort(key=lambda info: (info.step, info.created))
        return infos

    @staticmethod
    def listed(path: Path) -> CheckpointInfo:
        """What ``list()`` sees of one checkpoint directory, or the typed error that skips it.

        Reads the manifest (checksum, schema) and checks with ``lstat`` only
        that its files are regular files of their recorded sizes.
        """
        manifest = fmt.read_manifest(path)
        fmt.check_files(path, manifest)
        return CheckpointInfo.from_manifest(manifest, path)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _first_good(self, rank: Any, use: Any) -> Any:
        """``use(info)`` on the first candidate of ``rank()`` for which it succeeds.

        A candidate that fails as corrupt is skipped with a warning. One that
        vanished meanwhile was pruned by a writer, not damaged: the
        candidates are ranked again (newer ones may have been committed) and
        the first good one of the new ranking is used; so too when every
        candidate vanished while being listed. Returns ``_NONE_LEFT`` when
        none is left.
        """
        failed: set[Path] = set()
        for _ in range(_MAX_RANKINGS):
            vanished = self._vanished
            for info in rank():
                if info.path in failed:
                    continue
                try:
                    return use(info)
                except (CorruptCheckpoint, CheckpointNotFound, UnsupportedFormat) as exc:
                    failed.add(info.path)
                    if os.path.lexists(info.path):
                        self._warn_once(
                            str(info.path), f"skipping corrupt checkpoint {info.path}: {exc}"
                        )
                        continue
                    break  # pruned while we read it: rank again
            else:
                if self._vanished == vanished:
                    return _NONE_LEFT
        return _NONE_LEFT

    def _verified(self, verify: bool) -> Any:
        def check(info: CheckpointInfo) -> CheckpointInfo:
            if verify:
                fmt.verify_checkpoint(info.path)
            return info

        return check

    def latest(self, *, verify: bool = True) -> CheckpointInfo | None:
        """The newest checkpoint that verifies (corrupt ones skipped with a warning)."""
        found = self._first_good(lambda: self.list()[::-1], self._verified(verify))
        return None if found is _NONE_LEFT else found

    def best(self, *, verify: bool = True) -> CheckpointInfo | None:
        """The best checkpoint on the store's ``best`` metric that verifies."""
        spec = self.retention.best
        if spec is None:
            raise ConfigError("best() needs the store to be created with best=(metric, mode)")
        found = self._first_good(lambda: best_of(self.list(), spec), self._verified(verify))
        return None if found is _NONE_LEFT else found

    def get(self, ref: Any = "latest") -> CheckpointInfo:
        """Resolve a reference: "latest", "best", a step, a name, a CheckpointInfo or a path."""
        if isinstance(ref, CheckpointInfo):
            return self._from_path(ref.path)
        if ref == "latest" or ref == "best":
            info = self.latest() if ref == "latest" else self.best()
            if info is None:
                raise CheckpointNotFound(f"no {ref} checkpoint in {self.directory}; save one first")
            return info
        if isinstance(ref, str) and ref.isdigit():
            ref = int(ref)  # names are never all digits, so this is a step
        if isinstance(ref, int) and not isinstance(ref, bool):
            matches = [info for info in self.list() if info.step == ref]
            unnamed = [info for info in matches if info.name is None]
            if not matches:
                raise CheckpointNotFound(f"no checkpoint of step {ref} in {self.directory}")
            return (unnamed or matches)[-1]
        if isinstance(ref, str) and "/" not in ref and ref not in (".", ".."):
            for info in self.list():
                if info.name == ref or info.path.name == ref:
                    return info
            raise CheckpointNotFound(
                f"no checkpoint named {ref!r} in {self.directory}; `killsafe list` shows them"
            )
        if isinstance(ref, (str, os.PathLike)):
            return self._from_path(Path(ref))
        raise ConfigError(
            f"checkpoint reference {ref!r} must be a step, name, path or CheckpointInfo"
        )

    def _from_path(self, path: Path) -> CheckpointInfo:
        return CheckpointInfo.from_manifest(fmt.read_manifest(path), path)

    def load(
        self,
        ref: Any = "latest",
        *,
        subtree: str | None = None,
        mmap: bool = False,
        verify: bool = True,
    ) -> Any:
        """Load a checkpoint's tree, verifying the checksums of what is read.

        With ``ref="latest"`` a checkpoint that fails to verify is skipped
        with a warning and the next newest one is loaded. ``subtree`` (dotted,
        e.g. ``"model"``) reads only that part; ``mmap=True`` maps tensors
        copy-on-write from the file; ``verify=False`` skips the checksums
        (with mmap, bytes are then read only when used). Raises ``CheckpointNotFound``,
        ``CorruptCheckpoint`` or ``UnsupportedFormat``.
        """
        if ref == "latest":
            tree = self._first_good(
                lambda: self.list()[::-1],
                lambda info: fmt.read_tree(info.path, subtree=subtree, mmap=mmap, verify=verify),
            )
            if tree is _NONE_LEFT:
                raise CheckpointNotFound(
                    f"no loadable checkpoint in {self.directory}; save one first"
                )
            return tree
        info = self.get(ref)
        return fmt.read_tree(info.path, subtree=subtree, mmap=mmap, verify=verify)

    def verify(self, ref: Any = "latest") -> CheckpointInfo:
        """Check every checksum of a checkpoint; raise ``CorruptCheckpoint`` if one fails."""
        info = self.get(ref) if ref != "latest" else self._newest_listed()
        fmt.verify_checkpoint(info.path)
        return info

    def _newest_listed(self) -> CheckpointInfo:
        infos = self.list()
        if not infos:
            raise CheckpointNotFound(f"no checkpoint in {self.directory}")
        return infos[-1]

    # ------------------------------------------------------------ deleting

    def delete(self, ref: Any, *, force: bool = False) -> CheckpointInfo:
        """Delete one checkpoint. The newest and the best need ``force=True``."""
        with self._mutex:
            info = self.get(ref)
            if not force:
                infos = self.list()
                protected = {infos[-1].path} if infos else set()
                if self.retention.best is not None:
                    ranked = best_of(infos, self.retention.best)
                    if ranked:
                        protected.add(ranked[0].path)  # type: ignore[attr-defined]
                if info.path in protected:
                    raise ConfigError(
                        f"{info.path} is the newest or the best checkpoint; "
                        "pass force=True to delete it"
                    )
            self._acquire()
            self._remove(info)
            return info

    def _remove(self, info: CheckpointInfo) -> None:
        # Rename first (atomic), so no reader sees a half-deleted checkpoint.
        doomed = self.directory / f"{TMP_PREFIX}delete-{info.path.name}-{uuid.uuid4().hex[:8]}"
        os.rename(info.path, doomed)
        _fsync_directory(self.directory)
        shutil.rmtree(doomed, ignore_errors=True)

    def prune(self, *, dry_run: bool = False) -> builtins.list[CheckpointInfo]:
        """Apply retention now; return what was (or, dry run, would be) deleted."""
        with self._mutex:
            return self._prune(dry_run=dry_run)

    def _prune(self, *, dry_run: bool) -> builtins.list[CheckpointInfo]:
        doomed: builtins.list[Any] = self.retention.select_deletions(self.list())
        if dry_run or not doomed:
            return list(doomed)
        self._acquire()
        for info in doomed:
            self._remove(info)
        return list(doomed)
