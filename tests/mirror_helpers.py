"""Waiting for a run's uploads in the mirror tests."""

from __future__ import annotations

import time

import killsafe


def wait_for_upload(mirror: str, step: int) -> None:
    """Until the mirror's newest checkpoint is at least ``step``; fails after a minute."""
    deadline = time.monotonic() + 60
    while (latest := killsafe.CheckpointStore(mirror).latest()) is None or latest.step < step:
        assert time.monotonic() < deadline, f"step {step} did not reach {mirror}"
        time.sleep(0.01)
