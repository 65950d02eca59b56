"""Whole files replaced atomically, and JSON lines appended and read.

Every whole-file write goes through ``write_bytes_atomic`` (temporary file,
fsync, rename), so a reader in another process sees the old file or the new
one, never a torn one. Lines are appended with one ``write`` each, so the
lines of two writers never interleave; a torn last line (a crash) is skipped
by the readers.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from killsafe.errors import CorruptCheckpoint
from killsafe.rundir.layout import EVENTS_FILE

__all__ = [
    "append_event",
    "append_jsonl",
    "append_line",
    "json_default",
    "read_json",
    "read_jsonl",
    "write_bytes_atomic",
    "write_json_atomic",
]


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Replace ``path`` with ``payload``, atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        # The rename is the commit: readers see either the old or the new file.
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically and durably."""
    write_bytes_atomic(path, json.dumps(data, indent=2, default=json_default).encode())


def read_json(path: Path) -> Any:
    """Read a JSON file written by this module; ``None`` when it does not exist.

    Raises ``CorruptCheckpoint`` (one line, naming the file) when it is not JSON.
    """
    try:
        text = Path(path).read_text()
    except (FileNotFoundError, NotADirectoryError):  # a file where a folder would be
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (ending in a newline) with a single ``write``: lines never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (see ``append_line``)."""
    append_line(path, json.dumps(record, default=json_default) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line of ``path``; a torn line (a crash) is skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_event(run_dir: Path, kind: str, step: int | None = None, **fields: Any) -> None:
    """Record an event (``saved``, ``stopped``, ...) in the run's ``events.jsonl``."""
    record = {"time": time.time(), "kind": kind, "step": step, **fields}
    append_jsonl(Path(run_dir) / EVENTS_FILE, record)


def json_default(value: Any) -> Any:
    """JSON for the values a run's files hold besides plain JSON: paths, sets, scalars."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    item = getattr(value, "item", None)
    if callable(item):  # numpy and torch scalars in metrics
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
