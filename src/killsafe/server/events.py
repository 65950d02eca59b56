"""Server-sent events from a run directory: tail ``events.jsonl``, watch ``status.json``.

The stream is a polling loop over the run's files, so it works the same for a
run in this process and one in another process. It ends when the client goes
away or when the server shuts down (``stopping`` is set).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from killsafe.rundir import RunReader

POLL_SECONDS = 0.25
HEARTBEAT_SECONDS = 15.0


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
    tail = RunReader(run_dir).event_tail()
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
