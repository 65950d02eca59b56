"""The FastAPI application: the JSON API and the dashboard page of one run directory.

The app talks to the run only through the run directory's files
(docs/architecture.md): it reads ``status.json``, ``events.jsonl``,
``history.jsonl``, ``report.json`` and the checkpoints' manifests, and asks the
live run for a save or a stop by dropping a request file into ``control/``.
Nothing here ever waits on the training loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.requests import Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from killsafe.errors import CheckpointNotFound, InvalidName, KillsafeError, StoreLocked
from killsafe.rundir import (
    ControlRequest,
    RunReader,
    is_attached,
    pending_requests,
    read_json,
    submit_request,
)
from killsafe.server.events import HEARTBEAT_SECONDS, POLL_SECONDS, event_stream
from killsafe.server.guard import MAX_BODY_BYTES, RequestGuard
from killsafe.server.limits import ServeLimits
from killsafe.server.models import (
    AcceptedOut,
    CheckpointListOut,
    CheckpointOut,
    DeletedOut,
    ErrorOut,
    HistoryOut,
    SaveIn,
    StatusOut,
    StopIn,
)

log = logging.getLogger("killsafe.server")

STATIC_DIR = Path(__file__).parent / "static"
SUBMIT_LOCK = ".submit.lock"
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429)
}
RATE_WINDOW = 60.0


def check_name(name: str) -> str:
    """The name the store will use for ``name``, or ``InvalidName`` (answered with 400).

    The store's own rule (``store.sanitize_name``), checked here so that a bad
    name fails the request at once instead of the save at the run's next step.
    """
    from killsafe.store import sanitize_name

    clean: str = sanitize_name(name)
    return clean


class RunDirectory:
    """Read access to a run directory and the control requests the server sends it.

    With ``mirror`` (a mirror's URL whose run files were copied into
    ``run_dir``) the checkpoints are listed at that URL and nothing is
    written: no run is attached, saves, stops and deletions answer 409.
    """

    def __init__(
        self, run_dir: Path, limits: ServeLimits | None = None, *, mirror: str | None = None
    ):
        self.path = Path(run_dir)
        self.mirror = mirror
        self.reader = RunReader(self.path, open_catalog=_open_store, checkpoints_at=mirror)
        self.layout = self.reader.layout
        self.limits = limits if limits is not None else ServeLimits()
        self._submit_lock = threading.Lock()
        self._save_times: deque[float] = deque()  # save requests that reached control/

    def status(self) -> dict[str, Any]:
        try:
            status = self.reader.status() or {}
        except KillsafeError as exc:
            log.warning("ignoring unreadable status: %s", exc)
            status = {}
        return {
            **status,
            "attached": self.mirror is None and is_attached(status),
            "directory": self.mirror or str(self.path),
        }

    def attached(self) -> bool:
        return bool(self.status()["attached"])

    def submit(
        self,
        action: str,
        *,
        session: str | None,
        name: str | None = None,
        note: str | None = None,
    ) -> AcceptedOut:
        """Drop a request for the live session ``session`` into ``control/``.

        While one of the same action and session is pending, answer with its id
        and the name it will save under instead (a flood of clicks makes one
        request); a save asking for another name than the pending one is refused
        (409). A save that would pass the ``limits`` is refused (429).
        Serialized by a thread lock and, across processes (the run's own server
        and ``killsafe serve``), by ``flock`` on ``control/.submit.lock``.
        """
        with self._submit_lock, _flocked(self.layout.control / SUBMIT_LOCK):
            for _, pending in pending_requests(self.path):
                if pending.action == action and pending.session == session:
                    return _coalesced(pending, name)
            if action == "save":
                self._check_limits(name)
            request = ControlRequest(action, name=name, note=note, session=session)
            submit_request(self.path, request)
            if action == "save":
                self._save_times.append(time.monotonic())
            return AcceptedOut(request_id=request.id, action=action, coalesced=False, name=name)

    def _check_limits(self, name: str | None) -> None:
        per_minute = self.limits.saves_per_minute
        now = time.monotonic()
        while self._save_times and now - self._save_times[0] >= RATE_WINDOW:
            self._save_times.popleft()
        if per_minute is not None and len(self._save_times) >= per_minute:
            wait = int(RATE_WINDOW - (now - self._save_times[0])) + 1
            raise _TooMany(
                f"at most {per_minute} save requests a minute reach the run "
                f"(ServeLimits.saves_per_minute, --saves-per-minute); retry in {wait} s",
                retry_after=wait,
            )
        kept = self.limits.named_saves_kept
        if name is None or kept is None:
            return
        named = self._request_named_count()
        if named >= kept:
            raise _TooMany(
                f"{named} checkpoints named by save requests exist, the limit is {kept} "
                "(ServeLimits.named_saves_kept, --named-saves-kept); save without a name, "
                "or delete named ones once the run has ended",
                retry_after=None,
            )

    def _request_named_count(self) -> int:
        return sum(
            1
            for info in self.reader.checkpoints()
            if info.name is not None and (info.metadata or {}).get("request_id")
        )

    def store(self) -> Any:
        """The run's checkpoint store, with the run's best metric when it names one."""
        return self.reader.catalog()

    def checkpoints(self) -> list[CheckpointOut]:
        if not self.reader.has_checkpoints():
            return []
        store = self.store()
        latest, best = _marked(store)
        return [_checkpoint_out(info, latest, best) for info in store.list()]

    def delete(self, checkpoint_id: str, *, force: bool) -> None:
        if self.mirror is not None:
            raise _Conflict(
                f"{self.mirror} is served read-only; delete from the mirror with "
                f"killsafe prune {self.mirror} --delete {checkpoint_id}"
            )
        if not self.reader.has_checkpoints():
            raise CheckpointNotFound(f"no checkpoint {checkpoint_id!r} in {self.path}")
        store = self.store()
        matches = [info for info in store.list() if Path(info.path).name == checkpoint_id]
        if not matches:
            raise CheckpointNotFound(
                f"no checkpoint {checkpoint_id!r} in {self.reader.checkpoints_where()}; "
                "GET /api/checkpoints lists their ids"
            )
        latest, best = _marked(store)
        if not force and checkpoint_id in (latest, best):
            role = "latest" if checkpoint_id == latest else "best"
            raise _Conflict(
                f"checkpoint {checkpoint_id!r} is the {role} one; add ?force=true to delete it"
            )
        try:
            store.delete(matches[0].path, force=True)
        except StoreLocked as exc:
            raise _Conflict(
                f"a live run writes to {self.reader.checkpoints_where()} and owns its checkpoints; "
                "delete this one once the run has ended"
            ) from exc
        finally:
            close = getattr(store, "close", None)
            if close is not None:
                close()

    def history(self, limit: int, cursor: str | None = None) -> HistoryOut:
        """The last ``limit`` records, or with the ``cursor`` of an earlier answer only
        the records appended since (``reset`` false): a page that polls parses a few
        new lines, not the whole file, however long the run."""
        page = self.reader.history_since(cursor)
        if page.reset or len(page.records) > limit:
            return HistoryOut(
                records=page.records[-limit:] if limit else [],
                total=page.total,
                cursor=page.cursor,
                reset=True,
            )
        return HistoryOut(records=page.records, total=page.total, cursor=page.cursor, reset=False)

    def report(self) -> dict[str, Any]:
        # A mirror's saved report names the paths of the machine that wrote it.
        saved = read_json(self.layout.report_json) if self.mirror is None else None
        if isinstance(saved, dict):
            return saved
        from killsafe.report import build_report

        try:
            report: dict[str, Any] = build_report(self.path, checkpoints_at=self.mirror)
        except KillsafeError as exc:  # nothing of a run here yet
            raise CheckpointNotFound(
                f"no report for {self.path} yet: {_one_line(str(exc))}"
            ) from exc
        return report


class RecentAnswers:
    """Encoded answers reused for ``ttl`` seconds; one request builds, the others wait
    for it and reuse it, so clients polling in a loop cost one build per ``ttl``."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._answers: dict[Hashable, tuple[float, bytes]] = {}

    def get(self, key: Hashable, build: Callable[[], bytes]) -> bytes:
        if self.ttl <= 0:
            return build()
        with self._lock:
            kept = self._answers.get(key)
            if kept is not None and time.monotonic() - kept[0] < self.ttl:
                return kept[1]
            answer = build()  # an error is raised, never kept
            self._answers[key] = (time.monotonic(), answer)
            return answer


