"""The metrics log of a run: ``history.jsonl``, continued across resumes.

Every ``log`` call becomes one flat JSON line ``{"step", "time", **metrics}``
appended with a single ``write``. When a run resumes from the checkpoint at
step N, the lines logged after N by the interrupted session are dropped
(``truncate_after(N)``), so the history never holds a step twice and always
matches the state that was restored. A line torn by a crash is dropped too.

Optional mirrors: ``metrics.csv`` (``csv=True``), kept consistent with the
JSONL file, and TensorBoard event files under ``tensorboard/``
(``tensorboard=True``, needs the ``tensorboard`` package, not torch), continued
across resumes: a resumed session's event file starts with a purge marker at
its first step, so TensorBoard does not draw the steps that were dropped.
"""

from __future__ import annotations

import csv as csv_module
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from killsafe.errors import ConfigError
from killsafe.rundir import (
    CSV_FILE,
    HISTORY_FILE,
    append_line,
    is_history_record,
    read_history,
    write_bytes_atomic,
)

TENSORBOARD_DIR = "tensorboard"
RESERVED_KEYS = ("step", "time")

__all__ = [
    "CSV_FILE",
    "HISTORY_FILE",
    "History",
    "csv_columns",
    "csv_text",
    "read_history",
    "require_tensorboard",
    "write_csv",
]


