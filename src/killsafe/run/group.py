"""A run of many processes (``torch.distributed``): one run, rank 0 keeps the records.

When a process group is initialised (or passed as ``process_group=``), every
rank builds the same ``Run`` and they behave as one:

- the step boundary is decided together through a ``TorchCoordinator`` on
  a side gloo group with a timeout (``killsafe.distributed``);
- rank 0 writes ``run.json``, ``status.json``, the history, the events, the
  report and the progress, reads control requests and applies retention;
  the other ranks write only their parts of checkpoints and show nothing
  (``Quiet*`` parts below);
- checkpoints are sharded (``killsafe.distributed.runstate``): modules and
  optimizers through DCP, the rest per rank. A background save copies the
  rank's part at the boundary (the only part that blocks the loop) and
  writes and commits it on a thread, on a gloo group of its own; it counts
  as done only once every rank said so through the step boundary's flags,
  so its failure is raised on every rank at the same boundary (``JobSave``);
- rank 0 chooses the checkpoint to resume from and every rank reads it;
- at the start the ranks check that they see one run directory
  (``ranks_not_sharing``): where they do not (nodes with local disks),
  the run saves straight into its mirror, each rank uploading its part.

Nothing here imports torch until a group is found.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from killsafe.errors import (
    CheckpointExists,
    ConfigError,
    CorruptCheckpoint,
    KillsafeError,
    StoreLocked,
)
from killsafe.history import History
from killsafe.progress import Progress
from killsafe.run.config import RunConfig
from killsafe.run.control import ControlInbox
from killsafe.run.resume import Resume
from killsafe.run.services import Services
from killsafe.run.session import EventLog, SessionRecord
from killsafe.run.sharded_tree import tree_of
from killsafe.saver import PendingSave

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo
    from killsafe.store import CheckpointStore

__all__ = [
    "GroupResume",
    "GroupStore",
    "JobSave",
    "QuietEvents",
    "QuietInbox",
    "QuietServices",
    "QuietSession",
    "RunGroup",
    "flag_period",
    "join_group",
    "ranks_not_sharing",
]

logger = logging.getLogger("killsafe")

_PROBE_PATIENCE = 1.0  # seconds a rank looks for rank 0's probe file before answering no

FLAG_PERIOD_VARIABLE = "KILLSAFE_FLAG_PERIOD"
DEFAULT_FLAG_PERIOD = 0.1
_LONGEST_FLAG_PERIOD = 60.0


def flag_period() -> float:
    """Seconds of steps between two exchanges of the ranks' flags (``KILLSAFE_FLAG_PERIOD``).

    At most about this long passes between a stop or save asked on one rank
    and the step every rank acts on it (plus one step); 0 exchanges at
    every step boundary.
    """
    raw = os.environ.get(FLAG_PERIOD_VARIABLE)
    if raw is None or not raw.strip():
        return DEFAULT_FLAG_PERIOD
    try:
        period = float(raw)
    except ValueError:
        period = math.nan
    if not 0 <= period <= _LONGEST_FLAG_PERIOD:
        raise ConfigError(
            f"{FLAG_PERIOD_VARIABLE}={raw!r} is not a number of seconds from 0 to "
            f"{_LONGEST_FLAG_PERIOD:g}: give e.g. 0.1, or 0 to agree at every step"
        )
    return period


class RunGroup:
    """This process's place in the job: its coordinator, rank and world size."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self.rank: int = coordinator.rank
        self.world_size: int = coordinator.world_size
        self.leader = self.rank == 0
        self.saves_to_mirror = False  # the ranks share no disk: checkpoints go to the mirror
        self._saving: Any = None

    def saving_coordinator(self) -> Any:
        """The coordinator background saves run their collectives on (its own gloo group).

        Made at the first background save, which every rank starts at the
        same boundary, so making it is collective too.
        """
        if self._saving is None:
            from killsafe.distributed.process_group import TorchCoordinator

            timeout = getattr(self.coordinator, "timeout", 300.0)
            self._saving = TorchCoordinator(timeout=timeout, group=self.coordinator.group)
        return self._saving

    def config(self, config: RunConfig) -> RunConfig:
        """The configuration this rank runs with: only rank 0 shows."""
        quiet: dict[str, Any] = {}
        if not self.leader:
            quiet = {
                "progress": False,
                "keyboard": False,
                "serve": None,
                "report": False,
                "save_metrics": False,
                "tensorboard": False,
            }
        return dataclasses.replace(config, **quiet)


