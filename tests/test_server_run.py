"""End to end: a real ``killsafe.Run`` in a subprocess with ``serve=PORT``, steered
over HTTP on 127.0.0.1; then ``killsafe serve`` on the finished run directory."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import killsafe

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
if not hasattr(killsafe, "Run"):
    pytest.skip("killsafe.Run has not landed in this tree yet", allow_module_level=True)

from killsafe.server import ServeLimits  # noqa: E402
from killsafe.store import CheckpointStore  # noqa: E402

pytestmark = pytest.mark.slow

TIMEOUT = 30.0

TRAIN_SCRIPT = """
import sys, time
import killsafe

run_dir, port = sys.argv[1], int(sys.argv[2])
with killsafe.Run(run_dir, total_steps=1_000_000, serve=port, keyboard=False,
                   progress=False, report=False) as run:
    run.track(weights=[0.0] * 16)
    for step in run.steps():
        time.sleep(0.005)  # the training step
        weights = run.state["weights"]
        weights[step % 16] += 1.0
        if step % 10 == 0:
            run.log(loss=1.0 / (1 + step))
print("exit", run.exit_reason, run.step, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, what: str, proc: subprocess.Popen[str] | None = None) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended while waiting for {what}: {proc.communicate()}")
        try:
            value = predicate()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def training(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    run_dir = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        yield proc, url, run_dir
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()


def events_until(client: Any, done: Any, action: Any) -> list[tuple[str, dict[str, Any]]]:
    """Open the event stream, run ``action`` once it is open, read until ``done(seen)``."""
    seen: list[tuple[str, dict[str, Any]]] = []
    kind = None
    with client.stream("GET", "/api/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind is not None:
                seen.append((kind, json.loads(line.split(":", 1)[1])))
                if len(seen) == 1:
                    action()
                if done(seen):
                    return seen
    raise AssertionError(f"the stream ended early: {seen}")


def test_save_and_stop_a_live_run_over_http(
    training: tuple[subprocess.Popen[str], str, Path],
) -> None:
    proc, url, run_dir = training
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        status = wait_for(
            lambda: (s := client.get("/api/status").json())["attached"] and s, "a live run", proc
        )
        assert status["state"] == "running" and status["control"] is True

        # Save on demand, without stopping: answered on the event stream.
        answers: list[dict[str, Any]] = []

        def request_save() -> None:
            answer = client.post("/api/checkpoints", json={"name": "mid run"})
            assert answer.status_code == 202
            answers.append(answer.json())

        seen = events_until(
            client,
            lambda seen: any(
                k == "saved" and d.get("request_id") == answers[0]["request_id"] for k, d in seen
            ),
            request_save,
        )
        saved = next(d for k, d in seen if k == "saved")
        assert saved["name"] == "mid-run"  # sanitized like the store does
        kinds = [k for k, _ in seen]
        assert kinds.index("save-requested") < kinds.index("saved")
        listed = client.get("/api/checkpoints").json()["checkpoints"]
        [mine] = [c for c in listed if c["name"] == "mid-run"]
        assert mine["reason"] == "request" and Path(mine["path"]).is_dir()
        assert proc.poll() is None  # the run goes on

        # While the run owns the store, deleting waits for its end.
        refused = client.request("DELETE", f"/api/checkpoints/{mine['id']}", json={})
        assert refused.status_code == 409

        # Stop: the run finishes its step, commits an emergency checkpoint and exits.
        stop_ids: list[str] = []

        def request_stop() -> None:
            answer = client.post("/api/stop", json={})
            assert answer.status_code == 202
            stop_ids.append(answer.json()["request_id"])

        seen = events_until(client, lambda seen: seen[-1][0] == "stopped", request_stop)
        output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output
    stopped = seen[-1][1]
    assert any(k == "stop-requested" and d.get("request_id") == stop_ids[0] for k, d in seen)
    exit_line = next(line for line in output.splitlines() if line.startswith("exit "))
    _, reason, steps = exit_line.split()
    assert reason == "request"
    store = CheckpointStore(run_dir / "checkpoints")
    emergency = store.latest()
    assert emergency is not None and emergency.step == int(steps) == stopped["step"]
    assert emergency.reason == "request" and emergency.step > mine["step"]
    # The server thread ended with the run.
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "api/status", timeout=2.0)
    assert not list((run_dir / "control").glob("*.json"))

    # `killsafe serve` shows the finished run from another process.
    serve_and_inspect_finished_run(run_dir, mine["id"], emergency.path.name)


SERVE_SCRIPT = """
import argparse, sys
from killsafe.server import add_cli_arguments, run_cli
parser = argparse.ArgumentParser()
add_cli_arguments(parser)
sys.exit(run_cli(parser.parse_args(sys.argv[1:])))
"""


def serve_and_inspect_finished_run(run_dir: Path, named_id: str, latest_id: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(run_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=TIMEOUT) as client:
            status = wait_for(lambda: client.get("/api/status").json(), "killsafe serve", proc)
            assert status["attached"] is False and status["state"] == "stopped"
            assert client.post("/api/checkpoints", json={}).status_code == 409
            assert client.post("/api/stop", json={}).status_code == 409
            assert client.get("/api/history").json()["total"] > 0
            ids = [c["id"] for c in client.get("/api/checkpoints").json()["checkpoints"]]
            assert named_id in ids and ids[-1] == latest_id
            # No live run now: deleting works, the latest only with force.
            assert (
                client.request("DELETE", f"/api/checkpoints/{latest_id}", json={}).status_code
                == 409
            )
            deleted = client.request("DELETE", f"/api/checkpoints/{named_id}", json={})
            assert deleted.status_code == 200
            assert not (run_dir / "checkpoints" / named_id).exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output


def test_a_flood_of_save_requests_to_a_live_run_is_coalesced(
    training: tuple[subprocess.Popen[str], str, Path],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    proc, url, run_dir = training
    with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        wait_for(lambda: client.get("/api/status").json()["attached"], "a live run", proc)
        step_before = client.get("/api/status").json()["step"] or 0

        def save(_: int) -> dict[str, Any]:
            answer = client.post("/api/checkpoints", json={})
            # 429: more save requests reached the run this minute than ServeLimits allows.
            assert answer.status_code in (202, 429), answer.text
            return dict(answer.json()) if answer.status_code == 202 else {}

        with ThreadPoolExecutor(max_workers=8) as pool:
            everything = list(pool.map(save, range(1000)))
        answers = [a for a in everything if a]
        assert len(everything) == 1000  # every request answered
        assert len({a["request_id"] for a in answers}) <= ServeLimits().saves_per_minute
        ids = {a["request_id"] for a in answers}
        assert sum(not a["coalesced"] for a in answers) == len(ids)
        assert len(list((run_dir / "control").glob("*.json"))) <= 1  # at most one pending

        def events() -> list[dict[str, Any]]:
            lines = (run_dir / "events.jsonl").read_text().splitlines()
            return [json.loads(line) for line in lines]

        def all_answered() -> bool:
            return ids <= {e.get("request_id") for e in events() if e["kind"] == "saved"}

        wait_for(all_answered, "a saved event for every request", proc)
        later = wait_for(
            lambda: (s := client.get("/api/status").json())["step"] > step_before and s,
            "the run to go on",
            proc,
        )
        assert later["attached"] is True and proc.poll() is None
    saved = [e for e in events() if e["kind"] == "saved" and e.get("request_id") in ids]
    requested = [
        i for i in CheckpointStore(run_dir / "checkpoints").list() if i.reason == "request"
    ]
    # One checkpoint per request that was not coalesced, none for the coalesced clicks.
    assert len({e["path"] for e in saved}) <= len(ids) < 1000
    assert len(requested) <= len(ids)
    assert not [e for e in events() if e["kind"] == "save-failed"]
