"""``RunReader``: what a run directory says, for every process that is not the run.

The server, the command line and the report read a run directory through one
``RunReader``: it never writes, never locks, and works the same for a live
run in another process, a finished one and a killed one. Checkpoints are
listed through a catalog the caller hands in (the store's facade), because
the run directory's room sits below the store in the package's layering.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from killsafe.errors import ConfigError, KillsafeError
from killsafe.rundir.files import read_json, read_jsonl
from killsafe.rundir.layout import HISTORY_FILE, RunLayout
from killsafe.rundir.liveness import is_attached
from killsafe.rundir.tail import EventTail, HistoryPage, is_history_record, read_history_page

__all__ = ["BEST_MODES", "Catalog", "RunReader", "parse_best", "read_history"]

log = logging.getLogger("killsafe")

BEST_MODES = ("min", "max")


class Catalog(Protocol):
    """What ``RunReader`` needs of a checkpoint store (``CheckpointStore`` fits)."""

    def list(self) -> Sequence[Any]: ...


OpenCatalog = Callable[..., Catalog]
"""Called as ``open_catalog(directory, best=(metric, mode) | None)``."""


def parse_best(value: Any) -> tuple[str, str] | None:
    """``run.json``'s ``config.best`` as ``(metric, "min"|"max")``; ``None`` otherwise.

    A run writes ``[metric, mode]`` with a validated mode; anything else (no
    best metric, a hand-edited or foreign file) means the run names none.
    """
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    metric, mode = value
    if isinstance(metric, str) and metric and mode in BEST_MODES:
        return metric, mode
    return None


def read_history(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record of ``run_dir/history.jsonl`` (a reader: never writes)."""
    return [r for r in read_jsonl(Path(run_dir) / HISTORY_FILE) if is_history_record(r)]


class RunReader:
    """Read-only access to one run directory's files.

    ``open_catalog`` (``CheckpointStore`` from the rooms above the store) is
    what ``catalog()`` and ``checkpoints()`` list with. ``checkpoints_at``
    puts the checkpoints elsewhere than ``run_dir/checkpoints``: a mirror's
    URL, whose run files were downloaded into ``run_dir``. Without it, a run
    directory with no ``checkpoints`` of its own whose ``run.json`` names a
    mirror has its checkpoints there (a job whose nodes share no disk saves
    straight into its mirror). Safe to use from any thread or process next to
    a live run.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        open_catalog: OpenCatalog | None = None,
        checkpoints_at: str | None = None,
    ) -> None:
        self.path = Path(run_dir)
        self.layout = RunLayout(self.path)
        self._open_catalog = open_catalog
        self._checkpoints_at = checkpoints_at

    def record(self) -> dict[str, Any]:
        """``run.json`` (``{}`` when missing); ``CorruptCheckpoint`` when it is not JSON."""
        data = read_json(self.layout.run)
        return data if isinstance(data, dict) else {}

    def status(self) -> dict[str, Any] | None:
        """``status.json``, or ``None`` when missing; ``CorruptCheckpoint`` when torn."""
        data = read_json(self.layout.status)
        return data if isinstance(data, dict) else None

    def attached(self) -> bool:
        """Whether a live, responsive run writes this directory's status now."""
        try:
            return is_attached(self.status())
        except KillsafeError:
            return False

    def history(self) -> list[dict[str, Any]]:
        """The logged metrics, one record per ``log`` call, in file order."""
        return read_history(self.path)

    def history_since(self, cursor: str | None) -> HistoryPage:
        """The history records appended since ``cursor`` (see ``read_history_page``)."""
        return read_history_page(self.layout.history, cursor)

    def events(self) -> list[dict[str, Any]]:
        """Every complete event of ``events.jsonl``, oldest first."""
        return [e for e in read_jsonl(self.layout.events) if isinstance(e.get("kind"), str)]

    def event_tail(self, *, from_end: bool = True) -> EventTail:
        """A tail of ``events.jsonl`` whose ``read_new()`` returns the events since its last."""
        return EventTail(self.layout.events, from_end=from_end)

    def best(self) -> tuple[str, str] | None:
        """The run's ``best=(metric, mode)``, ``None`` without one; ``CorruptCheckpoint``
        when run.json is not JSON (a command that prunes must not guess)."""
        config = self.record().get("config")
        return parse_best(config.get("best")) if isinstance(config, dict) else None

    def has_checkpoints(self) -> bool:
        return self.checkpoints_where() is not None

    def checkpoints_where(self) -> str | Path | None:
        """Where the checkpoints are listed: ``checkpoints_at``, ``run_dir/checkpoints``,
        else the mirror ``run.json`` names; None when there is none of them."""
        if self._checkpoints_at is not None:
            return self._checkpoints_at
        if self.layout.checkpoints.is_dir():
            return self.layout.checkpoints
        return self.mirror()

    def mirror(self) -> str | None:
        """The mirror ``run.json`` names (``Run(mirror=...)``: a URL or a directory);
        None without one, or when run.json cannot be read (a warning)."""
        try:
            config = self.record().get("config")
        except (KillsafeError, OSError) as exc:
            log.warning("ignoring unreadable %s: %s", self.layout.run, exc)
            return None
        mirror = config.get("mirror") if isinstance(config, dict) else None
        return mirror if isinstance(mirror, str) and mirror else None

    def catalog(self) -> Any:
        """The run's checkpoint store, opened with the run's best metric when it has one
        (without, when run.json cannot be read: listing still works)."""
        if self._open_catalog is None:
            raise ConfigError(
                f"RunReader({self.path}) was made without open_catalog; "
                "pass open_catalog=CheckpointStore to list checkpoints"
            )
        try:
            best = self.best()
        except KillsafeError as exc:
            log.warning("ignoring unreadable %s: %s", self.layout.run, exc)
            best = None
        where = self.checkpoints_where() or self.layout.checkpoints
        if best is None:
            return self._open_catalog(where)
        return self._open_catalog(where, best=best)

    def checkpoints(self) -> list[Any]:
        """The committed checkpoints (``CheckpointInfo``), by step then time; ``[]`` for none."""
        if not self.has_checkpoints():
            return []
        return list(self.catalog().list())
