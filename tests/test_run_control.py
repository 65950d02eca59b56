"""Save and stop requests from the dashboard (``control/`` files) against a real Run:
one checkpoint per request, however long its background write takes, and a stop
that always ends with an emergency checkpoint, even when the name asked for is taken."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import killsafe
from killsafe import rundir

np = pytest.importorskip("numpy")
if not hasattr(killsafe, "Run"):
    pytest.skip("killsafe.Run has not landed in this tree yet", allow_module_level=True)

from killsafe.store import CheckpointStore  # noqa: E402


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def request(run_dir: Path, action: str, name: str | None = None, note: str | None = None) -> str:
    control = rundir.ControlRequest(action=action, name=name, note=note)
    rundir.submit_request(run_dir, control)
    return control.id


def wait_for_event(run_dir: Path, kind: str, request_id: str) -> bool:
    return any(e["kind"] == kind and e.get("request_id") == request_id for e in events(run_dir))


def test_a_named_request_makes_one_checkpoint_while_it_is_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    big = np.random.default_rng(0).standard_normal(4_000_000)  # 32 MB: written over many steps
    asked: list[str] = []
    with killsafe.Run(
        run_dir, total_steps=None, progress=False, keyboard=False, report=False
    ) as run:
        run.track(weights=big, counter={"n": 0})
        deadline = time.monotonic() + 60
        for _ in run.steps():
            run.state["counter"]["n"] += 1
            if not asked:
                asked.append(request(run_dir, "save", "looks-good", note="plateau"))
            elif wait_for_event(run_dir, "saved", asked[0]) or time.monotonic() > deadline:
                run.stop("done")
    kinds = [(e["kind"], e.get("request_id")) for e in events(run_dir)]
    assert ("saved", asked[0]) in kinds
    assert not [e for e in events(run_dir) if e["kind"] == "save-failed"], kinds
    saved = CheckpointStore(run_dir / "checkpoints").list()
    assert [i.name for i in saved].count("looks-good") == 1
    requested = [i for i in saved if i.reason == "request"]
    assert [i.name for i in requested] == ["looks-good"]  # no second save of the same request
    assert requested[0].metadata["note"] == "plateau"  # the note given with the request


def test_a_stop_with_a_taken_name_pending_still_saves_the_emergency_checkpoint(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    ids: dict[str, str] = {}
    with killsafe.Run(
        run_dir, total_steps=None, progress=False, keyboard=False, report=False
    ) as run:
        run.track(counter={"n": 0})
        deadline = time.monotonic() + 60
        for _ in run.steps():
            run.state["counter"]["n"] += 1
            time.sleep(0.001)
            if "first" not in ids:
                ids["first"] = request(run_dir, "save", "mine")
            elif "again" not in ids and wait_for_event(run_dir, "saved", ids["first"]):
                # The same name again and a stop, read at the same step boundary.
                ids["again"] = request(run_dir, "save", "mine")
                ids["stop"] = request(run_dir, "stop")
            assert time.monotonic() < deadline, "the requests were not answered"
    assert run.exit_reason == "request"
    failed = [e for e in events(run_dir) if e["kind"] == "save-failed"]
    assert [e.get("request_id") for e in failed] == [ids["again"]]
    assert "'mine' exists" in failed[0]["error"]
    latest = CheckpointStore(run_dir / "checkpoints").latest()
    assert latest is not None and latest.step == run.step and latest.name is None
    assert latest.reason == "request"  # the emergency checkpoint of the stop request
    stopped = events(run_dir)[-1]
    assert stopped["kind"] == "stopped" and stopped["step"] == run.step


def server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "server" in t.name or "uvicorn" in t.name]


@pytest.mark.parametrize("fails", [False, True])
def test_the_server_process_ends_with_the_run(tmp_path: Path, fails: bool) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    before = server_threads()
    children: list[Any] = []
    with (
        pytest.raises(RuntimeError) if fails else contextlib.nullcontext(),
        killsafe.Run(
            tmp_path / "run", total_steps=5, serve=True, progress=False, keyboard=False
        ) as run,
    ):
        run.track(counter={"n": 0})
        for step in run.steps():
            children.append(run._server)
            # Served by a child process during the run, not by a thread of this one.
            assert run._server.running and server_threads() == before
            if fails and step == 2:
                raise RuntimeError("the loop failed")
    assert children and not children[0].running
    assert children[0].process.returncode is not None
