"""``Run(serve=...)`` serves from a child process, never from the training process,
and the child ends with the run however the run ends (SIGKILL included); control
requests belong to the session that accepted them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import killsafe
from killsafe import rundir

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TIMEOUT = 30.0

TRAIN_SCRIPT = """
import json, sys, threading, time
from pathlib import Path
import killsafe

run_dir, serve, ending = sys.argv[1], sys.argv[2], sys.argv[3]
go = Path(run_dir).parent / "go"
with killsafe.Run(run_dir, serve=True if serve == "true" else int(serve), keyboard=False,
                  progress=False, report=False) as run:
    run.track(n={"steps": 0})
    print(json.dumps({
        "url": run._server.url,
        "child": run._server.pid,
        "web_modules": sorted(m for m in ("fastapi", "uvicorn", "starlette") if m in sys.modules),
        "threads": [t.name for t in threading.enumerate()],
    }), flush=True)
    for _ in run.steps():
        run.state["n"]["steps"] += 1
        time.sleep(0.01)
        if go.exists():
            if ending == "raise":
                raise RuntimeError("the training step failed")
            break
"""


def wait_for(predicate: Any, what: str) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its reaper counts as ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return fields[0] in ("Z", "X")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(url + "api/status", timeout=2.0)
    except httpx.TransportError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("ending", ["finish", "raise", "sigkill"])
def test_the_dashboard_runs_in_a_child_process_that_ends_with_the_run(
    tmp_path: Path, ending: str
) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), "true", ending],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        child, url = started["child"], started["url"]
        # The training process serves nothing itself: no web framework, no server thread.
        assert started["web_modules"] == []
        assert not [t for t in started["threads"] if "server" in t or "uvicorn" in t]
        assert child != proc.pid and parent_of(child) == proc.pid
        # port True: the printed address is the real one, and the child answers on it.
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
        status = wait_for(lambda: httpx.get(url + "api/status").json(), "the dashboard")
        wait_for(lambda: httpx.get(url + "api/status").json()["attached"], "an attached run")
        assert Path(status["directory"]).resolve() == run_dir.resolve()

        if ending == "sigkill":
            proc.send_signal(signal.SIGKILL)
            proc.wait(TIMEOUT)
        else:
            (tmp_path / "go").touch()
            _, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == (1 if ending == "raise" else 0), err
        wait_for(lambda: process_gone(child), "the dashboard process to end with the run")
        assert refuses_connections(url)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def events(run_dir: Path) -> list[dict[str, Any]]:
    return rundir.read_jsonl(run_dir / rundir.EVENTS_FILE)


def test_requests_of_an_earlier_session_do_not_act_on_the_next(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Accepted by a session that was already stopping, never read by it.
    stale_stop = rundir.ControlRequest("stop", session="an-earlier-session")
    stale_save = rundir.ControlRequest("save", name="stale", created=time.time() - 60)
    rundir.submit_request(run_dir, stale_stop)
    rundir.submit_request(run_dir, stale_save)
    with killsafe.Run(run_dir, total_steps=20, progress=False, keyboard=False, report=False) as run:
        run.track(n={"steps": 0})
        for _ in run.steps():
            run.state["n"]["steps"] += 1
    assert run.exit_reason == "finished" and run.step == 20
    discarded = {e["request_id"]: e for e in events(run_dir) if e["kind"] == "request-discarded"}
    assert set(discarded) == {stale_stop.id, stale_save.id}
    assert discarded[stale_stop.id]["action"] == "stop"
    assert "earlier session" in discarded[stale_stop.id]["reason"]
    assert not [e for e in events(run_dir) if e["kind"] == "stop-requested"]
    names = [i.name for i in killsafe.CheckpointStore(run_dir / "checkpoints").list()]
    assert "stale" not in names
    assert not list((run_dir / "control").glob("*.json"))


def test_a_request_left_unread_at_the_end_is_answered_not_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with killsafe.Run(run_dir, total_steps=3, progress=False, keyboard=False, report=False) as run:
        run.track(n={"steps": 0})
        for _ in run.steps():
            run.state["n"]["steps"] += 1
        # The loop is over, the run not yet closed: a request the server accepts now
        # (tagged, as the server tags it, with the live session) is never read.
        status = rundir.read_json(run_dir / rundir.STATUS_FILE)
        stop = rundir.ControlRequest("stop", session=status["session"])
        rundir.submit_request(run_dir, stop)
    kinds = [(e["kind"], e.get("request_id")) for e in events(run_dir)]
    assert ("request-discarded", stop.id) in kinds and ("stop-requested", stop.id) not in kinds
    [discarded] = [e for e in events(run_dir) if e["kind"] == "request-discarded"]
    assert "ended" in discarded["reason"]
    assert run.exit_reason == "finished"
    assert not list((run_dir / "control").glob("*.json"))

    # The next session starts clean and is not stopped by anything left behind.
    with killsafe.Run(run_dir, total_steps=6, progress=False, keyboard=False, report=False) as run:
        run.track(n={"steps": 0})
        for _ in run.steps():
            run.state["n"]["steps"] += 1
    assert run.exit_reason == "finished" and run.step == 6


def test_serve_limits_are_checked_when_the_run_is_made(tmp_path: Path) -> None:
    from killsafe.server import ServeLimits

    with pytest.raises(killsafe.ConfigError, match=r"serve_limits=30: pass killsafe\.server"):
        killsafe.Run(tmp_path / "run", serve=True, serve_limits=30)
    limits = ServeLimits(saves_per_minute=None)
    assert killsafe.Run(tmp_path / "run", serve=True, serve_limits=limits)._serve_limits is limits
