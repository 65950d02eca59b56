"""A run directory's files in a mirror: ``<mirror>/run/``, beside its checkpoints.

```
s3://bucket/exp/
  run/            run.json  status.json  history.jsonl  events.jsonl  metrics.csv  report.*
  step-000500/    one committed checkpoint (the mirror's CheckpointStore)
```

A run with ``mirror=`` uploads these files there; ``download_run_files``
brings them into a local directory (a fresh machine's run directory, or the
temporary copy ``mirrored_run_copy`` makes), where ``RunReader``, the report
and the dashboard read them as they read any run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from killsafe import storage
from killsafe.errors import ConfigError, KeyNotFound, KillsafeError
from killsafe.rundir.layout import (
    CSV_FILE,
    EVENTS_FILE,
    HISTORY_FILE,
    REPORT_JSON,
    REPORT_PNG,
    REPORT_TXT,
    RUN_FILE,
    STATUS_FILE,
)

__all__ = [
    "MIRRORED_FILES",
    "MIRROR_RUN_PREFIX",
    "download_run_files",
    "mirrored_run_copy",
    "read_run_file",
    "refreshed_run_copy",
]

log = logging.getLogger("killsafe")

MIRROR_RUN_PREFIX = "run/"
"""Where a mirror holds the run's files, beside its checkpoints."""

MIRRORED_FILES = (
    RUN_FILE,
    STATUS_FILE,
    HISTORY_FILE,
    EVENTS_FILE,
    CSV_FILE,
    REPORT_TXT,
    REPORT_JSON,
    REPORT_PNG,
)
"""The run's own files that travel with its checkpoints, under ``run/`` in the mirror."""


def read_run_file(backend: storage.Backend, name: str) -> bytes | None:
    """The bytes of the mirrored run file ``name``, or ``None`` when the mirror has none."""
    try:
        return storage.read_bytes(backend, MIRROR_RUN_PREFIX + name)
    except KeyNotFound:
        return None


def download_run_files(
    backend: storage.Backend,
    directory: str | os.PathLike[str],
    names: tuple[str, ...] = MIRRORED_FILES,
) -> list[str]:
    """Copy the mirrored run files ``names`` found in ``backend`` into ``directory``.

    Each file is written beside its target and renamed into place, so a reader
    never sees half of one. Returns the names copied (a missing one is skipped).
    """
    target = Path(directory)
    copied = []
    for name in names:
        data = read_run_file(backend, name)
        if data is None:
            continue
        partial = target / f".{name}.mirror-partial"
        partial.write_bytes(data)
        partial.replace(target / name)
        copied.append(name)
    return copied


@contextlib.contextmanager
def mirrored_run_copy(url: str) -> Iterator[Path]:
    """A temporary directory holding the run files mirrored at ``url``, removed on exit.

    The report and the dashboard read it as a run directory, with the
    checkpoints listed at ``url`` itself. Raises ``ConfigError`` when ``url``
    holds no ``run/run.json``: no run was mirrored there.
    """
    with tempfile.TemporaryDirectory(prefix="killsafe-mirror-") as directory:
        backend = storage.open(url)
        try:
            copied = download_run_files(backend, directory)
        finally:
            backend.close()
        if RUN_FILE not in copied:
            raise ConfigError(
                f"{url} holds no {MIRROR_RUN_PREFIX}{RUN_FILE}: not the mirror of a run; "
                "give the URL passed as Run(mirror=...) or --mirror"
            )
        yield Path(directory)


@contextlib.contextmanager
def refreshed_run_copy(url: str, directory: str | os.PathLike[str], every: float) -> Iterator[None]:
    """Download the run files mirrored at ``url`` into ``directory`` every ``every`` seconds,
    from a daemon thread, until the block ends (a live run's mirror keeps changing).

    A failed download is logged as a warning and tried again at the next turn.
    """
    stop = threading.Event()

    def refresh() -> None:
        backend = storage.open(url)
        try:
            while not stop.wait(every):
                try:
                    download_run_files(backend, directory)
                except (KillsafeError, OSError) as exc:
                    log.warning("re-reading the run files of %s failed: %s", url, exc)
        finally:
            backend.close()

    thread = threading.Thread(target=refresh, name="killsafe-mirror-refresh", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + 10)