def join_group(process_group: Any, timeout: float) -> RunGroup | None:
    """The job this process runs in, or ``None`` when it runs alone.

    A job is an initialised default process group (found through
    ``sys.modules``: a process that never imported torch runs alone) or
    ``process_group``. Collective: every rank of the default group calls it.
    """
    if process_group is None:
        dist = sys.modules.get("torch.distributed")
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return None
    from killsafe.distributed.process_group import TorchCoordinator

    return RunGroup(TorchCoordinator(timeout=timeout, group=process_group))


def ranks_not_sharing(group: RunGroup, directory: Path) -> list[int]:
    """The ranks that do not see rank 0's run ``directory`` (collective; every rank gets it).

    Rank 0 writes a file of a fresh name and content there; every rank
    looks for it (a while, should a network file system show it late);
    rank 0 removes it once all have looked. When rank 0 cannot write it (a
    full disk), every rank raises its error.
    """
    probe: Path | None = None
    sent: dict[str, str] = {}
    if group.leader:
        nonce = uuid.uuid4().hex
        probe = directory / f".killsafe-shared-{nonce}"
        sent = _write_probe(probe, nonce)
    try:
        sent = group.coordinator.broadcast(sent)
        if "error" in sent:
            raise _rank_0_error(sent["kind"], sent["error"])
        nonce = sent["nonce"]
        seen = group.coordinator.gather(_sees(directory / f".killsafe-shared-{nonce}", nonce))
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    return [rank for rank, ok in enumerate(seen) if not ok]


def _write_probe(probe: Path, nonce: str) -> dict[str, str]:
    """What rank 0 tells the others: the probe's nonce, or why it could not write it."""
    from killsafe.store import io_error

    try:
        probe.write_text(nonce)
    except OSError as exc:
        error = io_error("writing", probe, exc)
        return {"error": f"rank 0: {error}", "kind": type(error).__name__}
    return {"nonce": nonce}