class _Conflict(KillsafeError):
    """The request contradicts the run's state (answered with 409)."""


class _TooMany(KillsafeError):
    """A save request over a ``ServeLimits`` cap (answered with 429)."""

    def __init__(self, message: str, *, retry_after: int | None):
        super().__init__(message)
        self.retry_after = retry_after


def _coalesced(pending: ControlRequest, name: str | None) -> AcceptedOut:
    """The answer for a request that joins ``pending``: the name it will save under."""
    if name is not None and name != pending.name:
        asked = f"named {pending.name!r}" if pending.name else "without a name"
        raise _Conflict(
            f"a save request {asked} is pending (request {pending.id}); ask for {name!r} "
            "again once it is answered on /api/events"
        )
    return AcceptedOut(
        request_id=pending.id, action=pending.action, coalesced=True, name=pending.name
    )


def create_app(
    run_dir: str | Path,
    *,
    token: str | None = None,
    stopping: threading.Event | None = None,
    poll: float = POLL_SECONDS,
    heartbeat: float = HEARTBEAT_SECONDS,
    max_body: int = MAX_BODY_BYTES,
    limits: ServeLimits | None = None,
    reuse_for: float = 0.0,
    mirror: str | None = None,
) -> Any:
    """Build the ASGI app serving ``run_dir``: the API under ``/api``, the page at ``/``.

    ``token``, when given, is required on every API request. ``stopping`` ends
    the event streams (set it before shutting the server down). ``limits``
    caps what save requests can create (default ``ServeLimits()``).
    ``reuse_for``: seconds a whole-history or report answer is reused (the
    two answers that read whole files), so that clients polling in a loop cost
    one build per period; 0 builds every answer. ``mirror``: serve read-only
    the run mirrored at this URL, whose run files were copied into ``run_dir``.
    """
    run = RunDirectory(Path(run_dir), limits, mirror=mirror)
    stopping = stopping if stopping is not None else threading.Event()
    api = FastAPI(
        title="killsafe",
        summary="Watch a run, save a checkpoint on demand, stop it gracefully.",
        version=_version(),
        responses=_ERRORS,
        # Swagger UI and ReDoc load their scripts from a CDN; the page needs nothing
        # from the internet, so only the OpenAPI document itself is served.
        docs_url=None,
        redoc_url=None,
    )
    api.state.run = run
    api.state.stopping = stopping
    _add_error_handlers(api)
    _add_routes(api, run, stopping, RecentAnswers(reuse_for), poll=poll, heartbeat=heartbeat)
    api.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    guarded: Any = RequestGuard(api, token=token, max_body=max_body)
    guarded.fastapi = api
    return guarded


