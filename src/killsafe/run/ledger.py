"""The checkpointing ledger: what is saved, what is in flight, which requests it answers.

Every checkpoint a ``Run`` writes goes through ``Ledger.commit``. It never
writes a step twice (a save of the current step answers the requests that
arrive meanwhile), handles a save that is due while the previous one is
still being written (``if_busy``: wait, or skip and retry later), replaces a
checkpoint of an abandoned continuation, and records every outcome as events:
``saved`` (one per request answered), ``save-failed``, ``save-skipped``,
``save-waited``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from killsafe.errors import CheckpointExists, SaveFailed
from killsafe.run.ending import Ending
from killsafe.run.position import Position
from killsafe.run.session import EventLog
from killsafe.saver import PendingSave, skips_busy_save

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo
    from killsafe.store import CheckpointStore

__all__ = ["Ledger", "SaveHooks"]

logger = logging.getLogger("killsafe")

Request = tuple[str | None, str | None]  # (request id, checkpoint name); no id: run.save()


class SaveHooks:
    """What a save reads from the run and tells it; plain callables, set by the facade."""

    def __init__(
        self,
        *,
        tree: Callable[[], dict[str, Any]],
        metrics: Callable[[], dict[str, Any]],
        metadata: Callable[[], dict[str, Any]],
        before_write: Callable[[], None],
        snapshot_taken: Callable[[PendingSave | None], None],
        committed: Callable[[CheckpointInfo], None],
        saved: Callable[[CheckpointInfo], None],
    ) -> None:
        self.tree = tree  # the checkpoint tree of the current state
        self.metrics = metrics  # the metrics the checkpoint records
        self.metadata = metadata  # run id and session index
        self.before_write = before_write  # flush the history; hold the uploads
        # The loop goes on; uploads wait for the background write it gets, if any.
        self.snapshot_taken = snapshot_taken
        self.committed = committed  # shown on the progress display
        self.saved = saved  # the user's on_save callback


class Ledger:
    """Checkpoints the tracked state at the current step, and keeps the books."""

    def __init__(
        self,
        store: CheckpointStore,
        position: Position,
        events: EventLog,
        ending: Ending,
        hooks: SaveHooks,
        *,
        async_save: bool,
        if_busy: str,
    ) -> None:
        self._store = store
        self._position = position
        self._events = events
        self._ending = ending  # a run that is ending always waits for a busy save
        self._hooks = hooks
        self._async = async_save
        self._if_busy = if_busy
        self.pending: PendingSave | None = None
        self.last_info: CheckpointInfo | None = None
        self.last_save_step: int | None = None
        self.last_save_clock: float | None = None
        self.requests: list[Request] = []  # asked, not answered yet; read, never changed, outside
        self._notes: dict[str, str] = {}  # request id -> the note given with it
        # Requests answered by the background save in flight, not by a later one.
        self._inflight: list[Request] = []

    # -- requests ------------------------------------------------------------

    def ask(self, request_id: str | None, name: str | None, note: str | None = None) -> None:
        """A save was asked for (``run.save()`` or a control request)."""
        self.requests.append((request_id, name))
        if request_id is not None and note:
            self._notes[request_id] = note

    @property
    def requested(self) -> bool:
        """Whether a save was asked for and not answered yet."""
        return bool(self.requests)

    def requested_name(self) -> str | None:
        return next((name for _, name in self.requests if name), None)

    def requested_note(self) -> str | None:
        notes = self._notes
        return next((notes[rid] for rid, _ in self.requests if rid in notes), None)

    def resumed(self, info: CheckpointInfo) -> None:
        """The session starts from ``info``: it counts as saved at its step."""
        self.last_info = info
        self.last_save_step = int(info.step)

    # -- saving --------------------------------------------------------------

    def commit_requested(self) -> None:
        """Answer pending save requests outside a regular boundary save."""
        if (
            self.last_save_step == self._position.step
            and self.pending is None
            and self.last_info is not None
        ):
            # Nothing changed since the checkpoint at this step: answer with it.
            self._answer(self.last_info)
            return
        self.commit("request", self.requested_name(), self.requested_note())

    def commit(
        self, reason: str, name: str | None = None, note: str | None = None
    ) -> CheckpointInfo | None:
        """Checkpoint the tracked state at the current step, for ``reason``.

        With ``async_save`` the loop waits only for the snapshot, and
        ``collect`` finishes the bookkeeping once the write is committed. No
        duplicate at a step already saved (or being saved); pending requests
        are answered.
        """
        step = self._position.step
        if self.last_save_step == step and self.pending is not None:
            # The save of this step in flight answers the requests.
            self._inflight += self.requests
            self.requests = []
            return None
        if self.last_save_step == step and self.last_info is not None:
            self._answer(self.last_info)
            return self.last_info
        if self.pending is not None and not self._make_room(self.pending):
            return None
        self._hooks.before_write()
        writing: PendingSave | None = None
        try:
            result = self._save_replacing_abandoned(reason, name, note)
            writing = result if isinstance(result, PendingSave) else None
        except CheckpointExists as exc:
            self._report_failure(exc, step)
            if name is None or (reason == "request" and not self._ending.decided()):
                return None
            # The requested name is taken, but this save is due anyway (a stop,
            # the policy): keep the state under no name rather than lose it.
            return self.commit(reason)
        except (SaveFailed, OSError) as exc:
            self._report_failure(exc, step)
            raise
        finally:
            self._hooks.snapshot_taken(writing)
        self.last_save_step = step
        self.last_save_clock = time.monotonic()
        if isinstance(result, PendingSave):
            self.pending = result
            # The requests travel with this save; one that arrives while it is
            # written asks for a later checkpoint (and must not re-save this one).
            self._inflight, self.requests = self.requests, []
            return None
        return self._saved(result, reason)

    def collect(self, *, wait: bool = False) -> None:
        """Finish a background save that is done (or, with ``wait``, wait for it).

        Raises its failure here, in the loop, after recording it.
        """
        pending = self.pending
        if pending is None or (not wait and not pending.done()):
            return
        self.pending = None
        requests, self._inflight = self._inflight, []
        try:
            info = pending.wait()
        except Exception as exc:
            self._report_failure(exc, pending.step, requests)
            if self.last_save_step == pending.step:
                self.last_save_step = self.last_info.step if self.last_info else None
            raise
        self._saved(info, pending.reason or "", requests)

    def _make_room(self, busy: PendingSave) -> bool:
        """Before a new save: wait for the one in flight, or skip (``if_busy="skip"``)."""
        step = self._position.step
        if skips_busy_save(self._if_busy, busy, must_save=self._ending.decided()):
            logger.info(
                "skipping the save of step %d: step %d is still being written", step, busy.step
            )
            self._events.append("save-skipped", step, busy=busy.step)
            return False
        started = time.monotonic()
        was_done = busy.done()
        self.collect(wait=True)
        if not was_done:
            waited = time.monotonic() - started
            logger.info("waited %.2f s for the save of step %d to finish", waited, busy.step)
            self._events.append("save-waited", step, busy=busy.step, seconds=round(waited, 3))
        return True

    def _save_replacing_abandoned(
        self, reason: str, name: str | None, note: str | None
    ) -> CheckpointInfo | PendingSave:
        store = self._store
        step = self._position.step
        metadata = self._hooks.metadata()
        if note is not None:
            metadata["note"] = note  # given with a save request (the dashboard's note)
        request_id = next((rid for rid, n in self.requests if rid and n == name), None)
        if name is not None and request_id is not None:
            metadata["request_id"] = request_id  # the server caps request-named checkpoints

        def save() -> CheckpointInfo | PendingSave:
            options: dict[str, Any] = {
                "metrics": self._hooks.metrics(),
                "name": name,
                "reason": reason,
                "metadata": metadata,
            }
            if not self._async:
                return store.save(self._hooks.tree(), step, **options)
            pending = store.save_async(self._hooks.tree(), step, **options)
            assert pending is not None  # nothing is in flight: collected above
            return pending

        try:
            return save()
        except CheckpointExists as exc:
            if name is not None or step <= self._position.session_start or exc.path is None:
                raise
            existing = exc.path
        # Resumed from an older checkpoint: the one at this step belongs to the
        # abandoned continuation, and this session's state replaces it. (The
        # store raised this only because it verified: a damaged checkpoint is
        # never replaced, the new one goes beside it.)
        store.wait()
        old = store.delete(existing, force=True)
        logger.info("replacing %s from an abandoned continuation", old.path)
        return save()

    # -- answers -------------------------------------------------------------

    def _saved(
        self, info: CheckpointInfo, reason: str, requests: list[Request] | None = None
    ) -> CheckpointInfo:
        self.last_info = info
        self._hooks.committed(info)
        self._answer(info, new=True, requests=requests)
        logger.debug("checkpoint %s (%s)", info.path, reason)
        self._hooks.saved(info)
        return info

    def _answer(
        self, info: CheckpointInfo, *, new: bool = False, requests: list[Request] | None = None
    ) -> None:
        """A ``saved`` event for each request (``requests``, else the pending ones);
        one plain event for a new checkpoint."""
        if requests is None:
            requests, self.requests = self.requests, []
        answers: list[str | None] = [rid for rid, _ in requests if rid is not None]
        if new and not answers:
            answers = [None]
        for rid in answers:
            self._events.append(
                "saved",
                info.step,
                path=str(info.path),
                name=info.name,
                reason=info.reason,
                request_id=rid,
            )

    def _report_failure(
        self, exc: BaseException, step: int, requests: list[Request] | None = None
    ) -> None:
        """A ``save-failed`` event for each request (``requests``, else the pending ones)."""
        logger.error("checkpoint at step %d failed: %s", step, exc)
        if requests is None:
            requests, self.requests = self.requests, []
        for rid in [rid for rid, _ in requests] or [None]:
            self._events.append("save-failed", step, error=str(exc), request_id=rid)
