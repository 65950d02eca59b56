"""Control requests (``control/``): the save and stop requests other processes drop in."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from killsafe import rundir
from killsafe.run.session import EventLog

__all__ = ["CONTROL_POLL_SECONDS", "ControlInbox", "stop_reason"]

logger = logging.getLogger("killsafe")

CONTROL_POLL_SECONDS = 0.25


def stop_reason(note: str | None) -> str:
    """A stop request's exit reason: ``request``, or ``request:NOTE`` on one line."""
    words = " ".join(note.split()) if note else ""
    return f"request:{words}" if words else "request"


class ControlInbox:
    """Reads this session's requests once each; answers the rest with a ``request-discarded``.

    A request tagged with another session, or untagged and older than this
    session, was made for an earlier one and is discarded. ``save`` requests
    go to ``ask_save(request_id, name, note)``, ``stop`` requests to
    ``ask_stop`` with the reason ``request``, or ``request:REASON`` when the
    request gave one (``POST /api/stop {"reason": "enough"}`` stops with
    ``request:enough``), as a signal stops with ``signal:SIGTERM``.
    """

    def __init__(
        self,
        directory: Path,
        session_id: str,
        started_wall: float,
        events: EventLog,
        ask_save: Callable[[str, str | None, str | None], None],
        ask_stop: Callable[[str], None],
    ) -> None:
        self._directory = directory
        self._session_id = session_id
        self._started_wall = started_wall
        self._events = events
        self._ask_save = ask_save
        self._ask_stop = ask_stop
        self._seen: set[str] = set()
        self.stop_request_ids: list[str] = []
        self.next_poll = 0.0

    @property
    def first_stop_request(self) -> str | None:
        """The id of the first stop request acted on, if a request stopped the run."""
        return self.stop_request_ids[0] if self.stop_request_ids else None

    def poll_at(self, now: float, step: int) -> None:
        """Read the requests now; the next read is due ``CONTROL_POLL_SECONDS`` later."""
        self.next_poll = now + CONTROL_POLL_SECONDS
        self.poll(step)

    def poll(self, step: int) -> None:
        for path, request in rundir.pending_requests(self._directory):
            if request.id in self._seen:
                continue
            if not self._for_this_session(request):
                self._discard(path, request, step, "made for an earlier session")
                continue
            self._seen.add(request.id)
            with contextlib.suppress(OSError):
                path.unlink()
            if request.action == "save":
                self._ask_save(request.id, request.name, request.note)
                self._events.append("save-requested", step, request_id=request.id)
            elif request.action == "stop":
                self.stop_request_ids.append(request.id)
                self._ask_stop(stop_reason(request.note))

    def discard_unread(self, step: int) -> None:
        """At the end: requests still in ``control/`` are answered, never left for later."""
        for path, request in rundir.pending_requests(self._directory):
            if request.id not in self._seen:
                self._discard(path, request, step, "the run ended before acting on it")

    def _for_this_session(self, request: rundir.ControlRequest) -> bool:
        if request.session is not None:
            return request.session == self._session_id
        return request.created >= self._started_wall  # untagged: by its age

    def _discard(self, path: Path, request: rundir.ControlRequest, step: int, why: str) -> None:
        """Remove a request this session will not act on, with an event that says so."""
        with contextlib.suppress(OSError):
            path.unlink()
        self._events.append(
            "request-discarded",
            step,
            request_id=request.id,
            action=request.action,
            session=request.session,
            reason=why,
        )
        logger.info("%s request %s discarded: %s", request.action, request.id, why)
