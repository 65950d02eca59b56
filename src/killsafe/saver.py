"""Background saving: snapshot on the caller's thread, write everywhere else.

A save has two halves. The *snapshot* makes the state safe to keep
training: the loop is blocked only for it. The *write* (serialise,
checksum, compress, fsync, commit, prune) happens in the background while
the loop runs on. One save is in flight at a time.

Snapshot strategies (``strategy=``):

- ``"copy"`` (the default, ``"auto"``): tensors are copied into host
  buffers that are reused from one save to the next (CUDA tensors into one
  page-locked arena per device, see ``staging``: the copies are queued on
  the device, run while the tree is encoded, and are waited on once), and a
  thread writes them. The loop pays one memory copy of the state and
  nothing after it.
- ``"fork"`` (Linux, CPU state, asked for by name or with
  ``KILLSAFE_SNAPSHOT=fork``): the process forks, and the child writes the
  checkpoint from its copy-on-write view of memory, the way Redis writes
  its background saves. The call itself blocks only for ``fork()`` (page
  tables, not data), but every page the loop changes afterwards is copied
  by the kernel on its first write: when the next step changes every
  parameter, that step pays a page fault per 4 KiB of state, which on a
  virtual machine costs more than the copy it saved (measured in
  benchmarks/bench_saver.py). It pays off when the loop changes little of
  a large state between saves (a big replay buffer, a population). The
  child touches neither CUDA, torch's thread pools nor any lock another
  thread may hold: everything it needs (the encoded tree and raw memory
  views) is prepared before the fork, and it leaves with ``os._exit``. It
  dies with its parent (``PR_SET_PDEATHSIG``), so a killed run leaves only
  a temporary directory, swept at the next start; it never holds the store
  lock (its inherited copy is closed at the fork), so a restart right after
  a kill gets the lock. With CUDA tensors or
  pinned memory in the state it falls back to the copy.

A background failure is kept and raised by the next call to ``submit``,
``check``, ``wait`` or ``close``: it is never lost.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from killsafe import format as fmt
from killsafe.environment import getenv
from killsafe.errors import ConfigError, KillsafeError, SaveFailed
from killsafe.host import BACKGROUND_NICE, lower_this_threads_priority
from killsafe.staging import PinnedStaging, Staged
from killsafe.state import capture, is_torch_tensor, tensors_in

__all__ = [
    "IF_BUSY",
    "STRATEGIES",
    "BackgroundSaver",
    "PendingSave",
    "check_if_busy",
    "choose_strategy",
    "skips_busy_save",
]

log = logging.getLogger("killsafe.saver")

STRATEGIES = ("auto", "fork", "copy")
IF_BUSY = ("wait", "skip")


def check_if_busy(if_busy: str) -> str:
    """``if_busy`` itself, or ``ConfigError`` when it is neither ``"wait"`` nor ``"skip"``."""
    if if_busy not in IF_BUSY:
        raise ConfigError(f"if_busy={if_busy!r} is unknown; use 'wait' or 'skip'")
    return if_busy


def skips_busy_save(if_busy: str, busy: PendingSave | None, *, must_save: bool = False) -> bool:
    """Whether a new save is skipped because ``busy`` is still being written.

    The one rule of ``if_busy``, for the saver and for ``Run``: ``"skip"``
    skips while the previous save is unfinished, unless this save must
    happen (a run that is ending); ``"wait"`` never skips.
    """
    return if_busy == "skip" and not must_save and busy is not None and not busy.done()


_PR_SET_PDEATHSIG = 1
_BLOCKED_IN_CHILD = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}


class _Staging(Protocol):
    step: int
    tmp_path: Any
    manifest: dict[str, Any] | None


class _Store(Protocol):
    """The part of ``CheckpointStore`` a saver drives (kept structural: no import)."""

    def begin(self, step: int, *, name: str | None = None) -> Any: ...

    def write(
        self,
        staging: Any,
        encoded: fmt.Encoded,
        *,
        metrics: dict[str, Any] | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]: ...

    def commit(self, staging: Any) -> fmt.CheckpointInfo: ...

    def abort(self, staging: Any) -> None: ...


class PendingSave:
    """A save being written in the background.

    ``done()`` says whether it has finished (committed or failed);
    ``wait()`` blocks until then and returns its ``CheckpointInfo`` or
    raises its error. Thread safe.
    """

    def __init__(self, step: int, name: str | None, reason: str | None) -> None:
        self.step = step
        self.name = name
        self.reason = reason
        self.started = time.monotonic()
        self.blocked_seconds = 0.0
        self._finished = threading.Event()
        self._info: fmt.CheckpointInfo | None = None
        self._error: BaseException | None = None
        self._reported = False

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"PendingSave(step={self.step}, name={self.name!r}, {state})"

    def done(self) -> bool:
        """Whether the save has finished, successfully or not."""
        return self._finished.is_set()

    def wait_written(self, timeout: float | None = None) -> bool:
        """Block until the save has finished (committed or failed), at most ``timeout`` seconds.

        Returns whether it finished. Unlike ``wait()`` it neither returns the
        result nor raises the failure: the loop still collects both.
        """
        return self._finished.wait(timeout)

    def wait(self, timeout: float | None = None) -> fmt.CheckpointInfo:
        """Block until the save is committed; return its info or raise its error.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first, and the
        save's own ``KillsafeError`` (``SaveFailed`` for I/O errors) if it
        failed.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the save of step {self.step} is still being written")
        self._reported = True
        if self._error is not None:
            raise self._error
        assert self._info is not None
        return self._info

    @property
    def error(self) -> BaseException | None:
        """The failure, once finished; ``None`` while writing or after success."""
        return self._error if self.done() else None

    def _finish(self, info: fmt.CheckpointInfo | None, error: BaseException | None) -> None:
        self._info, self._error = info, error
        self._finished.set()


