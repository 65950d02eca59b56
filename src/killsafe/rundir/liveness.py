"""Whether a run directory has a live run: pid checks and ``status.json``'s age."""

from __future__ import annotations

import time
from typing import Any

from killsafe.host import pid_alive, this_host

__all__ = ["STATUS_INTERVAL", "is_attached", "pid_alive", "this_host"]

STATUS_INTERVAL = 2.0
"""Seconds between two rewrites of ``status.json`` by a live run."""


def is_attached(status: dict[str, Any] | None, now: float | None = None) -> bool:
    """Whether ``status`` (a parsed ``status.json``) belongs to a live, responsive run.

    Running or stopping, rewritten within three status intervals, and on this
    host with a live pid (another host's pid cannot be checked from here).
    """
    if not status or status.get("state") not in ("running", "stopping"):
        return False
    now = time.time() if now is None else now
    if now - float(status.get("updated") or 0.0) > 3 * STATUS_INTERVAL + 1.0:
        return False
    if status.get("host") == this_host():
        return pid_alive(int(status.get("pid") or 0))
    return True
