"""Requests from other processes to a live run: save a checkpoint, or stop.

The command line and the dashboard drop one file ``control/<id>.json`` per
request (written atomically); the run reads them at step boundaries, deletes
each once acted on and answers in ``events.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from killsafe.rundir.files import write_json_atomic
from killsafe.rundir.layout import CONTROL_DIR

__all__ = ["ACTIONS", "ControlRequest", "pending_requests", "submit_request"]

ACTIONS = ("save", "stop")


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
