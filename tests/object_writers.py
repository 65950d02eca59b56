"""Writer processes for the object-store crash tests (run by a forkserver, killed at will)."""

from __future__ import annotations

import os
from typing import Any

from killsafe import CheckpointStore
from killsafe.errors import StoreLocked


def _report_to(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def save_forever(url: str, env: dict[str, str], path: str, size: int, ttl: float) -> None:
    """Resume from the newest checkpoint and save step after step, reporting each commit."""
    os.environ.update(env)
    report = _report_to(path)
    store = CheckpointStore(url, keep_last=3, lease_ttl=ttl, sweep_after=0.0)
    latest = store.latest()
    step = latest.step + 1 if latest else 0
    payload = os.urandom(size)
    os.write(report, b"ready\n")
    while True:
        store.save({"step": step, "blob": payload, "nested": {"n": [step] * 10}}, step)
        os.write(report, f"{step}\n".encode())
        step += 1


def race_for_the_lease(url: str, env: dict[str, str], start: Any, hold: Any, path: str) -> None:
    """Save once at the signal and hold the lease; report ``saved`` or ``locked``."""
    os.environ.update(env)
    report = _report_to(path)
    store = CheckpointStore(url, lease_ttl=30.0)
    start.wait()
    try:
        store.save({"pid": os.getpid()}, step=os.getpid())
    except StoreLocked:
        os.write(report, b"locked\n")
    else:
        os.write(report, b"saved\n")
    hold.wait(30)
    store.close()


def save_incrementally_forever(url: str, env: dict[str, str], path: str) -> None:
    """Resume and save incrementally (pruning to 2 each time), reporting each commit."""
    import numpy as np

    os.environ.update(env)
    report = _report_to(path)
    store = CheckpointStore(url, keep_last=2, lease_ttl=5.0, incremental=True)
    latest = store.latest()
    step = latest.step + 1 if latest else 0
    frozen = np.arange(3 << 20, dtype=np.int32)  # 12 MiB: two pieces, written once
    os.write(report, b"ready\n")
    while True:
        own = np.full(300_000, step, dtype=np.int64)  # 2.4 MiB: a new piece every save
        store.save({"step": step, "frozen": frozen, "own": own}, step)
        os.write(report, f"{step}\n".encode())
        step += 1
