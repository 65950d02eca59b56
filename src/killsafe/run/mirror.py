"""The remote tier of a run: checkpoints committed locally, then uploaded in the background.

``Run(directory, mirror="s3://bucket/exp")`` keeps today's local store and
adds this: after each local commit, the checkpoint is copied byte for byte
into a ``CheckpointStore`` at the mirror URL (its own retention, its own
lease), followed by the run's files (``run.json``, the history, the events,
the report) under ``run/``. The loop never waits for an upload; when several
checkpoints queue up behind a slow upload, only the newest unnamed one (and
every named one) goes up.

On a machine whose local directory has nothing newer, ``sync()`` brings
the mirror's newest good checkpoint down, with the run's files when the
directory has none, so the run resumes from it as from a local one. At the
end of a session ``drain()`` waits for the uploads, bounded by a grace time
on a stop (what Kubernetes and spot notices allow), and says in one line
what reached the mirror.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from killsafe import storage
from killsafe.errors import CheckpointExists, CheckpointNotFound, ConfigError, KillsafeError
from killsafe.host import lower_this_threads_priority
from killsafe.run.config import DEFAULT_MIRROR_GRACE
from killsafe.rundir.layout import EVENTS_FILE, HISTORY_FILE, RUN_FILE
from killsafe.rundir.remote import MIRROR_RUN_PREFIX, MIRRORED_FILES, download_run_files

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo
    from killsafe.saver import PendingSave
    from killsafe.store import CheckpointStore

__all__ = ["DirectMirror", "Mirror"]

log = logging.getLogger("killsafe.run")

_RESTORED_FILES = (RUN_FILE, HISTORY_FILE, EVENTS_FILE)
_HOLD_LIMIT = 30.0  # seconds an upload waits for a snapshot at most


class Mirror:
    """Uploads a run's committed checkpoints and files to a remote store, in the background.

    Args:
        remote: the store at the mirror URL (opened by the run).
        local: the run's local store.
        directory: the run directory whose files travel with the checkpoints.
        grace: seconds ``drain(stopping=True)`` waits for uploads still running.
    """

    def __init__(
        self,
        remote: CheckpointStore,
        local: CheckpointStore,
        directory: Path,
        *,
        grace: float = DEFAULT_MIRROR_GRACE,
    ) -> None:
        self.remote = remote
        self.local = local
        self.directory = directory
        self.grace = grace
        self.url = remote.location.rstrip("/")
        self._files = storage.open(self.url)
        self._queue: deque[CheckpointInfo] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._uploaded: list[CheckpointInfo] = []
        self._failed: str | None = None
        self._thread: threading.Thread | None = None
        self._go = threading.Event()  # cleared while the loop takes a snapshot
        self._go.set()
        self._writing: PendingSave | None = None  # the local write uploads wait for
        self._uploading: CheckpointInfo | None = None
        self._draining = False  # the session ends: only the newest checkpoints matter
        self._deadline: float | None = None  # a stopping session's end of grace (monotonic)

    # -- at the start -------------------------------------------------------

    def sync(self, *, restore: bool) -> CheckpointInfo | None:
        """Bring the tiers level at the start of a session.

        When the mirror's newest good checkpoint is newer than the local one
        and ``restore`` is set, copy it down (with the run's files when the run
        directory has no ``run.json``) and return the local copy's info. When
        the local one is newer (a session killed before its upload), queue it.
        """
        remote_latest = self.remote.latest()
        local_latest = self.local.latest()
        if local_latest is not None and (
            remote_latest is None or local_latest.step > remote_latest.step
        ):
            self.submit(local_latest)
            return None
        if remote_latest is None or not restore:
            return None
        if local_latest is not None and local_latest.step >= remote_latest.step:
            return None
        if not (self.directory / RUN_FILE).exists():
            download_run_files(self._files, self.directory, _RESTORED_FILES)
        try:
            info = self.local.import_from(self.remote, remote_latest)
        except CheckpointExists:
            return None  # a damaged local copy of that step: the local store decides
        log.info("killsafe: restored step %d from the mirror %s", info.step, remote_latest.location)
        return info

    def start_over(self, *, clear: bool) -> None:
        """A run started afresh (``resume="never"``): refuse a mirror holding checkpoints,
        as its local store is refused, or with ``clear`` delete them, so that no fresh node
        resumes the old run's and no upload of this one is taken for one already there."""
        existing = self.remote.list()
        if not existing:
            return
        if not clear:
            raise ConfigError(
                f"resume='never' but the mirror {self.url} holds {len(existing)} "
                f"checkpoint(s) up to step {existing[-1].step}; pass clear=True (--clear) to "
                "delete them, resume='auto' to continue, or use another mirror"
            )
        for info in existing:
            self.remote.delete(info, force=True)
        log.info("killsafe: cleared %d checkpoint(s) from the mirror %s", len(existing), self.url)

    # -- while the run goes ---------------------------------------------------

    def submit(self, info: CheckpointInfo) -> None:
        """Queue a committed local checkpoint for upload; returns at once."""
        with self._cond:
            if self._closed:
                return
            self._queue.append(info)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="killsafe-mirror", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def hold(self) -> None:
        """Pause the upload between two chunks: the loop is saving locally."""
        self._go.clear()

    def release(self, *, after: PendingSave | None = None) -> None:
        """The snapshot is taken: let the upload go on, once ``after`` (its local write) ends.

        The local checkpoint comes first: while it is written in the
        background, an upload would take the cores and the disk it needs,
        and the loop waits for that write at its next save.
        """
        if after is not None:
            with self._cond:
                self._writing = after
        self._go.set()

    def _pace(self) -> None:
        # Bounded: a save that never says it is done must not stop uploads.
        self._go.wait(_HOLD_LIMIT)
        writing = self._writing
        if writing is not None and writing.wait_written(_HOLD_LIMIT):
            with self._cond:
                if self._writing is writing:
                    self._writing = None
        self._check_superseded()

    def _check_superseded(self) -> None:
        """At the session's end, stop uploading an unnamed checkpoint a newer one replaces.

        Only while draining: during the session every upload finishes, so a
        mirror slower than the saves still receives checkpoints.
        """
        with self._cond:
            current = self._uploading
            if not self._draining or current is None or current.name is not None:
                return
            newer = [i.step for i in self._queue if i.name is None and i.step > current.step]
        if newer:
            raise _Superseded(f"step {current.step} is superseded by step {max(newer)}")

    def _work(self) -> None:
        lower_this_threads_priority()  # uploads give way to the loop, as the saver's writer
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = _worth_uploading(self._queue)
                self._queue.clear()
                self._busy = True
            try:
                for info in batch:
                    self._upload(info)
                self.upload_run_files()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _upload(self, info: CheckpointInfo) -> None:
        with self._cond:
            self._uploading = info
        try:
            uploaded = self._import(info)
        except _Superseded as exc:
            log.info("killsafe: upload left at the end of the session: %s", exc)
            return
        except CheckpointExists:
            return  # mirrored already (an earlier session uploaded it)
        except CheckpointNotFound:
            log.info("killsafe: step %d was pruned locally before its upload", info.step)
            return
        except KillsafeError as exc:
            self._failed = f"step {info.step}: {exc}"
            log.warning("killsafe: upload of step %d to %s failed: %s", info.step, self.url, exc)
            return
        except Exception as exc:  # the worker must live on: a dead one hangs drain()
            self._failed = f"step {info.step}: {type(exc).__name__}: {exc}"
            log.error(
                "killsafe: upload of step %d to %s failed: %s", info.step, self.url, self._failed
            )
            return
        finally:
            with self._cond:
                self._uploading = None
        with self._cond:
            self._uploaded.append(uploaded)
            self._failed = None

    def _import(self, info: CheckpointInfo) -> CheckpointInfo:
        """Copy ``info`` into the mirror. An unnamed checkpoint of another continuation at
        its step (the run resumed from an older one, which replaced it locally) is
        replaced there too; ``CheckpointExists`` when the mirror has this one."""
        try:
            return self.remote.import_from(self.local, info, pace=self._pace)
        except CheckpointExists as exc:
            if info.name is not None or exc.path is None:
                raise
            there = self.remote.get(exc.path)
            if there.created == info.created:
                raise
        self.remote.delete(there, force=True)
        log.info("killsafe: replacing %s from an abandoned continuation", there.location)
        return self.remote.import_from(self.local, info, pace=self._pace)

    def upload_run_files(self) -> None:
        """Upload the run's files that exist (each replaces its previous copy)."""
        for name in MIRRORED_FILES:
            path = self.directory / name
            try:
                data = path.read_bytes()
            except OSError:
                continue
            try:
                with self._files.open_write(MIRROR_RUN_PREFIX + name) as sink:
                    sink.write(data)
            except KillsafeError as exc:
                log.warning("killsafe: uploading %s to %s failed: %s", name, self.url, exc)
                return

    # -- at the end -----------------------------------------------------------

    def drain(self, *, stopping: bool) -> str:
        """Wait for the uploads (at most ``grace`` seconds when ``stopping``); say what reached.

        Uploads the run's files last, so the mirror holds the session's end
        (within the grace time too when ``stopping``).
        """
        deadline = time.monotonic() + self.grace if stopping else None
        with self._cond:
            self._draining = True
            self._deadline = deadline
        done = self._wait_idle(deadline)
        if done:
            done = self._within_grace(self.upload_run_files, "killsafe-mirror-files")
        return self._summary(done)

    def _within_grace(self, work: Callable[[], None], name: str) -> bool:
        """Run ``work``; after ``drain(stopping=True)``, for no longer than what is left of
        the grace time (it goes on in a daemon thread). False when it was left running."""
        if self._deadline is None:
            work()
            return True
        thread = threading.Thread(target=work, name=name, daemon=True)
        thread.start()
        thread.join(max(self._deadline - time.monotonic(), 0.0))
        return not thread.is_alive()

    def _wait_idle(self, deadline: float | None) -> bool:
        with self._cond:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _summary(self, done: bool) -> str:
        with self._cond:
            uploaded = list(self._uploaded)
            failed = self._failed
        newest = max((info.step for info in uploaded), default=None)
        reached = (
            f"newest step {newest}, {len(uploaded)} uploaded this session"
            if newest is not None
            else "nothing uploaded this session"
        )
        line = f"killsafe: mirror {self.url}: {reached}"
        if not done:
            line += f"; uploads still running after {self.grace:g} s were left (local copies kept)"
        elif failed is not None:
            line += f"; last upload failed ({failed})"
        return line

    def close(self) -> None:
        """Stop the upload thread (after what it is doing) and release the remote store.

        After ``drain(stopping=True)`` this waits no longer than what is left
        of the grace time: releasing the store waits for an upload holding it
        (a commit retried against a failing server), which then finishes in
        the background, and the mirror's lease is given back when it does.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            busy = self._busy
        if not self._within_grace(lambda: self._release(busy), "killsafe-mirror-close"):
            log.warning(
                "killsafe: mirror %s was not released within the grace (an upload or the "
                "server holds it); its lease is given back when that ends, or expires",
                self.url,
            )

    def _release(self, busy: bool) -> None:
        if self._thread is not None and not busy:
            self._thread.join(timeout=1.0)
        self.remote.close()
        self._files.close()


class DirectMirror(Mirror):
    """The mirror of a job whose nodes share no disk: the run saves straight into it.

    Every rank uploads its part of each checkpoint and rank 0 commits it
    there (``killsafe.distributed.objects``), so nothing is copied; the
    run's files still go up after each checkpoint and at the end, and come
    down at the start into a run directory that has none (fresh nodes).
    """

    def __init__(self, store: CheckpointStore, directory: Path, *, grace: float) -> None:
        super().__init__(store, store, directory, grace=grace)

    def sync(self, *, restore: bool) -> CheckpointInfo | None:
        """Bring the run's files down when the run directory has none; resuming reads the
        checkpoints from the mirror itself."""
        if restore and not (self.directory / RUN_FILE).exists() and self.remote.list():
            download_run_files(self._files, self.directory, _RESTORED_FILES)
        return None

    def start_over(self, *, clear: bool) -> None:
        """Nothing here: the mirror is the run's store, refused or cleared as any."""

    def _upload(self, info: CheckpointInfo) -> None:
        with self._cond:  # committed there already: only the run's files go up
            self._uploaded.append(info)
            self._failed = None


class _Superseded(Exception):
    """An upload left at the end of a session: a newer checkpoint goes up instead."""


def _worth_uploading(queue: deque[CheckpointInfo]) -> list[CheckpointInfo]:
    """Every named checkpoint queued, and the newest unnamed one: older ones are superseded."""
    named = [info for info in queue if info.name is not None]
    unnamed = [info for info in queue if info.name is None]
    return [*named, *unnamed[-1:]]
