"""Reading a run's JSON-lines files from where the last read stopped.

A client that polls (the dashboard's history, the event stream) reads only the
bytes appended since its last read, never the whole file again, however long
the run. A line is returned once it is complete; a torn last line waits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EventTail", "HistoryPage", "is_history_record", "read_history_page"]


def is_history_record(record: dict[str, Any]) -> bool:
    """A line of ``history.jsonl``: a JSON object with an integer ``step``."""
    step = record.get("step")
    return isinstance(step, int) and not isinstance(step, bool)


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


@dataclass(frozen=True)
class HistoryPage:
    """Records of history.jsonl from a cursor on; ``cursor`` continues after them."""

    records: list[dict[str, Any]]
    total: int
    cursor: str
    reset: bool


def read_history_page(path: Path, cursor: str | None) -> HistoryPage:
    """The complete records of ``path`` after ``cursor`` (all of them when it is
    ``None``, stale or from another file), reading only the bytes after it.

    A cursor is ``inode:offset:count``: the file it was made for, the end of the
    last complete line read, and the records up to there. A resumed run rewrites
    history.jsonl into a new file (a new inode), which makes old cursors stale.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return HistoryPage([], 0, "0:0:0", reset=cursor is None or cursor != "0:0:0")
    try:
        stat = os.fstat(fd)
        start, count = _cursor_position(fd, stat, cursor)
        reset = start == 0 and count == 0
        data = os.pread(fd, stat.st_size - start, start) if stat.st_size > start else b""
    finally:
        os.close(fd)
    end = data.rfind(b"\n") + 1  # a torn last line waits for its end
    records = []
    for line in data[:end].split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and is_history_record(record):
            records.append(record)
    total = count + len(records)
    return HistoryPage(records, total, f"{stat.st_ino}:{start + end}:{total}", reset=reset)


def _cursor_position(fd: int, stat: os.stat_result, cursor: str | None) -> tuple[int, int]:
    """(byte offset, records before it) of a cursor still valid for this file, else (0, 0)."""
    try:
        inode, offset, count = (int(part) for part in (cursor or "").split(":"))
    except ValueError:
        return 0, 0
    if inode != stat.st_ino or not 0 < offset <= stat.st_size or count < 0:
        return 0, 0
    if os.pread(fd, 1, offset - 1) != b"\n":  # not the end of a line of this file
        return 0, 0
    return offset, count


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