def _add_routes(
    api: FastAPI,
    run: RunDirectory,
    stopping: threading.Event,
    recent: RecentAnswers,
    *,
    poll: float,
    heartbeat: float,
) -> None:
    @api.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    @api.get("/api/status", response_model=StatusOut, tags=["run"])
    def get_status() -> dict[str, Any]:
        """The live run's progress, ETA, metrics and resources; ``attached`` says
        whether a live run reads control requests right now."""
        return run.status()

    @api.get("/api/checkpoints", response_model=CheckpointListOut, tags=["checkpoints"])
    def list_checkpoints() -> CheckpointListOut:
        """The committed checkpoints, oldest first, with their metadata."""
        return CheckpointListOut(checkpoints=run.checkpoints())

    @api.post("/api/checkpoints", status_code=202, response_model=AcceptedOut, tags=["checkpoints"])
    def request_save(body: SaveIn) -> AcceptedOut:
        """Ask the live run for a checkpoint at its next step boundary. The answer
        (``saved`` or ``save-failed`` with this ``request_id``) arrives on
        ``/api/events``. While a save request is pending, new ones are coalesced
        into it (``name``: the name it saves under; 409 when another name is
        asked for). 409 when no live run is attached; 429 over the limits."""
        name = check_name(body.name) if body.name is not None else None
        session = _require_attached(run)
        return run.submit("save", session=session, name=name, note=body.note or None)

    @api.delete("/api/checkpoints/{checkpoint_id}", response_model=DeletedOut, tags=["checkpoints"])
    def delete_checkpoint(
        checkpoint_id: str,
        force: bool = Query(False, description="also delete the latest or the best checkpoint"),
    ) -> DeletedOut:
        """Delete one checkpoint; the latest and the best only with ``?force=true`` (409)."""
        run.delete(checkpoint_id, force=force)
        return DeletedOut(deleted=checkpoint_id)

    @api.post("/api/stop", status_code=202, response_model=AcceptedOut, tags=["run"])
    def request_stop(body: StopIn | None = None) -> AcceptedOut:
        """Ask the live run to stop like on SIGTERM: it finishes the step, commits an
        emergency checkpoint and exits. 409 when no live run is attached."""
        session = _require_attached(run)
        return run.submit("stop", session=session, note=(body.reason if body else None) or None)

    @api.get("/api/history", response_model=HistoryOut, tags=["run"])
    def get_history(
        limit: int = Query(100_000, ge=0, le=1_000_000, description="the last N records"),
        cursor: str | None = Query(
            None,
            max_length=100,
            description="the cursor of an earlier answer: only the records logged since",
        ),
    ) -> Any:
        """The logged metrics, one record per log call. With ``cursor``, the records
        appended since that answer; ``reset`` true means start over with these records
        (the first call, a resumed run rewrote the file, or more than ``limit`` new).
        From the run's own server, an answer without ``cursor`` may be a second old."""
        if cursor is not None:
            return run.history(limit, cursor)
        body = recent.get(
            ("history", limit), lambda: run.history(limit, None).model_dump_json().encode()
        )
        return Response(body, media_type="application/json")

    @api.get("/api/report", response_model=dict[str, Any], tags=["run"])
    def get_report() -> Any:
        """The end-of-run report (``report.json``), or one built from the files so far
        (from the run's own server, up to a second old)."""
        body = recent.get("report", lambda: json.dumps(run.report()).encode())
        return Response(body, media_type="application/json")

    @api.get(
        "/api/events",
        tags=["run"],
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    def get_events() -> StreamingResponse:
        """Server-sent events: ``progress`` (the status, whenever it changes), and the
        run's events: ``save-requested``, ``saved``, ``save-failed``,
        ``stop-requested``, ``stopped``, ``finished``, ...; a comment every 15 s."""
        stream = event_stream(
            run.path, read_status=run.status, stopping=stopping, poll=poll, heartbeat=heartbeat
        )
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )


