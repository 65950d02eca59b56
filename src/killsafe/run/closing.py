"""Closing a run: why it ended, the teardown in its order, the summary line, the report."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from killsafe.progress import format_duration
from killsafe.run.best import BestTracker
from killsafe.run.boundary import StepBoundary
from killsafe.run.callbacks import Callbacks
from killsafe.run.config import RunConfig
from killsafe.run.control import ControlInbox
from killsafe.run.ending import Ending
from killsafe.run.ledger import Ledger
from killsafe.run.position import Position
from killsafe.run.services import Services
from killsafe.run.session import EventLog, SessionRecord
from killsafe.run.stops import Stops

if TYPE_CHECKING:
    from killsafe.store import CheckpointStore

__all__ = ["Closer", "release_accelerator_caches", "write_report"]

logger = logging.getLogger("killsafe")

_END_EVENTS = {"finished": "finished", "failed": "failed"}


class Closer:
    """Ends a session: the exit reason first, then the teardown, the records, the callbacks."""

    def __init__(
        self,
        *,
        config: RunConfig,
        position: Position,
        ending: Ending,
        stops: Stops,
        services: Services,
        store: CheckpointStore,
        session: SessionRecord,
        inbox: ControlInbox,
        ledger: Ledger,
        best: BestTracker,
        events: EventLog,
        callbacks: Callbacks,
        started_clock: float,
    ) -> None:
        self._config = config
        self._position = position
        self._ending = ending
        self._stops = stops
        self._services = services
        self._store = store
        self._session = session
        self._inbox = inbox
        self._ledger = ledger
        self._best = best
        self._events = events
        self._callbacks = callbacks
        self._started_clock = started_clock

    # -- why it ended ----------------------------------------------------------

    def exit_normally(self, boundary: StepBoundary) -> None:
        """The with-block ended without an exception: the last boundary, then the last save."""
        self._position.close_open_step()
        if self._ending.reason is None:
            boundary.end(exiting=True)
        if self._ledger.requested:
            self._ledger.commit_requested()
        self._ledger.collect(wait=True)
        if self._ending.reason not in ("finished", None):
            release_accelerator_caches()

    def exit_on_exception(self, exc: BaseException) -> None:
        """The with-block raised: no new checkpoint, but a save in flight may still commit."""
        try:  # a consistent snapshot already taken may still be committed
            self._ledger.collect(wait=True)
        except Exception as save_error:
            logger.error("the save in flight failed too: %s", save_error)
        step = self._position.step
        if isinstance(exc, KeyboardInterrupt):
            self._ending.reason = "keyboard:forced"
            logger.warning(
                "stopped at once by a second Ctrl+C at step %d; no checkpoint written", step
            )
        elif isinstance(exc, Exception):
            self._ending.reason = "error"
            self._ending.error = f"{type(exc).__name__}: {exc}"
            logger.error("run failed at step %d: %s", step, self._ending.error)
        else:
            self._ending.reason = "exit"

    # -- teardown --------------------------------------------------------------

    def close(self, exc: BaseException | None, *, finished_at_start: bool = False) -> None:
        """Stop watching, let the store finish, record the end, then tell the user.

        A run found finished at its start writes none of its records.
        """
        if finished_at_start:
            self._close_finished(exc)
            return
        self._services.stop_keyboard()
        self._stops.interrupts.restore()
        status = self._ending.status()
        try:
            self._store.close()  # waits for a save still being written
        except Exception as close_error:
            logger.error("closing the checkpoint store failed: %s", close_error)
        self._session.stop_heartbeat()
        try:
            self._record_end(status)
        finally:
            self._services.announce(self.summary_line())
            self._services.close_display()
            if self._config.report:
                write_report(self._config.directory)
            self._call_final(exc, status)
            self._services.close_server()

    def _close_finished(self, exc: BaseException | None) -> None:
        try:
            self._store.close()
        finally:
            history = self._services.history
            if history is not None:
                history.close()
            self._call_final(exc, "finished")

    def _record_end(self, status: str) -> None:
        step = self._position.step
        ending = self._ending
        resources = self._services.resources()
        self._session.write_end(status, step, ending.reason, ending.error, resources)
        self._session.write_status(status)
        with contextlib.suppress(OSError):  # a full disk must not hide the last event
            self._inbox.discard_unread(step)
        self._events.append(
            _END_EVENTS.get(status, "stopped"),
            step,
            reason=ending.reason,
            error=ending.error,
            request_id=self._inbox.first_stop_request,
        )

    def _call_final(self, exc: BaseException | None, status: str) -> None:
        if exc is None:
            self._callbacks.call("on_finish" if status == "finished" else "on_stop")
        elif isinstance(exc, Exception):
            self._callbacks.call("on_error", exc)

    def summary_line(self) -> str:
        """One line: how it ended, steps, time, best value, where to resume from."""
        position = self._position
        total = position.total
        status = self._ending.status()
        of_total = f" of {total}" if total is not None else ""
        parts = [
            f"{status} at step {position.step}{of_total} ({self._ending.reason})",
            f"{position.ran} steps this session, {position.step} in all",
            f"elapsed {format_duration(time.monotonic() - self._started_clock)}",
        ]
        spec = self._config.best
        if spec is not None and spec[0] in self._best.records:
            best = self._best.records[spec[0]]
            parts.append(f"best {spec[0]}={best['value']:.6g} at step {best['step']}")
        last = self._ledger.last_info
        if last is not None:
            parts.append(f"checkpoint {last.path} (step {last.step})")
        else:
            parts.append("no checkpoint")
        line = "killsafe: " + "; ".join(parts)
        if status != "finished" and last is not None:
            line += "; run again to resume"
        return line


def write_report(directory: Path) -> None:
    """``report.txt``/``.json`` now, ``report.png`` drawn by a detached child.

    A run's exit, a SIGTERM's included, waits for the text and JSON (a few
    milliseconds), not for matplotlib: the plot follows a moment later and
    survives this process. A failure is a warning, never a crash.
    """
    try:  # the report room is optional here
        report = importlib.import_module("killsafe.report")
    except ImportError:
        return
    try:
        report.write_report(directory, plot="detached")
    except Exception as exc:  # a report must never turn a good exit into a crash
        logger.warning("report for %s not written: %s", directory, exc)


def release_accelerator_caches() -> None:
    """Return cached accelerator memory (CUDA, MPS) to the driver, when torch is in use.

    Found through ``sys.modules``: a run that never imported torch pays nothing.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        mps = getattr(torch, "mps", None)
        backends_mps = getattr(torch.backends, "mps", None)
        if mps is not None and backends_mps is not None and backends_mps.is_available():
            mps.empty_cache()
    except Exception as exc:  # a driver hiccup must not spoil a graceful exit
        logger.debug("accelerator caches not released: %s", exc)
