"""Server-sent events from a run directory: tail ``events.jsonl``, watch ``status.json``.

The stream is a polling loop over the run's files, so it works the same for a
run in this process and one in another process. It ends when the client goes
away or when the server shuts down (``stopping`` is set).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from killsafe.rundir import EVENTS_FILE

POLL_SECONDS = 0.25
HEARTBEAT_SECONDS = 15.0


class EventTail:
    """Read the complete lines appended to ``events.jsonl`` since the last call."""

    def __init__(self, path: Path, *, from_end: bool = True):
        self.path = path
        self.offset = _size(path) if from_end else 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        size = _size(self.path)
        if size < self.offset:  # the file was replaced or truncated: start over
            self.offset, self._partial = 0, b""
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for its end
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("kind"), str):
                records.append(record)
        return records


def format_event(kind: str, data: Any) -> str:
    """One server-sent event; ``data`` as compact JSON on a single line."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


async def event_stream(
    run_dir: Path,
    *,
    read_status: Callable[[], dict[str, Any]],
    stopping: threading.Event,
    poll: float = POLL_SECONDS,
    heartbeat: float = HEARTBEAT_SECONDS,
) -> AsyncIterator[str]:
    """Yield ``progress`` (whenever status.json changes) and every event the run appends.

    The first message is a ``progress`` event with the current status, so a
    client never waits for the run's next status write to draw the page.
    """
    tail = EventTail(run_dir / EVENTS_FILE)
    status = read_status()
    last_updated = status.get("updated")
    last_attached = status.get("attached")
    yield "retry: 2000\n\n"
    yield format_event("progress", status)
    last_sent = time.monotonic()
    while not stopping.is_set():
        await asyncio.sleep(poll)
        # The status first: a run rewrites it before appending its last event.
        status = read_status()
        if status.get("updated") != last_updated or status.get("attached") != last_attached:
            last_updated, last_attached = status.get("updated"), status.get("attached")
            yield format_event("progress", status)
            last_sent = time.monotonic()
        for record in tail.read_new():
            yield format_event(record["kind"], record)
            last_sent = time.monotonic()
        if time.monotonic() - last_sent >= heartbeat:
            yield ": heartbeat\n\n"
            last_sent = time.monotonic()
    # A run closes its server right after its last words ("stopped", "finished"):
    # send what it wrote since the last poll before the stream ends.
    status = read_status()
    if status.get("updated") != last_updated:
        yield format_event("progress", status)
    for record in tail.read_new():
        yield format_event(record["kind"], record)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