def _require_attached(run: RunDirectory) -> str | None:
    """The live session's id (``None`` from a run that does not say it); 409 without one."""
    if run.mirror is not None:
        raise _Conflict(f"{run.mirror} is a mirror, served read-only: no run to save or stop")
    status = run.status()
    if not status["attached"]:
        raise _Conflict(
            f"no live run is attached to {run.path}; start or resume the run to save or stop it"
        )
    session = status.get("session")
    return session if isinstance(session, str) else None


def _add_error_handlers(api: FastAPI) -> None:
    status_of: list[tuple[type[Exception], int]] = [
        (InvalidName, 400),
        (CheckpointNotFound, 404),
        (StoreLocked, 409),
        (_Conflict, 409),
        (_TooMany, 429),
        (KillsafeError, 409),
    ]

    async def killsafe_error(request: Request, exc: Exception) -> JSONResponse:
        code = next(code for cls, code in status_of if isinstance(exc, cls))
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse({"detail": _one_line(str(exc))}, status_code=code, headers=headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": _describe_validation(exc)}, status_code=422)

    api.add_exception_handler(KillsafeError, killsafe_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(HTTPException, _http_error)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": _one_line(str(exc.detail))}, status_code=exc.status_code)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "bad request: " + "; ".join(parts) + "; see /openapi.json for the expected shape"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _open_store(directory: Path, **options: Any) -> Any:
    from killsafe.store import CheckpointStore

    return CheckpointStore(directory, **options)


def _marked(store: Any) -> tuple[str | None, str | None]:
    """The ids of the latest and the best checkpoint (either may be ``None``)."""
    ids = []
    for method in ("latest", "best"):
        try:
            # verify=False: reading every checksum on each listing would cost a full read
            info = getattr(store, method)(verify=False)
        except KillsafeError:  # best() on a run without a best metric
            info = None
        ids.append(Path(info.path).name if info is not None else None)
    return ids[0], ids[1]


def _checkpoint_out(info: Any, latest: str | None, best: str | None) -> CheckpointOut:
    checkpoint_id = Path(info.path).name
    metadata = getattr(info, "metadata", None) or {}
    note = metadata.get("note") if isinstance(metadata, dict) else None
    return CheckpointOut(
        id=checkpoint_id,
        step=info.step,
        name=info.name,
        reason=info.reason,
        created=info.created,
        metrics=dict(info.metrics or {}),
        size=int(info.size),
        path=info.location,
        note=note if isinstance(note, str) else None,
        latest=checkpoint_id == latest,
        best=checkpoint_id == best,
    )


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder when missing)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _version() -> str:
    from killsafe import __version__

    return __version__