def csv_columns(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """``step``, ``time``, then every other key in the order it was first seen."""
    columns = list(RESERVED_KEYS)
    seen = set(columns)
    for record in records:
        for key in record:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


def csv_text(records: list[dict[str, Any]]) -> str:
    """``records`` as CSV text; a metric missing from a record is an empty cell."""
    columns = csv_columns(records)
    buffer = io.StringIO()
    writer = csv_module.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow(_csv_row(record, columns))
    return buffer.getvalue()


def write_csv(records: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write ``records`` as CSV to ``path`` atomically (see ``csv_text``)."""
    path = Path(path)
    write_bytes_atomic(path, csv_text(records).encode())
    return path


class History:
    """Appends metrics to ``run_dir/history.jsonl`` and mirrors them where asked.

    Args:
        run_dir: the run directory (created if missing).
        csv: also keep ``run_dir/metrics.csv`` up to date as the run goes.
        tensorboard: also write TensorBoard event files to ``run_dir/tensorboard``;
            raises ``ConfigError`` when the ``tensorboard`` package is missing.
        clock: the wall clock for the ``time`` field (epoch seconds).

    One writer per run directory; not thread-safe (the run's loop thread calls it).

    Example::

        history = History("runs/exp1")
        history.append(1, {"loss": 0.9})
        history.truncate_after(0)     # resuming from step 0 drops step 1
        assert history.records() == []
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        csv: bool = False,
        tensorboard: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if tensorboard:
            require_tensorboard()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / HISTORY_FILE
        self.csv_path = self.run_dir / CSV_FILE if csv else None
        self.tensorboard = tensorboard
        self._clock = clock
        self._csv_columns: list[str] | None = None
        self._checked_tail = False
        self._writer: Any = None
        self._purge_step: int | None = None

    def append(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record ``metrics`` at ``step``; returns the record as written.

        Raises ``ConfigError`` when a metric is named ``step`` or ``time``.
        """
        for key in RESERVED_KEYS:
            if key in metrics:
                raise ConfigError(
                    f"metric name {key!r} is reserved in {self.path}; log it under another name"
                )
        record = {"step": int(step), "time": self._clock(), **metrics}
        try:
            line = json.dumps(record, default=_json_default) + "\n"
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot log to {self.path}: {exc}") from exc
        self._prepare_for_append()
        append_line(self.path, line)
        if self.csv_path is not None:
            self._append_csv(record)
        if self.tensorboard:
            self._write_tensorboard(record)
        return record

    def truncate_after(self, step: int) -> int:
        """Drop every record with a step larger than ``step`` and any torn line.

        Called once when a run resumes from the checkpoint at ``step``. The file
        is rewritten to a temporary file and renamed over the old one, so a
        crash leaves either the old or the new history. Returns how many
        records were dropped.
        """
        kept: list[str] = []
        dropped = 0
        for line in _read_lines(self.path):
            record = _parse(line)
            if record is None or record["step"] > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped or self.path.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.path, "".join(k + "\n" for k in kept).encode())
        self._checked_tail = True
        if self.csv_path is not None:
            self._rewrite_csv()
        self._purge_step = step + 1
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return dropped

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in the order written."""
        return read_history(self.run_dir)

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Export the history as CSV: ``step``, ``time``, then each metric in first-seen order."""
        return write_csv(self.records(), path)

    def flush(self) -> None:
        """Hand every logged step to the operating system (the TensorBoard mirror
        is written by a background thread). Run calls it before each checkpoint,
        so a killed process leaves the mirrors complete up to its last checkpoint.
        """
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any. Safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _prepare_for_append(self) -> None:
        # A crash mid-write can leave a last line without its newline; appending
        # after it would glue the next record onto it and lose both.
        if self._checked_tail:
            return
        self._checked_tail = True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not _ends_cleanly(self.path):
            complete = [line for line in _read_lines(self.path) if _parse(line) is not None]
            write_bytes_atomic(self.path, "".join(k + "\n" for k in complete).encode())

    def _append_csv(self, record: dict[str, Any]) -> None:
        assert self.csv_path is not None
        if self._csv_columns is None or not self.csv_path.exists():
            self._rewrite_csv()
            return
        if any(key not in self._csv_columns for key in record):
            # A new metric changes the header: rewrite the file with the new column.
            self._rewrite_csv()
            return
        buffer = io.StringIO()
        csv_module.writer(buffer, lineterminator="\n").writerow(_csv_row(record, self._csv_columns))
        with open(self.csv_path, "a", encoding="utf-8", newline="") as f:
            f.write(buffer.getvalue())

    def _rewrite_csv(self) -> None:
        assert self.csv_path is not None
        records = self.records()
        self._csv_columns = csv_columns(records)
        write_csv(records, self.csv_path)

    def _write_tensorboard(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = _TensorBoardWriter(self.run_dir / TENSORBOARD_DIR, self._purge_step)
        scalars = {}
        for key, value in record.items():
            number = None if key in RESERVED_KEYS else _as_number(value)
            if number is not None:
                scalars[key] = number
        self._writer.add_scalars(record["step"], scalars, record["time"])


class _TensorBoardWriter:
    """Scalars into a TensorBoard event file, with the ``tensorboard`` package alone.

    A resumed run starts its file with a ``SessionLog.START`` event at the first
    step it will write again: TensorBoard then drops the older events from that
    step on (the steps the interrupted session logged after its last checkpoint).
    """

    def __init__(self, log_dir: Path, purge_step: int | None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event = Event
        self._summary = Summary
        # Written by a background thread, flushed every 2 s and at close: a killed
        # run loses at most the last 2 s of the mirror (history.jsonl has them).
        self._file = EventFileWriter(str(log_dir), flush_secs=2)
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._file.add_event(Event(step=purge_step, wall_time=time.time(), session_log=start))

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float) -> None:
        if not scalars:
            return
        values = [self._summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        summary = self._summary(value=values)
        self._file.add_event(self._event(step=step, wall_time=wall_time, summary=summary))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def require_tensorboard() -> None:
    """Raise ``ConfigError`` with the pip line when the ``tensorboard`` package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tensorboard=True needs the tensorboard package, which is not installed; "
            "run: pip install tensorboard  (or pass tensorboard=False)"
        )


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(record, dict) and is_history_record(record):
        return record
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n") if line.strip()]


def _ends_cleanly(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True


def _csv_row(record: Mapping[str, Any], columns: list[str]) -> list[Any]:
    row = []
    for column in columns:
        value = record.get(column)
        if value is None:
            row.append("")
        elif isinstance(value, (dict, list)):
            row.append(json.dumps(value, default=_json_default))
        else:
            row.append(value)
    return row


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "item"):
        try:
            item = value.item()
        except (ValueError, RuntimeError):
            return None
        if isinstance(item, (int, float)):
            return float(item)
    return None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(
        f"metric value of type {type(value).__name__} cannot be logged; "
        "log numbers, strings or scalar tensors"
    )
