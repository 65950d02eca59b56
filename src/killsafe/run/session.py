"""A session's records: ``run.json``, ``status.json`` and its heartbeat, ``events.jsonl``."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from killsafe import rundir
from killsafe.errors import ConfigError

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo

__all__ = [
    "EventLog",
    "SessionRecord",
    "StatusFigures",
    "refuse_if_attached",
    "update_run_json",
]

logger = logging.getLogger("killsafe")


class EventLog:
    """Appends to the run's ``events.jsonl``: one line per thing that happened."""

    __slots__ = ("directory",)

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def append(self, kind: str, step: int | None, **fields: Any) -> None:
        rundir.append_event(self.directory, kind, step, **fields)


class StatusFigures(NamedTuple):
    """What the loop knows for ``status.json``: the progress figures, the step, the exit."""

    progress: dict[str, Any]
    step: int
    exit_reason: str | None


def refuse_if_attached(directory: Path) -> None:
    """Raise ``ConfigError`` when another live process runs in ``directory``."""
    try:
        status = rundir.read_json(directory / rundir.STATUS_FILE)
    except Exception:  # a torn status file belongs to no live run
        return
    if rundir.is_attached(status) and status.get("pid") != os.getpid():
        raise ConfigError(
            f"{directory} is in use by a live run (pid {status.get('pid')} on "
            f"{status.get('host')}); stop it first or use another directory"
        )


def update_run_json(directory: Path, update: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``update`` to ``run.json`` (read afresh: ``killsafe run`` appends to it too)."""
    path = directory / rundir.RUN_FILE
    try:
        data = rundir.read_json(path) or {}
    except Exception:
        data = {}
    update(data)
    rundir.write_json_atomic(path, data)


class SessionRecord:
    """This session in ``run.json`` and ``status.json``, kept fresh by a heartbeat.

    ``figures`` returns what ``status.json`` shows of the loop; ``live_state``
    says ``running`` or ``stopping`` for the heartbeat. The loop rewrites
    ``status.json`` between steps (``write_status_at``, when ``next_status``
    is due); during one long step the heartbeat thread does, so readers
    still see a live run.
    """

    def __init__(
        self,
        directory: Path,
        session_id: str,
        events: EventLog,
        figures: Callable[[], StatusFigures],
        live_state: Callable[[], str],
    ) -> None:
        self.directory = directory
        self.session_id = session_id
        self.run_id = ""
        self.index = -1
        self.events = events
        self._figures = figures
        self._live_state = live_state
        self._lock = threading.Lock()
        self._written = 0.0  # monotonic time of the last status.json
        self.next_status = 0.0
        self._stop = threading.Event()
        self.heartbeat: threading.Thread | None = None

    # -- run.json ------------------------------------------------------------

    def write_start(
        self, info: CheckpointInfo | None, step: int, started: float, config: Mapping[str, Any]
    ) -> None:
        """Open this session in ``run.json``; a ``started`` or ``resumed`` event."""
        session = {
            "pid": os.getpid(),
            "host": rundir.this_host(),
            "started": started,
            "ended": None,
            "start_step": step,
            "end_step": None,
            "resumed_from": str(info.path) if info is not None else None,
            "exit_reason": None,
            "status": "running",
            "id": self.session_id,
        }

        def update(data: dict[str, Any]) -> None:
            data.setdefault("run_id", uuid.uuid4().hex[:12])
            data["directory"] = str(self.directory.resolve())
            data["config"] = dict(config)
            data.setdefault("sessions", []).append(session)
            data["status"] = "running"
            data["exit_reason"] = None
            data.setdefault("restarts", [])
            self.run_id = data["run_id"]
            self.index = len(data["sessions"]) - 1

        self.update_run_json(update)
        if info is not None:
            self.events.append("resumed", step, path=str(info.path), reason=info.reason)
        else:
            self.events.append("started", step)

    def write_end(
        self,
        status: str,
        step: int,
        exit_reason: str | None,
        error: str | None,
        resources: Mapping[str, Any],
    ) -> None:
        """Close this session in ``run.json`` with how it ended."""

        def update(data: dict[str, Any]) -> None:
            sessions = data.setdefault("sessions", [])
            if 0 <= self.index < len(sessions):
                session = sessions[self.index]
                session.update(
                    ended=time.time(),
                    end_step=step,
                    exit_reason=exit_reason,
                    status=status,
                    peak_rss_bytes=resources.get("peak_rss_bytes"),
                    cpu_seconds=resources.get("cpu_seconds"),
                )
                if error is not None:
                    session["error"] = error
            data["status"] = status
            data["exit_reason"] = exit_reason
            if error is not None:
                data["error"] = error

        self.update_run_json(update)

    def update_run_json(self, update: Callable[[dict[str, Any]], None]) -> None:
        update_run_json(self.directory, update)

    def metadata(self) -> dict[str, Any]:
        """What each checkpoint records of this session: the run id and session index."""
        return {"run_id": self.run_id, "session": self.index}

    # -- status.json ---------------------------------------------------------

    def write_status_at(self, now: float, state: str) -> None:
        """The loop's own rewrite, due at ``next_status``; the next one is an interval later."""
        self.next_status = now + rundir.STATUS_INTERVAL
        self.write_status(state)

    def write_status(self, state: str, *, heartbeat: bool = False) -> None:
        with self._lock:
            if heartbeat and self._stop.is_set():
                return  # the run is closing: its final status must stay the last
            self._write_status_locked(state)

    def _write_status_locked(self, state: str) -> None:
        self._written = time.monotonic()
        figures = self._figures()
        snapshot = figures.progress
        snapshot.update(
            pid=os.getpid(),
            host=rundir.this_host(),
            updated=time.time(),
            state=state,
            step=figures.step,
            run_id=self.run_id,
            session=self.session_id,
            exit_reason=figures.exit_reason,
            control=state in ("running", "stopping"),
        )
        try:
            rundir.write_json_atomic(self.directory / rundir.STATUS_FILE, snapshot)
        except OSError as exc:
            logger.warning("status.json not written: %s", exc)

    # -- the heartbeat -------------------------------------------------------

    def start_heartbeat(self, started_clock: float) -> None:
        self.next_status = started_clock + rundir.STATUS_INTERVAL
        self.heartbeat = threading.Thread(target=self._beat, name="killsafe-status", daemon=True)
        self.heartbeat.start()

    def _beat(self) -> None:
        # Only when the loop missed its own rewrite: a fast loop writes every interval.
        while not self._stop.wait(rundir.STATUS_INTERVAL / 2):
            if time.monotonic() - self._written < 1.5 * rundir.STATUS_INTERVAL:
                continue
            try:
                self.write_status(self._live_state(), heartbeat=True)
            except Exception:  # a figure that fails to read must not end the beat
                logger.debug("status heartbeat failed", exc_info=True)

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self.heartbeat is not None:
            self.heartbeat.join(timeout=10.0)
            self.heartbeat = None
