"""The run directory's room: atomic files, events, control requests, liveness, RunReader."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from killsafe import CheckpointStore, rundir
from killsafe.errors import ConfigError, CorruptCheckpoint


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    rundir.write_json_atomic(target, {"step": 1})
    rundir.write_json_atomic(target, {"step": 2, "path": tmp_path})
    assert rundir.read_json(target) == {"step": 2, "path": str(tmp_path)}
    assert sorted(os.listdir(tmp_path)) == ["status.json"]


def test_write_bytes_atomic_leaves_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "report.txt"
    rundir.write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        rundir.write_bytes_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["report.txt"]


def test_read_json_missing_is_none_and_garbage_is_a_typed_error(tmp_path: Path) -> None:
    assert rundir.read_json(tmp_path / "nope.json") is None
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match=r"run\.json"):
        rundir.read_json(bad)


def test_read_jsonl_ignores_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    rundir.append_event(tmp_path, "saved", step=3, path="x")
    with open(path, "a") as f:
        f.write('{"time": 1, "ki')
    records = rundir.read_jsonl(path)
    assert [(r["kind"], r["step"], r["path"]) for r in records] == [("saved", 3, "x")]


def test_control_requests_round_trip_oldest_first(tmp_path: Path) -> None:
    first = rundir.ControlRequest("save", name="good", created=1.0)
    second = rundir.ControlRequest("stop", created=2.0)
    rundir.submit_request(tmp_path, second)
    rundir.submit_request(tmp_path, first)
    (tmp_path / "control" / "junk.json").write_text("[]")
    found = [request for _, request in rundir.pending_requests(tmp_path)]
    assert found == [first, second]


def test_unknown_action_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown control action"):
        rundir.submit_request(tmp_path, rundir.ControlRequest("explode"))


def test_is_attached_needs_a_fresh_status_of_a_live_process() -> None:
    now = time.time()
    live = {"state": "running", "updated": now, "host": rundir.this_host(), "pid": os.getpid()}
    assert rundir.is_attached(live, now)
    assert not rundir.is_attached({**live, "updated": now - 60}, now)
    assert not rundir.is_attached({**live, "state": "finished"}, now)
    assert not rundir.is_attached({**live, "pid": 2**22 + 12345}, now)
    assert not rundir.is_attached(None, now)


@pytest.mark.parametrize("pid", [0, -1, -os.getpgrp()])
def test_pid_alive_never_reads_a_process_group(pid: int) -> None:
    assert not rundir.pid_alive(pid)


def test_pid_alive_sees_this_process() -> None:
    assert rundir.pid_alive(os.getpid())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["loss", "min"], ("loss", "min")),
        (["acc", "max"], ("acc", "max")),
        (("loss", "min"), ("loss", "min")),
        (None, None),
        ("loss", None),
        ({"metric": "loss", "mode": "min"}, None),
        (["loss", "lowest"], None),
        (["loss"], None),
        ([1, "min"], None),
        (["", "max"], None),
    ],
)
def test_parse_best_takes_only_what_a_run_writes(value: Any, expected: Any) -> None:
    assert rundir.parse_best(value) == expected


def test_layout_knows_a_run_directory(tmp_path: Path) -> None:
    layout = rundir.RunLayout(tmp_path)
    assert not layout.is_run_dir()
    layout.checkpoints.mkdir()
    assert layout.is_run_dir()
    assert layout.checkpoints == tmp_path / "checkpoints"
    assert layout.control == tmp_path / "control"


def _run_dir(tmp_path: Path, best: Any) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_json_atomic(run_dir / rundir.RUN_FILE, {"config": {"best": best}})
    now = time.time()
    status = {"state": "running", "updated": now, "host": rundir.this_host(), "pid": os.getpid()}
    rundir.write_json_atomic(run_dir / rundir.STATUS_FILE, status)
    with open(run_dir / rundir.HISTORY_FILE, "w") as f:
        f.write('{"step": 1, "loss": 0.5}\n{"step": true}\n{"nostep": 1}\n{"step": 2, "lo')
    rundir.append_event(run_dir, "started", 0)
    rundir.append_event(run_dir, "saved", 1, path="x")
    return run_dir


def test_run_reader_reads_every_file_of_a_run(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, ["loss", "min"])
    reader = rundir.RunReader(run_dir)
    assert reader.record() == {"config": {"best": ["loss", "min"]}}
    assert reader.status() is not None and reader.attached()
    assert reader.history() == [{"step": 1, "loss": 0.5}]
    assert [e["kind"] for e in reader.events()] == ["started", "saved"]
    assert reader.best() == ("loss", "min")
    assert reader.checkpoints() == []  # no checkpoints/ yet: nothing to open


def test_run_reader_of_an_empty_directory(tmp_path: Path) -> None:
    reader = rundir.RunReader(tmp_path)
    assert reader.record() == {}
    assert reader.status() is None and not reader.attached()
    assert reader.history() == [] and reader.events() == []
    assert reader.best() is None


def test_a_torn_run_json_is_an_error_for_best_and_no_best_for_the_catalog(
    tmp_path: Path,
) -> None:
    (tmp_path / rundir.RUN_FILE).write_text('{"config": {"be')
    (tmp_path / rundir.CHECKPOINTS_DIR).mkdir()
    reader = rundir.RunReader(tmp_path, open_catalog=CheckpointStore)
    with pytest.raises(CorruptCheckpoint, match=r"run\.json"):
        reader.best()
    assert reader.catalog().retention.best is None
    assert reader.checkpoints() == []


def test_run_reader_lists_checkpoints_through_the_catalog_it_is_given(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path, ["loss", "min"])
    with CheckpointStore(run_dir / rundir.CHECKPOINTS_DIR) as store:
        for step, loss in ((1, 0.9), (2, 0.1), (3, 0.5)):
            store.save({"n": step}, step=step, metrics={"loss": loss})
    reader = rundir.RunReader(run_dir, open_catalog=CheckpointStore)
    assert [info.step for info in reader.checkpoints()] == [1, 2, 3]
    best = reader.catalog().best()
    assert best is not None and best.step == 2  # the run's own best metric
    with pytest.raises(ConfigError, match="open_catalog"):
        rundir.RunReader(run_dir).checkpoints()


def test_event_tail_returns_each_complete_event_once(tmp_path: Path) -> None:
    rundir.append_event(tmp_path, "started", 0)  # before the tail: not returned
    tail = rundir.RunReader(tmp_path).event_tail()
    assert tail.read_new() == []
    rundir.append_event(tmp_path, "saved", 1)
    with open(tmp_path / rundir.EVENTS_FILE, "a") as f:
        f.write('{"time": 1, "kind": "stop')
    assert [e["kind"] for e in tail.read_new()] == ["saved"]
    with open(tmp_path / rundir.EVENTS_FILE, "a") as f:
        f.write('ped", "step": 2}\n')
    assert [e["kind"] for e in tail.read_new()] == ["stopped"]


def test_history_since_reads_only_what_was_appended(tmp_path: Path) -> None:
    reader = rundir.RunReader(tmp_path)
    path = tmp_path / rundir.HISTORY_FILE
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    first = reader.history_since(None)
    assert first.reset and [r["step"] for r in first.records] == [1, 2]
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 0.2}\n{"step": 4')
    later = reader.history_since(first.cursor)
    assert not later.reset and [r["step"] for r in later.records] == [3]
    assert later.total == 3
