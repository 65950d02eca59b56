"""The run directory's shared files: atomic JSON, events, control requests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from killsafe import runfiles
from killsafe.errors import CorruptCheckpoint


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    runfiles.write_json_atomic(target, {"step": 1})
    runfiles.write_json_atomic(target, {"step": 2, "path": tmp_path})
    assert runfiles.read_json(target) == {"step": 2, "path": str(tmp_path)}
    assert sorted(os.listdir(tmp_path)) == ["status.json"]


def test_read_json_missing_is_none_and_garbage_is_a_typed_error(tmp_path: Path) -> None:
    assert runfiles.read_json(tmp_path / "nope.json") is None
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match=r"run\.json"):
        runfiles.read_json(bad)


def test_read_jsonl_ignores_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    runfiles.append_event(tmp_path, "saved", step=3, path="x")
    with open(path, "a") as f:
        f.write('{"time": 1, "ki')
    records = runfiles.read_jsonl(path)
    assert [(r["kind"], r["step"], r["path"]) for r in records] == [("saved", 3, "x")]


def test_control_requests_round_trip_oldest_first(tmp_path: Path) -> None:
    first = runfiles.ControlRequest("save", name="good", created=1.0)
    second = runfiles.ControlRequest("stop", created=2.0)
    runfiles.submit_request(tmp_path, second)
    runfiles.submit_request(tmp_path, first)
    (tmp_path / "control" / "junk.json").write_text("[]")
    found = [request for _, request in runfiles.pending_requests(tmp_path)]
    assert found == [first, second]


def test_unknown_action_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown control action"):
        runfiles.submit_request(tmp_path, runfiles.ControlRequest("explode"))


def test_is_attached_needs_a_fresh_status_of_a_live_process() -> None:
    now = time.time()
    live = {"state": "running", "updated": now, "host": runfiles.this_host(), "pid": os.getpid()}
    assert runfiles.is_attached(live, now)
    assert not runfiles.is_attached({**live, "updated": now - 60}, now)
    assert not runfiles.is_attached({**live, "state": "finished"}, now)
    assert not runfiles.is_attached({**live, "pid": 2**22 + 12345}, now)
    assert not runfiles.is_attached(None, now)