def _sees(probe: Path, nonce: str, patience: float = _PROBE_PATIENCE) -> bool:
    """Whether ``probe`` holds ``nonce``, looking again for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            if probe.read_text() == nonce:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


# ---------------------------------------------------------------- checkpoints


class GroupStore:
    """The store as a ``Run`` in a job uses it: sharded saves, rank 0 keeps the books.

    Every rank holds one (saving is collective); only rank 0 deletes and
    applies retention, and its store is the one resuming reads. On an
    object store (a job whose nodes share no disk) every rank uploads its
    part and rank 0 commits (``killsafe.distributed.objects``).
    """

    def __init__(self, store: CheckpointStore, group: RunGroup) -> None:
        self.store = store
        self.group = group
        self._thread: threading.Thread | None = None
        self._locked = False

    def _place(self, step: int, name: str | None) -> tuple[Any, Path]:
        """Where the checkpoint of ``step`` and ``name`` goes, as rank 0's store places it
        (beside a damaged one there, never over it): the target to save into (its
        directory, or the object store itself, which picks the same key when rank 0
        begins the save) and its path. Collective: ``CheckpointExists`` on every rank
        when a checkpoint that verifies is there."""
        answer: dict[str, Any] = {}
        if self.group.leader:
            try:
                answer = {"path": str(self.store.free_path(step, name))}
            except CheckpointExists as exc:
                answer = {"exists": str(exc), "path": str(exc.path)}
            except KillsafeError as exc:
                answer = {"error": str(exc), "kind": type(exc).__name__}
        answer = self.group.coordinator.broadcast(answer)
        if "error" in answer:
            raise _rank_0_error(answer["kind"], answer["error"])
        path = Path(answer["path"])
        if "exists" in answer:
            raise CheckpointExists(answer["exists"], path)
        return (path if self.store.is_local else self.store), path

    def save(
        self,
        tree: dict[str, Any],
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        name: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Save ``tree`` sharded at ``step`` (collective); retention runs on rank 0."""
        from killsafe.distributed.runstate import save_run_tree

        self._hold_lock()
        directory, _ = self._place(step, name)
        try:
            path = save_run_tree(
                tree,
                directory,
                self.group.coordinator,
                step=step,
                name=name,
                reason=reason,
                metrics=metrics,
                metadata=metadata,
                incremental=self.store.incremental,
            )
        except CheckpointExists as exc:  # the same on every rank, with its path
            raise CheckpointExists(str(exc), exc.path or directory) from exc
        self._prune_together(self.group.coordinator)
        return self.store.listed(path)

    def save_async(
        self,
        tree: dict[str, Any],
        step: int,
        *,
        metrics: dict[str, Any] | None = None,
        name: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> JobSave:
        """Copy this rank's part now, write and commit it on a thread (collective).

        Returns a ``JobSave``; the ledger allows one in flight.
        """
        from killsafe.distributed.runstate import save_staged, stage_run_tree

        self._hold_lock()
        directory, path = self._place(step, name)
        staged = stage_run_tree(tree, self.group.rank)
        coordinator = self.group.saving_coordinator()
        pending = JobSave(step, name, reason)

        def write() -> CheckpointInfo:
            path = save_staged(
                staged,
                directory,
                coordinator,
                step=step,
                name=name,
                reason=reason,
                metrics=metrics,
                metadata=metadata,
                incremental=self.store.incremental,
            )
            self._prune_together(coordinator)
            return self.store.listed(path)

        self._thread = pending.start(write, path)
        return pending

    def _prune_together(self, coordinator: Any) -> None:
        """Retention after a save, on rank 0; its failure raised on every rank (collective),
        so that every rank's save fails alike."""
        failed = None
        if self.group.leader:
            try:
                self.store.prune()
            except KillsafeError as exc:
                failed = {"error": str(exc), "kind": type(exc).__name__}
        failed = coordinator.broadcast(failed)
        if failed is not None:
            raise _rank_0_error(failed["kind"], failed["error"])

    def _hold_lock(self) -> None:
        """An incremental store: rank 0 holds its write lock from the first save on, so no
        other process (``killsafe prune``) sweeps a piece a save in flight refers to.

        Collective at the first save: every rank raises ``StoreLocked`` if rank 0
        cannot take the lock.
        """
        if self._locked or not self.store.incremental:
            return
        refused = None
        if self.group.leader:
            try:
                self.store.acquire()
            except StoreLocked as exc:
                refused = str(exc)
        refused = self.group.coordinator.broadcast(refused)
        if refused is not None:
            raise StoreLocked(refused)
        self._locked = True

    def wait(self) -> None:
        """Wait until the background save in flight, if any, is written."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def delete(self, ref: Any, *, force: bool = False) -> CheckpointInfo:
        """Delete a checkpoint (rank 0 does, the others wait for it)."""
        info = self.store.get(ref)
        self.group.coordinator.barrier("reading a checkpoint before deleting it")
        if self.group.leader:
            self.store.delete(info, force=force)
        self.group.coordinator.barrier(f"deleting {info.path}")
        return info

    def close(self) -> None:
        self.wait()
        self.store.close()

    def list(self) -> list[CheckpointInfo]:
        return self.store.list()

    def get(self, ref: Any = "latest") -> CheckpointInfo:
        return self.store.get(ref)

    def latest(self, *, verify: bool = True) -> CheckpointInfo | None:
        return self.store.latest(verify=verify)

    def verify(self, ref: Any = "latest") -> CheckpointInfo:
        return self.store.verify(ref)

    def load(self, ref: Any = "latest", **options: Any) -> Any:
        return self.store.load(ref, **options)


def _rank_0_error(kind: str, message: str) -> KillsafeError:
    """Rank 0's error (its type's name in ``killsafe.errors`` and its line), on every rank."""
    from killsafe import errors

    error_type = getattr(errors, kind, None)
    if not (isinstance(error_type, type) and issubclass(error_type, KillsafeError)):
        error_type = KillsafeError
    return error_type(message)


class JobSave(PendingSave):
    """A background save of a job: written on a thread, done when every rank agreed so.

    ``done()`` turns true only through ``agree_written()``, which the step
    boundary calls at the same step on every rank, once the flags said that
    no rank was still writing. So the ledger collects it (and raises its
    failure) at the same boundary everywhere. ``written_here()`` is this
    rank's own view. ``wait()`` blocks until this rank's thread is done.
    """

    def __init__(self, step: int, name: str | None, reason: str | None) -> None:
        super().__init__(step, name, reason)
        self._agreed = False

    def start(self, write: Callable[[], CheckpointInfo], directory: Path) -> threading.Thread:
        """Run ``write`` on a thread; its result or error becomes this save's."""

        def run() -> None:
            try:
                info = write()
            except BaseException as exc:  # kept for wait(), raised in the loop
                logger.debug("the background save of %s failed: %s", directory, exc)
                self._finish(None, exc)
            else:
                self._finish(info, None)

        thread = threading.Thread(target=run, name="killsafe-job-save", daemon=True)
        thread.start()
        return thread

    def written_here(self) -> bool:
        """Whether this rank's thread finished (written and committed, or failed)."""
        return super().done()

    def agree_written(self) -> None:
        """Every rank's thread finished: from now on ``done()`` is true."""
        self._agreed = True

    def done(self) -> bool:
        return self._agreed