@dataclass
class _Job:
    staging: Any
    encoded: fmt.Encoded
    metrics: dict[str, Any] | None
    reason: str | None
    metadata: dict[str, Any] | None
    pending: PendingSave


def choose_strategy(tree: Any, requested: str = "auto") -> str:
    """The snapshot strategy for a captured tree: ``"fork"`` or ``"copy"``."""
    if requested not in STRATEGIES:
        raise ConfigError(f"snapshot strategy {requested!r} is unknown; use one of {STRATEGIES}")
    requested = getenv("SNAPSHOT", requested) or requested
    if requested != "fork":
        return "copy"
    if not (sys.platform.startswith("linux") and hasattr(os, "fork")):
        raise ConfigError("the fork snapshot needs Linux; use strategy='copy' or 'auto'")
    if _has_device_or_pinned_memory(tree):
        log.info("CUDA tensors or pinned memory in the state: snapshot by copy, not fork")
        return "copy"
    return "fork"


def _has_device_or_pinned_memory(tree: Any) -> bool:
    """CUDA tensors, and pinned host memory (mapped MADV_DONTFORK), rule out fork."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
    for tensor in tensors_in(tree):
        if tensor.device.type != "cpu" or (cuda_live and tensor.is_pinned()):
            return True
    return False


class BackgroundSaver:
    """Writes checkpoints of a store in the background, one at a time.

    Args:
        store: the ``CheckpointStore`` (anything with ``begin``, ``write``,
            ``commit`` and ``abort``).
        strategy: ``"auto"``, ``"fork"`` or ``"copy"`` (see the module doc).
        if_busy: what ``submit`` does when the previous save is still being
            written: ``"wait"`` for it (the default) or ``"skip"`` this one.
            Either choice is logged.

    Not for use from several threads at once: one loop submits.
    """

    strategies: ClassVar[tuple[str, ...]] = STRATEGIES

    def __init__(self, store: _Store, *, strategy: str = "auto", if_busy: str = "wait") -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"snapshot strategy {strategy!r} is unknown; use one of {STRATEGIES}")
        check_if_busy(if_busy)
        self.store = store
        self.strategy = strategy
        self.if_busy = if_busy
        self._pending: PendingSave | None = None
        self._worker: _Worker | None = None
        self._pool = _BufferPool()
        self._staging = PinnedStaging()
        self._closed = False

    @property
    def in_flight(self) -> PendingSave | None:
        """The save still being written, if any."""
        pending = self._pending
        return pending if pending is not None and not pending.done() else None

    def submit(
        self,
        state: Any,
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        name: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
        if_busy: str | None = None,
    ) -> PendingSave | None:
        """Snapshot ``state`` now and write it in the background.

        Returns the ``PendingSave`` handle, or ``None`` when the save was
        skipped because another was in flight and ``if_busy`` is ``"skip"``.
        Raises an earlier background failure first, then the errors of
        ``CheckpointStore.save`` that can be known before writing.
        """
        if self._closed:
            raise ConfigError("this saver is closed; create a new one")
        self.check()
        busy = self.in_flight
        if skips_busy_save(check_if_busy(if_busy or self.if_busy), busy):
            assert busy is not None
            log.info(
                "skipping the save of step %d: step %d is still being written", step, busy.step
            )
            return None
        if busy is not None:
            log.info("waiting for the save of step %d before saving step %d", busy.step, step)
        self._join_worker()
        self.check()
        started = time.perf_counter()
        tree = capture(state)
        # A forked child writes into a local directory only; object stores
        # are uploaded by this process's threads (KILLSAFE_SNAPSHOT=fork too).
        local = getattr(self.store, "is_local", True)
        strategy = choose_strategy(tree, self.strategy) if local else "copy"
        staged = self._staging.stage(tree) if strategy == "copy" else Staged()
        encoded = fmt.encode(tree, host_copies=staged.copies)  # while the device copies run
        staging = self.store.begin(step, name=name)
        pending = PendingSave(step, staging.name, reason)
        job = _Job(staging, encoded, metrics, reason, metadata, pending)
        try:
            if strategy == "fork":
                self._start_fork(job)
            else:
                # Host entries are copied while the device copies still run.
                job.encoded = self._pool.snapshot(encoded, self._staging.owns)
                staged.wait()
                self._run_in_background(lambda: self._write_and_commit(job))
        except BaseException:
            self.store.abort(staging)
            raise
        pending.blocked_seconds = time.perf_counter() - started
        self._pending = pending
        return pending

    def check(self) -> None:
        """Raise the failure of a finished background save not yet reported."""
        pending = self._pending
        if pending is None or not pending.done() or pending._reported:
            return
        pending._reported = True
        if pending._error is not None:
            raise pending._error

    def wait(self) -> fmt.CheckpointInfo | None:
        """Wait for the save in flight; return its info (``None`` if there was none)."""
        self._join_worker()
        pending = self._pending
        if pending is None or pending._reported:
            return None
        return pending.wait()

    def close(self) -> None:
        """Finish the save in flight, then refuse new ones; raises its failure."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None
            self._pool.release()
            self._staging.release()

    # ------------------------------------------------------------ workers

    def _join_worker(self) -> None:
        if self._pending is not None:
            self._pending._finished.wait()

    def _run_in_background(self, task: Callable[[], None]) -> None:
        if self._worker is None:
            self._worker = _Worker()
        self._worker.submit(task)

    def _write_and_commit(self, job: _Job) -> None:
        try:
            self.store.write(
                job.staging,
                job.encoded,
                metrics=job.metrics,
                reason=job.reason,
                metadata=job.metadata,
            )
            info = self.store.commit(job.staging)
        except BaseException as exc:
            self.store.abort(job.staging)
            job.pending._finish(None, _as_save_error(exc, job.pending.step))
        else:
            job.pending._finish(info, None)

    def _start_fork(self, job: _Job) -> None:
        # Metrics and metadata are made plain JSON here, in the parent, so a
        # bad value is a clear error now and the child runs no user code.
        job.metrics = fmt.clean_json(dict(job.metrics or {}), "metrics")
        job.metadata = fmt.clean_json(dict(job.metadata or {}), "metadata")
        read_end, write_end = os.pipe()
        parent = os.getpid()
        with _fork_warning_silenced():
            pid = os.fork()  # the child drops its copy of the store lock at once (store/lock.py)
        if pid == 0:  # pragma: no cover - the child ends in os._exit
            os.close(read_end)
            _child_write(self.store, job, write_end, parent)
        os.close(write_end)
        self._run_in_background(lambda: self._reap_child(job, pid, read_end))

    def _reap_child(self, job: _Job, pid: int, read_end: int) -> None:
        try:
            message = _read_all(read_end)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SaveFailed(_child_failure(job.pending.step, status, message))
            job.staging.manifest = fmt.read_manifest(job.staging.tmp_path)
            info = self.store.commit(job.staging)
        except BaseException as exc:
            self.store.abort(job.staging)
            job.pending._finish(None, _as_save_error(exc, job.pending.step))
        else:
            job.pending._finish(info, None)


