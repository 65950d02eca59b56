"""The run directory's files: moved to ``killsafe.rundir``; these names are re-exported."""

# temporary: removed when run/ imports rundir

from killsafe.rundir import (
    ACTIONS,
    CONTROL_DIR,
    EVENTS_FILE,
    RUN_FILE,
    STATUS_FILE,
    STATUS_INTERVAL,
    ControlRequest,
    append_event,
    append_jsonl,
    is_attached,
    pending_requests,
    pid_alive,
    read_json,
    read_jsonl,
    submit_request,
    this_host,
    write_json_atomic,
)

__all__ = [
    "ACTIONS",
    "CONTROL_DIR",
    "EVENTS_FILE",
    "RUN_FILE",
    "STATUS_FILE",
    "STATUS_INTERVAL",
    "ControlRequest",
    "append_event",
    "append_jsonl",
    "is_attached",
    "pending_requests",
    "pid_alive",
    "read_json",
    "read_jsonl",
    "submit_request",
    "this_host",
    "write_json_atomic",
]
