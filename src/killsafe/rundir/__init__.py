"""The run directory: its layout, its files, and the one way to read them.

A live run writes ``run.json``, ``status.json``, ``history.jsonl`` and
``events.jsonl``; the command line, the dashboard and the report read them
through ``RunReader`` and ask the run for a save or a stop by dropping request
files into ``control/``. Every whole-file write is atomic (temporary file,
fsync, rename), so a reader sees the old file or the new one, never a torn
one. This room imports nothing of the store, the saver, the run, the server
or the command line. See docs/architecture.md for the fields.
"""

from killsafe.rundir.control import ACTIONS, ControlRequest, pending_requests, submit_request
from killsafe.rundir.files import (
    append_event,
    append_jsonl,
    append_line,
    json_default,
    read_json,
    read_jsonl,
    write_bytes_atomic,
    write_json_atomic,
)
from killsafe.rundir.layout import (
    CHECKPOINTS_DIR,
    CONTROL_DIR,
    CSV_FILE,
    EVENTS_FILE,
    HISTORY_FILE,
    REPORT_JSON,
    REPORT_PNG,
    REPORT_TXT,
    RUN_FILE,
    RUN_MARKERS,
    STATUS_FILE,
    RunLayout,
)
from killsafe.rundir.liveness import STATUS_INTERVAL, is_attached, pid_alive, this_host
from killsafe.rundir.reader import BEST_MODES, Catalog, RunReader, parse_best, read_history
from killsafe.rundir.tail import EventTail, HistoryPage, is_history_record, read_history_page

__all__ = [
    "ACTIONS",
    "BEST_MODES",
    "CHECKPOINTS_DIR",
    "CONTROL_DIR",
    "CSV_FILE",
    "EVENTS_FILE",
    "HISTORY_FILE",
    "REPORT_JSON",
    "REPORT_PNG",
    "REPORT_TXT",
    "RUN_FILE",
    "RUN_MARKERS",
    "STATUS_FILE",
    "STATUS_INTERVAL",
    "Catalog",
    "ControlRequest",
    "EventTail",
    "HistoryPage",
    "RunLayout",
    "RunReader",
    "append_event",
    "append_jsonl",
    "append_line",
    "is_attached",
    "is_history_record",
    "json_default",
    "parse_best",
    "pending_requests",
    "pid_alive",
    "read_history",
    "read_history_page",
    "read_json",
    "read_jsonl",
    "submit_request",
    "this_host",
    "write_bytes_atomic",
    "write_json_atomic",
]
