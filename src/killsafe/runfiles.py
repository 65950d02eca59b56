"""The files of a run directory that other processes read and write.

A live run writes ``run.json``, ``status.json`` and ``events.jsonl``; the
command line and the dashboard read them, and ask the run for a save or a stop
by dropping request files into ``control/``. Every whole-file write is atomic
(temporary file, fsync, rename), so a reader sees the old file or the new one,
never a torn one. See docs/architecture.md for the fields.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from killsafe.errors import CorruptCheckpoint

RUN_FILE = "run.json"
STATUS_FILE = "status.json"
EVENTS_FILE = "events.jsonl"
CONTROL_DIR = "control"
ACTIONS = ("save", "stop")
STATUS_INTERVAL = 2.0
"""Seconds between two rewrites of ``status.json`` by a live run."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically and durably."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    payload = json.dumps(data, indent=2, default=_json_default).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # The rename is the commit: readers see either the old or the new file.
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(path: Path) -> Any:
    """Read a JSON file written by this module; ``None`` when it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a line; a single ``write`` so lines never interleave."""
    line = json.dumps(record, default=_json_default) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of ``path``; a torn last line (a crash) is ignored."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_event(run_dir: Path, kind: str, step: int | None = None, **fields: Any) -> None:
    """Record an event (``saved``, ``stopped``, ...) in ``events.jsonl``."""
    append_jsonl(run_dir / EVENTS_FILE, {"time": time.time(), "kind": kind, "step": step, **fields})


@dataclass(frozen=True)
class ControlRequest:
    """A request from another process to a live run: save a checkpoint or stop.

    ``session`` is the id of the run's session that accepted it (``status.json``
    says which is live): a later session discards it instead of acting on it.
    """

    action: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    name: str | None = None
    note: str | None = None
    created: float = field(default_factory=time.time)
    session: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "name": self.name,
            "note": self.note,
            "created": self.created,
            "session": self.session,
        }


def submit_request(run_dir: Path, request: ControlRequest) -> Path:
    """Drop ``request`` into the run's ``control/`` folder for the run to act on."""
    if request.action not in ACTIONS:
        raise ValueError(f"unknown control action {request.action!r}; expected one of {ACTIONS}")
    control = Path(run_dir) / CONTROL_DIR
    control.mkdir(parents=True, exist_ok=True)
    path = control / f"{request.id}.json"
    write_json_atomic(path, request.to_json())
    return path


def pending_requests(run_dir: Path) -> Iterator[tuple[Path, ControlRequest]]:
    """The requests waiting in ``control/``, oldest first; malformed files are skipped."""
    control = Path(run_dir) / CONTROL_DIR
    try:
        entries = [e for e in os.scandir(control) if _is_request_file(e.name)]
    except FileNotFoundError:
        return
    found = []
    for entry in entries:
        request = _parse_request(Path(entry.path))
        if request is not None:
            found.append((request.created, Path(entry.path), request))
    for _, path, request in sorted(found, key=lambda item: item[0]):
        yield path, request


def _is_request_file(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".")


def _parse_request(path: Path) -> ControlRequest | None:
    try:
        data = json.loads(path.read_text())
        action = data["action"]
        if action not in ACTIONS:
            return None
        return ControlRequest(
            action=action,
            id=str(data.get("id") or path.stem),
            name=data.get("name"),
            note=data.get("note"),
            created=float(data.get("created") or 0.0),
            session=data.get("session") if isinstance(data.get("session"), str) else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def this_host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_attached(status: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether ``status`` (a parsed ``status.json``) belongs to a live, responsive run."""
    if not status or status.get("state") not in ("running", "stopping"):
        return False
    now = time.time() if now is None else now
    if now - float(status.get("updated") or 0.0) > 3 * STATUS_INTERVAL + 1.0:
        return False
    if status.get("host") == this_host():
        return pid_alive(int(status.get("pid") or 0))
    return True


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars in metrics
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