class GroupResume(Resume):
    """Resuming in a job: rank 0 chooses (as ``Resume`` does), every rank reads its part."""

    def choose(self) -> CheckpointInfo | None:
        store = self._store
        assert isinstance(store, GroupStore)
        group = store.group
        choice: dict[str, Any] = {"path": None, "error": None}
        if group.leader:
            try:
                info = self._resolve()
                choice["path"] = None if info is None else str(info.path)
            except KillsafeError as exc:
                choice["error"] = str(exc)
                group.coordinator.broadcast(choice)
                raise
        choice = group.coordinator.broadcast(choice)
        if choice["error"] is not None:
            raise ConfigError(f"rank 0 could not choose a checkpoint: {choice['error']}")
        if choice["path"] is None:
            self.info = None
            return None
        info = store.store.listed(Path(choice["path"]))
        self._tree = tree_of(store.store, info, group.rank, group.world_size)
        if group.leader:
            self._warn_if_newer(info)
        self.info = info
        return info

    def _delete(self, info: CheckpointInfo) -> None:
        """Clearing (``resume="never", clear=True``) runs in ``choose`` on rank 0 alone: it
        deletes through the store itself, not collectively."""
        store = self._store
        assert isinstance(store, GroupStore)
        store.store.delete(info, force=True)

    def _restore_together(self, targets: Mapping[str, Any]) -> Mapping[str, Any]:
        """Load the checkpoint's modules and optimizers in one collective, resharded to this
        job (FSDP2 / DTensor shards or whole tensors, whatever layout saved them); return
        the rest, which each rank restores from its own part."""
        info = self.info
        if info is None or not info.sharded:
            return targets
        from killsafe.distributed.runstate import KINDS_KEY, is_shared

        saved_shared = set(dict(info.metadata.get(KINDS_KEY) or {}))
        shared = {n: t for n, t in targets.items() if n in saved_shared and is_shared(t)}
        if not shared:
            return targets
        from killsafe.distributed.objects import stored
        from killsafe.distributed.reshard import load_shared, saved_tables
        from killsafe.run.resume import check_shapes

        store = self._store
        assert isinstance(store, GroupStore)
        where = stored(store.store, info.path)
        check_shapes(shared, saved_tables(where, sorted(shared)), info)
        load_shared(where, shared, store.group.coordinator)
        return {name: target for name, target in targets.items() if name not in shared}

    def _saved(self, name: str, target: Any) -> Any:
        """A one-process checkpoint's whole tensors, sliced to this rank's shards where the
        target's are DTensors (an FSDP2 model resuming what one process saved)."""
        saved = super()._saved(name, target)
        from killsafe.distributed.runstate import is_shared

        if not is_shared(target):
            return saved
        from killsafe.distributed.reshard import sharded_like

        return sharded_like(saved, target)

    def _load_newest_good(self) -> CheckpointInfo | None:
        """On rank 0: the newest checkpoint that verifies (every rank reads it afterwards)."""
        for info in reversed(self._store.list()):
            try:
                self._store.verify(info)
            except CorruptCheckpoint as exc:
                logger.warning("skipping corrupt checkpoint %s: %s", info.path, exc)
                continue
            return info
        return None


# ---------------------------------------------------------------- the quiet ranks


class QuietEvents(EventLog):
    """A rank other than 0: its events are rank 0's to write."""

    __slots__ = ()

    def append(self, kind: str, step: int | None, **fields: Any) -> None:
        return None


class QuietSession(SessionRecord):
    """A rank other than 0: ``run.json`` and ``status.json`` are rank 0's to write."""

    def write_start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def write_end(self, *args: Any, **kwargs: Any) -> None:
        return None

    def update_run_json(self, update: Any) -> None:
        return None

    def write_status(self, state: str, *, heartbeat: bool = False) -> None:
        return None

    def start_heartbeat(self, started_clock: float) -> None:
        self.next_status = math.inf


class QuietHistory(History):
    """A rank other than 0: the history is rank 0's to write."""

    def append(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        return {"step": int(step), **metrics}

    def truncate_after(self, step: int) -> int:
        return 0

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class QuietServices(Services):
    """A rank other than 0: no history file, no display, no keyboard, no dashboard."""

    def open_display(self, step: int, total: int | None) -> Progress:
        self.history = QuietHistory(self._config.directory)
        self.progress = Progress(total=total, start_step=step, enabled=False)
        return self.progress


class QuietInbox(ControlInbox):
    """A rank other than 0: control requests are rank 0's to read and answer."""

    def poll_at(self, now: float, step: int) -> None:
        self.next_poll = math.inf

    def poll(self, step: int) -> None:
        return None

    def discard_unread(self, step: int) -> None:
        return None