class _Worker:
    """One long-lived thread that runs background tasks in order."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="killsafe-saver", daemon=True)
        self._thread.start()

    def submit(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def stop(self) -> None:
        self._tasks.put(None)
        self._thread.join()

    def _loop(self) -> None:
        lower_this_threads_priority()
        while (task := self._tasks.get()) is not None:
            task()


def _child_write(
    store: _Store, job: _Job, pipe: int, parent: int
) -> None:  # pragma: no cover - in the child
    """Write the staged checkpoint from the child's copy of memory, then exit."""
    code = 1
    try:
        gc.disable()  # no finalizers of the parent's objects run here
        signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED_IN_CHILD)
        _die_with_parent(parent)
        with contextlib.suppress(OSError):
            os.nice(BACKGROUND_NICE)  # the loop's steps come first; the writer mostly waits
        store.write(
            job.staging, job.encoded, metrics=job.metrics, reason=job.reason, metadata=job.metadata
        )
        code = 0
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(pipe, str(exc).encode(errors="replace")[:4000])
    finally:
        os._exit(code)


def _die_with_parent(parent: int) -> None:  # pragma: no cover - in the child
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent died before prctl took effect: the child was reparented (to
    # init or a subreaper, so compare with the parent's pid, not with 1).
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def _fork_warning_silenced() -> Any:
    """Python 3.12+ warns on fork in a threaded process; the child here is safe by design."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        yield


def _read_all(fd: int) -> str:
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _child_failure(step: int, status: int, message: str) -> str:
    if message:
        return message
    code = os.waitstatus_to_exitcode(status)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return f"the background writer of step {step} {how}; the checkpoint was not committed"


def _as_save_error(exc: BaseException, step: int) -> BaseException:
    if isinstance(exc, KillsafeError):
        return exc
    error = SaveFailed(f"saving step {step} in the background failed: {exc}")
    error.__cause__ = exc
    return error


class _BufferPool:
    """Host buffers reused from one save to the next, one per tensor entry.

    Memory: at most one extra copy of the host state, allocated at the
    first save and reused while the sizes stay the same. (CUDA tensors are
    staged in ``staging.PinnedStaging`` and not copied again here.)
    """

    def __init__(self) -> None:
        self._host: dict[str, Any] = {}

    def release(self) -> None:
        self._host.clear()

    def snapshot(self, encoded: fmt.Encoded, private: Callable[[Any], bool]) -> fmt.Encoded:
        """Copy every entry's bytes into a reused buffer; the live tensors are free after.

        Entries whose owner ``private`` accepts are already private copies.
        """
        entries = []
        for entry in encoded.entries:
            if is_torch_tensor(entry.owner) and private(entry.owner):
                entries.append(entry)
                continue
            buffer = self._host_buffer(entry.key, entry.nbytes)
            _copy_bytes(buffer, entry.data)
            entries.append(
                fmt.TensorEntry(entry.key, entry.dtype, entry.shape, entry.align, buffer, buffer)
            )
        return fmt.Encoded(tree=encoded.tree, entries=entries)

    def _host_buffer(self, key: str, nbytes: int) -> memoryview:
        buffer = self._host.get(key)
        if buffer is None or len(buffer) != nbytes:
            buffer = bytearray(nbytes)
            self._host[key] = buffer
        return memoryview(buffer)


def _copy_bytes(target: memoryview, source: memoryview) -> None:
    """Copy with torch's multithreaded copy when torch is loaded, else memmove."""
    torch = sys.modules.get("torch")
    if torch is not None and source.nbytes >= 1 << 20 and not source.readonly:
        dst = torch.frombuffer(target, dtype=torch.uint8)
        src = torch.frombuffer(source, dtype=torch.uint8)
        dst.copy_(src)
    else:
        target[:] = source
