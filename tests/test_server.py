"""The HTTP API over real sockets on 127.0.0.1, against a run directory whose
files are written the way a live run writes them (through ``rundir``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from killsafe import rundir  # noqa: E402
from killsafe.errors import ConfigError  # noqa: E402
from killsafe.history import History  # noqa: E402
from killsafe.server import ServeLimits, ServerHandle, is_loopback, serve_in_thread  # noqa: E402

TIMEOUT = 10.0


def write_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Write ``status.json`` as a live run in this process would."""
    status = {
        "pid": os.getpid(),
        "host": rundir.this_host(),
        "updated": time.time(),
        "state": "running",
        "step": 40,
        "total_steps": 100,
        "percent": 40.0,
        "phase": "training",
        "rate": 12.5,
        "elapsed": 3.2,
        "eta": 4.8,
        "metrics": {"loss": 0.25},
        "best": {"loss": {"value": 0.2, "step": 30}},
        "counters": {},
        "last_checkpoint": None,
        "resources": {"cpu_percent": 50.0, "rss_bytes": 1 << 20, "gpu_memory_bytes": None},
        "control": True,
        "session": "session-1",
        **fields,
    }
    rundir.write_json_atomic(run_dir / rundir.STATUS_FILE, status)
    return status


@pytest.fixture
def live_status(run_dir: Path) -> Iterator[None]:
    """Keep ``status.json`` fresh from a thread, as a live run does, however slow the test."""
    done = threading.Event()

    def refresh() -> None:
        while not done.wait(0.5):
            write_status(run_dir)

    write_status(run_dir)
    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    yield
    done.set()
    thread.join()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    return directory


@pytest.fixture
def server(run_dir: Path) -> Iterator[ServerHandle]:
    handle = serve_in_thread(run_dir)
    yield handle
    handle.close()
    assert not handle.running


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Any]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def control_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "control").glob("*.json"))


# ---- starting and stopping ----


def test_serves_on_a_free_loopback_port_and_close_joins_the_thread(run_dir: Path) -> None:
    handle = serve_in_thread(run_dir, token="not-in-the-repr")
    assert handle.port > 0
    assert handle.url == f"http://127.0.0.1:{handle.port}/"
    assert "not-in-the-repr" not in repr(handle)
    assert httpx.get(handle.url + "api/status", timeout=TIMEOUT).status_code == 401
    handle.close()
    assert not handle.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(handle.url + "api/status", timeout=TIMEOUT)


def test_a_non_loopback_host_without_a_token_is_refused_at_start(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="needs a token"):
        serve_in_thread(run_dir, host="0.0.0.0")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_a_port_in_use_is_a_one_line_config_error(run_dir: Path, server: ServerHandle) -> None:
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        serve_in_thread(run_dir, port=server.port)


# ---- status ----


def test_status_without_a_run_is_not_attached(client: Any, run_dir: Path) -> None:
    body = client.get("/api/status").json()
    assert body["attached"] is False
    assert body["state"] is None
    assert body["directory"] == str(run_dir)


def test_status_of_a_live_run(client: Any, run_dir: Path) -> None:
    written = write_status(run_dir)
    body = client.get("/api/status").json()
    assert body["attached"] is True
    for key in ("step", "total_steps", "percent", "phase", "rate", "eta", "metrics", "resources"):
        assert body[key] == written[key]


@pytest.mark.parametrize(
    "fields",
    [
        {"updated": time.time() - 3600},  # a run that stopped writing its status
        {"state": "finished"},
        {"pid": 2**22 + 12345},  # no such process on this host
    ],
)
def test_status_of_a_dead_or_finished_run_is_not_attached(
    client: Any, run_dir: Path, fields: dict[str, Any]
) -> None:
    write_status(run_dir, **fields)
    assert client.get("/api/status").json()["attached"] is False
    answer = client.post("/api/checkpoints", json={})
    assert answer.status_code == 409
    assert "no live run" in answer.json()["detail"]
    assert client.post("/api/stop", json={}).status_code == 409
    assert not (run_dir / "control").exists()


# ---- save and stop requests ----


def test_save_request_drops_a_control_file(client: Any, run_dir: Path) -> None:
    write_status(run_dir)
    answer = client.post("/api/checkpoints", json={"name": "good-one", "note": "val looks great"})
    assert answer.status_code == 202
    body = answer.json()
    assert body["coalesced"] is False and body["action"] == "save"
    [path] = control_files(run_dir)
    request = json.loads(path.read_text())
    assert request["id"] == body["request_id"] == path.stem
    assert (request["action"], request["name"], request["note"]) == (
        "save",
        "good-one",
        "val looks great",
    )


def test_save_request_without_a_body_field_is_fine(client: Any, run_dir: Path) -> None:
    write_status(run_dir)
    assert client.post("/api/checkpoints", json={}).status_code == 202
    [path] = control_files(run_dir)
    assert json.loads(path.read_text())["name"] is None


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "a\\b", ".hidden", "", "é", "1234", "latest", "best", "x" * 65]
)
def test_unsafe_names_are_refused_with_400(client: Any, run_dir: Path, name: str) -> None:
    write_status(run_dir)
    answer = client.post("/api/checkpoints", json={"name": name})
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    if len(name) > 64:
        assert answer.status_code == 422  # refused by the schema's length bound
    else:
        assert answer.status_code == 400 and "checkpoint name" in detail
    assert not (run_dir / "control").exists()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"name": 5}',
        b'{"name": "ok", "extra": true}',
        b'{"note": "' + b"n" * 1001 + b'"}',
    ],
)
def test_bad_bodies_are_refused_with_one_line(client: Any, run_dir: Path, body: bytes) -> None:
    write_status(run_dir)
    answer = client.post(
        "/api/checkpoints", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert detail.startswith("bad request:") and "\n" not in detail
    assert not (run_dir / "control").exists()


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/checkpoints"), ("POST", "/api/stop"), ("DELETE", "/api/checkpoints/x")],
)
@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data"]
)
def test_state_changing_requests_need_json(
    client: Any, run_dir: Path, method: str, path: str, content_type: str | None
) -> None:
    write_status(run_dir)
    headers = {"Content-Type": content_type} if content_type else {}
    answer = client.request(method, path, content=b"name=x", headers=headers)
    assert answer.status_code == 415
    assert "application/json" in answer.json()["detail"]
    assert not (run_dir / "control").exists()


def test_json_with_a_charset_is_accepted(client: Any, run_dir: Path) -> None:
    write_status(run_dir)
    answer = client.post(
        "/api/stop", content=b"{}", headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert answer.status_code == 202


def test_oversized_bodies_get_413(client: Any, run_dir: Path) -> None:
    write_status(run_dir)
    big = json.dumps({"note": "x" * 20_000}).encode()
    answer = client.post(
        "/api/checkpoints", content=big, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the guard counts as it reads
        for _ in range(40):
            yield b" " * 1024

    answer = client.post(
        "/api/checkpoints", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 413
    assert not (run_dir / "control").exists()


def test_stop_request(client: Any, run_dir: Path) -> None:
    write_status(run_dir)
    answer = client.post("/api/stop", json={"reason": "looks done"})
    assert answer.status_code == 202
    [path] = control_files(run_dir)
    request = json.loads(path.read_text())
    assert request["action"] == "stop" and request["id"] == answer.json()["request_id"]
    assert request["note"] == "looks done"
    again = client.post("/api/stop", json={})
    assert again.json() == {**answer.json(), "coalesced": True}


def test_a_save_flood_makes_one_pending_request_and_answers_all(
    client: Any, run_dir: Path, live_status: None
) -> None:
    requests = 1000

    def save(i: int) -> tuple[int, dict[str, Any]]:
        answer = client.post("/api/checkpoints", json={"name": "flood"} if i % 2 else {})
        return answer.status_code, answer.json()

    first = save(1)  # named: the clicks after it, named alike or unnamed, join it
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = [first, *pool.map(save, range(1, requests))]

    assert len(answers) == requests
    assert {code for code, _ in answers} == {202}
    [pending] = control_files(run_dir)
    ids = {body["request_id"] for _, body in answers}
    assert ids == {pending.stem}
    assert sum(not body["coalesced"] for _, body in answers) == 1
    # Every answer says the name the checkpoint will have: the pending request's.
    assert {body["name"] for _, body in answers} == {"flood"}

    # Once the run has taken the request, the next click makes a new one.
    pending.unlink()
    fresh = client.post("/api/checkpoints", json={}).json()
    assert fresh["coalesced"] is False and fresh["request_id"] != pending.stem
    assert [p.stem for p in control_files(run_dir)] == [fresh["request_id"]]


def test_two_servers_on_one_run_coalesce_into_one_request(
    run_dir: Path, server: ServerHandle, live_status: None
) -> None:
    # The run's own server and `killsafe serve` share control/ (a file lock, not
    # a thread lock, keeps them from both submitting).
    with serve_in_thread(run_dir) as other:
        clients = [httpx.Client(base_url=h.url, timeout=TIMEOUT) for h in (server, other)]

        def save(i: int) -> str:
            answer = clients[i % 2].post("/api/checkpoints", json={})
            assert answer.status_code == 202
            return str(answer.json()["request_id"])

        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = set(pool.map(save, range(200)))
        for c in clients:
            c.close()
    [pending] = control_files(run_dir)
    assert ids == {pending.stem}


def test_requests_carry_the_live_session(client: Any, run_dir: Path, live_status: None) -> None:
    answer = client.post("/api/checkpoints", json={"name": "tagged"})
    assert answer.status_code == 202
    [pending] = control_files(run_dir)
    assert json.loads(pending.read_text())["session"] == "session-1"


def test_a_coalesced_save_answers_the_name_it_will_have_or_409(
    client: Any, run_dir: Path, live_status: None
) -> None:
    first = client.post("/api/checkpoints", json={"name": "good"}).json()
    assert first["name"] == "good" and first["coalesced"] is False
    same = client.post("/api/checkpoints", json={"name": "good"}).json()
    unnamed = client.post("/api/checkpoints", json={}).json()
    assert same == unnamed == {**first, "coalesced": True}
    other = client.post("/api/checkpoints", json={"name": "better"})
    assert other.status_code == 409
    detail = other.json()["detail"]
    assert "'good'" in detail and "'better'" in detail and "\n" not in detail
    [pending] = control_files(run_dir)
    assert json.loads(pending.read_text())["name"] == "good"

    # An unnamed save pending: a named one does not silently become unnamed.
    pending.unlink()
    plain = client.post("/api/checkpoints", json={}).json()
    assert plain["name"] is None and plain["coalesced"] is False
    assert client.post("/api/checkpoints", json={"name": "late"}).status_code == 409


def test_save_requests_a_minute_are_capped_with_429(run_dir: Path, live_status: None) -> None:
    with (
        serve_in_thread(run_dir, limits=ServeLimits(saves_per_minute=2)) as handle,
        httpx.Client(base_url=handle.url, timeout=TIMEOUT) as client,
    ):
        for _ in range(2):
            assert client.post("/api/checkpoints", json={}).json()["coalesced"] is False
            # Joining the pending request creates nothing, so it is never capped.
            assert client.post("/api/checkpoints", json={}).json()["coalesced"] is True
            for path in control_files(run_dir):
                path.unlink()  # the run took it
        refused = client.post("/api/checkpoints", json={})
        assert refused.status_code == 429
        assert "2 save requests a minute" in refused.json()["detail"]
        assert "\n" not in refused.json()["detail"]
        assert 0 < int(refused.headers["retry-after"]) <= 61
        assert control_files(run_dir) == []
        # Stop requests are not saves: never capped.
        assert client.post("/api/stop", json={}).status_code == 202


def test_checkpoints_named_by_requests_are_capped_with_429(
    run_dir: Path, live_status: None
) -> None:
    from killsafe.store import CheckpointStore

    store = CheckpointStore(run_dir / "checkpoints")
    store.save({"w": [1.0]}, step=1, name="asked", metadata={"request_id": "r1"})
    store.save({"w": [1.0]}, step=2, name="from-code")  # run.save(name=...): not counted
    store.close()
    with (
        serve_in_thread(run_dir, limits=ServeLimits(named_saves_kept=2)) as handle,
        httpx.Client(base_url=handle.url, timeout=TIMEOUT) as client,
    ):
        assert client.post("/api/checkpoints", json={"name": "second"}).status_code == 202
        for path in control_files(run_dir):
            path.unlink()
        store = CheckpointStore(run_dir / "checkpoints")
        store.save({"w": [1.0]}, step=3, name="second", metadata={"request_id": "r2"})
        store.close()
        refused = client.post("/api/checkpoints", json={"name": "third"})
        assert refused.status_code == 429
        assert "2 checkpoints named by save requests" in refused.json()["detail"]
        assert control_files(run_dir) == []
        # Unnamed saves are pruned by retention: still welcome.
        assert client.post("/api/checkpoints", json={}).status_code == 202


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="saves_per_minute=0"):
        ServeLimits(saves_per_minute=0)
    with pytest.raises(ConfigError, match="named_saves_kept=-1"):
        ServeLimits(named_saves_kept=-1)
    assert ServeLimits(saves_per_minute=None, named_saves_kept=0).named_saves_kept == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/checkpoints"), ("POST", "/api/stop"), ("DELETE", "/api/checkpoints/x")],
)
def test_cross_origin_state_changing_requests_are_refused(
    client: Any, server: ServerHandle, run_dir: Path, live_status: None, method: str, path: str
) -> None:
    for origin in ("http://evil.example", f"http://localhost:{server.port}", "null"):
        refused = client.request(method, path, json={}, headers={"Origin": origin})
        assert refused.status_code == 403, origin
        assert "cross-origin" in refused.json()["detail"]
    assert control_files(run_dir) == []
    same = client.request(
        method, path, json={}, headers={"Origin": f"http://127.0.0.1:{server.port}"}
    )
    assert same.status_code != 403
    assert client.request(method, path, json={}).status_code != 403  # no Origin: curl, scripts
    # Reading stays open to the page's own fetches, whatever the Origin.
    assert client.get("/api/status", headers={"Origin": "http://evil.example"}).status_code == 200


# ---- the token ----


def test_the_token_is_required_on_the_api_when_set(run_dir: Path) -> None:
    write_status(run_dir)
    token = "tok-" + "a1" * 12
    with (
        serve_in_thread(run_dir, token=token) as handle,
        httpx.Client(base_url=handle.url, timeout=TIMEOUT) as c,
    ):
        assert handle.token == token and handle.page_url.endswith("#token=" + token)
        for method, path in [
            ("GET", "/api/status"),
            ("GET", "/api/checkpoints"),
            ("GET", "/api/events"),
            ("GET", "/openapi.json"),
            ("POST", "/api/checkpoints"),
            ("POST", "/api/stop"),
        ]:
            answer = c.request(method, path, json={})
            assert answer.status_code == 401, path
            assert "token" in answer.json()["detail"]
        wrong = c.get("/api/status", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        basic = c.get("/api/status", headers={"Authorization": "Basic " + token})
        assert basic.status_code == 401
        assert not (run_dir / "control").exists()

        bearer = c.get("/api/status", headers={"Authorization": f"Bearer {token}"})
        assert bearer.status_code == 200 and bearer.json()["attached"] is True
        header = c.post("/api/checkpoints", json={}, headers={"X-Killsafe-Token": token})
        assert header.status_code == 202
        # The page itself is public: it holds no data and asks for the token.
        assert c.get("/").status_code == 200
        assert c.get("/static/app.js").status_code == 200


def test_a_generated_token_is_logged_once(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="killsafe.server")
    with serve_in_thread(run_dir, token=True) as handle:
        assert handle.token and len(handle.token) >= 24
        assert sum(handle.token in r.getMessage() for r in caplog.records) == 1
        ok = httpx.get(
            handle.url + "api/status", headers={"X-Killsafe-Token": handle.token}, timeout=TIMEOUT
        )
        assert ok.status_code == 200


# ---- events ----


def read_events(
    client: Any, until: Any, *, actions: list[Any] | None = None
) -> list[tuple[str, Any]]:
    """Read the event stream until an event of kind ``until`` (or until ``until(seen)``
    is true); run ``actions`` once the first (snapshot) event arrived."""
    seen: list[tuple[str, Any]] = []
    kind = None
    with client.stream("GET", "/api/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind is not None:
                seen.append((kind, json.loads(line.split(":", 1)[1])))
                if len(seen) == 1:
                    for action in actions or []:
                        action()
                if until(seen) if callable(until) else kind == until:
                    return seen
    raise AssertionError(f"stream ended before a {until!r} event: {seen}")


def test_events_stream_the_runs_events_and_progress(client: Any, run_dir: Path) -> None:
    write_status(run_dir, step=1)
    rundir.append_event(run_dir, "started", 0)  # before connecting: not replayed

    def run_saves() -> None:
        write_status(run_dir, step=2)
        rundir.append_event(run_dir, "save-requested", 2, request_id="r1")
        rundir.append_event(run_dir, "saved", 3, name="good", path="x", request_id="r1")
        rundir.append_event(run_dir, "save-failed", 4, error="disk full", request_id="r2")
        rundir.append_event(run_dir, "stopped", 5, reason="signal")

    def done(seen: list[tuple[str, Any]]) -> bool:
        progressed = any(k == "progress" and data["step"] == 2 for k, data in seen)
        return progressed and any(k == "stopped" for k, _ in seen)

    seen = read_events(client, done, actions=[run_saves])
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == "progress" and seen[0][1]["step"] == 1 and seen[0][1]["attached"]
    assert "started" not in kinds
    run_kinds = [k for k in kinds if k != "progress"]
    assert run_kinds == ["save-requested", "saved", "save-failed", "stopped"]
    saved = dict(seen)["saved"]
    assert saved["name"] == "good" and saved["request_id"] == "r1"
    assert any(kind == "progress" and data["step"] == 2 for kind, data in seen[1:])


def test_a_torn_event_line_waits_for_its_end(client: Any, run_dir: Path) -> None:
    path = run_dir / rundir.EVENTS_FILE

    def write_in_two_parts() -> None:
        line = json.dumps({"time": 1.0, "kind": "saved", "step": 7, "name": "half"}) + "\n"
        with open(path, "a") as f:
            f.write(line[:20])
            f.flush()
            time.sleep(0.6)  # long enough for the stream to read the torn part
            f.write(line[20:])

    seen = read_events(client, "saved", actions=[write_in_two_parts])
    assert seen[-1][1]["name"] == "half" and seen[-1][1]["step"] == 7


def test_close_ends_open_event_streams(run_dir: Path) -> None:
    handle = serve_in_thread(run_dir)
    ended = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", handle.url + "api/events", timeout=TIMEOUT) as stream:
            for _ in stream.iter_lines():
                pass
        ended.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.3)  # let the stream open
    handle.close()
    assert not handle.running
    listener.join(TIMEOUT)
    assert ended.is_set()


def test_close_still_sends_the_runs_last_words(run_dir: Path) -> None:
    write_status(run_dir)
    handle = serve_in_thread(run_dir)
    kinds: list[str] = []
    with httpx.stream("GET", handle.url + "api/events", timeout=TIMEOUT) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kinds.append(line.split(":", 1)[1].strip())
                if len(kinds) == 1:  # the stream is open: the run ends and closes its server
                    write_status(run_dir, state="stopped")
                    rundir.append_event(run_dir, "stopped", 40, reason="request")
                    handle.close()
    assert kinds[0] == "progress" and "stopped" in kinds
    assert not handle.running


# ---- history and report ----


def test_history(client: Any, run_dir: Path) -> None:
    empty = client.get("/api/history").json()
    assert (empty["records"], empty["total"], empty["reset"]) == ([], 0, True)
    history = History(run_dir)
    for step in range(1, 11):
        history.append(step, {"loss": 1.0 / step})
    history.close()
    body = client.get("/api/history").json()
    assert body["total"] == 10 and [r["step"] for r in body["records"]] == list(range(1, 11))
    assert body["records"][3]["loss"] == pytest.approx(0.25)
    last = client.get("/api/history", params={"limit": 3}).json()
    assert [r["step"] for r in last["records"]] == [8, 9, 10] and last["total"] == 10
    assert client.get("/api/history", params={"limit": -1}).status_code == 422


def test_history_with_a_cursor_sends_only_new_records(client: Any, run_dir: Path) -> None:
    history = History(run_dir)
    for step in range(1, 6):
        history.append(step, {"loss": 1.0 / step})
    first = client.get("/api/history").json()
    assert first["reset"] is True and first["total"] == 5

    nothing = client.get("/api/history", params={"cursor": first["cursor"]}).json()
    assert (nothing["records"], nothing["reset"], nothing["total"]) == ([], False, 5)
    for step in range(6, 9):
        history.append(step, {"loss": 1.0 / step})
    history.close()
    with open(run_dir / "history.jsonl", "a") as f:
        f.write('{"step": 9, "time": 1.0, "lo')  # a torn line waits for its end
    newer = client.get("/api/history", params={"cursor": first["cursor"]}).json()
    assert [r["step"] for r in newer["records"]] == [6, 7, 8]
    assert newer["reset"] is False and newer["total"] == 8
    with open(run_dir / "history.jsonl", "a") as f:
        f.write('ss": 0.1}\n')
    last = client.get("/api/history", params={"cursor": newer["cursor"]}).json()
    assert [r["step"] for r in last["records"]] == [9] and last["total"] == 9

    # A resume rewrites the file: old cursors are stale, the answer starts over.
    resumed = History(run_dir)
    resumed.truncate_after(4)
    resumed.close()
    again = client.get("/api/history", params={"cursor": last["cursor"]}).json()
    assert again["reset"] is True and [r["step"] for r in again["records"]] == [1, 2, 3, 4]
    for bogus in ("x", "1:2", "-1:-1:-1", again["cursor"].replace(":", ":9", 1)):
        answer = client.get("/api/history", params={"cursor": bogus}).json()
        assert answer["reset"] is True and answer["total"] == 4, bogus
    behind = client.get("/api/history", params={"cursor": "0:0:0", "limit": 2}).json()
    assert behind["reset"] is True and [r["step"] for r in behind["records"]] == [3, 4]


def test_report(client: Any, run_dir: Path) -> None:
    rundir.write_json_atomic(run_dir / "report.json", {"status": "finished", "steps": 100})
    assert client.get("/api/report").json() == {"status": "finished", "steps": 100}


def test_report_before_the_run_wrote_one(client: Any, run_dir: Path) -> None:
    empty = client.get("/api/report")
    assert empty.status_code == 404 and "no report" in empty.json()["detail"]
    history = History(run_dir)
    for step in range(1, 6):
        history.append(step, {"loss": 1.0 / step})
    history.close()
    built = client.get("/api/report")
    assert built.status_code == 200
    assert "loss" in json.dumps(built.json())
    assert not (run_dir / "report.json").exists()  # built for the answer, never written


# ---- the OpenAPI document and the page ----


def test_openapi_document_describes_the_api(client: Any) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert {"get", "post"} <= set(paths["/api/checkpoints"])
    assert "delete" in paths["/api/checkpoints/{checkpoint_id}"]
    for path in ("/api/status", "/api/events", "/api/stop", "/api/history", "/api/report"):
        assert path in paths
    schemas = doc["components"]["schemas"]
    for model in ("StatusOut", "CheckpointOut", "AcceptedOut", "SaveIn", "HistoryOut", "ErrorOut"):
        assert model in schemas
    post = paths["/api/checkpoints"]["post"]
    accepted = post["responses"]["202"]["content"]["application/json"]["schema"]
    assert accepted["$ref"].endswith("/AcceptedOut")
    assert post["responses"]["409"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorOut"
    )
    status = paths["/api/status"]["get"]["responses"]["200"]["content"]["application/json"]
    assert status["schema"]["$ref"].endswith("/StatusOut")


def test_the_page_and_its_assets_are_local(client: Any) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Save checkpoint" in page.text and "Stop" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        answer = client.get(asset)
        assert answer.status_code == 200
        text = answer.text.replace('"http://www.w3.org/2000/svg"', "SVG_NAMESPACE")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert "https://" not in page.text and "http://" not in page.text
    for cdn_page in ("/docs", "/redoc"):  # FastAPI's viewers load scripts from a CDN
        assert client.get(cdn_page).status_code == 404


# ---- killsafe serve (serve_forever) in its own process ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVE_SCRIPT = """
import argparse, logging, sys
from killsafe.server import add_cli_arguments, run_cli
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
parser = argparse.ArgumentParser()
add_cli_arguments(parser)
sys.exit(run_cli(parser.parse_args(sys.argv[1:])))
"""


def wait_until_serving(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError(f"no server at {url}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_forever_serves_until_a_signal(run_dir: Path, sig: signal.Signals) -> None:
    port = free_port()
    write_status(run_dir, state="finished")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(run_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, proc)
        assert httpx.get(url + "api/status", timeout=TIMEOUT).json()["state"] == "finished"
        with httpx.stream("GET", url + "api/events", timeout=TIMEOUT) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("retry:")
            proc.send_signal(sig)
            for _ in lines:  # the stream ends with the server
                pass
        output, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert f"serving {run_dir} at {url}" in output


def test_serve_cli_with_a_token(run_dir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(run_dir), "--port", str(port), "--token", "t0k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_serving(url, proc)
        assert httpx.get(url + "api/status", timeout=TIMEOUT).status_code == 401
        ok = httpx.get(url + "api/status", headers={"X-Killsafe-Token": "t0k"}, timeout=TIMEOUT)
        assert ok.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output
    assert f"{url}#token=t0k" in output


def test_serve_cli_refuses_a_missing_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("killsafe serve: error: no run directory at ")
    assert len(proc.stderr.splitlines()) == 1


def test_serve_cli_refuses_a_busy_port(run_dir: Path, server: ServerHandle) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, str(run_dir), "--port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{server.port}" in proc.stderr


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8765", True),
        ("localhost:8765", True),
        ("localhost", True),
        ("[::1]:8765", True),
        ("127.0.0.2", True),
        ("evil.example:8765", False),
        ("192.168.1.10:8765", False),
        ("", False),
    ],
)
def test_without_a_token_only_loopback_host_names_are_answered(
    client: Any, run_dir: Path, live_status: None, host: str, allowed: bool
) -> None:
    # A page on evil.example whose name is re-pointed at 127.0.0.1 (DNS rebinding)
    # sends its own Host: it must not stop the run or delete checkpoints.
    headers = {"Host": host}
    status = client.get("/api/status", headers=headers)
    stop = client.post("/api/stop", json={}, headers=headers)
    if allowed:
        assert (status.status_code, stop.status_code) == (200, 202)
    else:
        assert (status.status_code, stop.status_code) == (403, 403)
        assert "127.0.0.1 or localhost" in stop.json()["detail"]
        assert not control_files(run_dir)


def test_with_a_token_any_host_name_is_answered(run_dir: Path) -> None:
    with serve_in_thread(run_dir, token="t0ken") as handle:
        answer = httpx.get(
            handle.url + "api/status",
            headers={"Host": "gpu-box.lan:8765", "X-Killsafe-Token": "t0ken"},
            timeout=TIMEOUT,
        )
    assert answer.status_code == 200


def test_serve_cli_takes_the_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from killsafe.server import add_cli_arguments

    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args([str(tmp_path), "--saves-per-minute", "none"])
    assert args.saves_per_minute is None
    assert args.named_saves_kept == ServeLimits().named_saves_kept
    args = parser.parse_args([str(tmp_path), "--named-saves-kept", "5"])
    assert args.named_saves_kept == 5
    with pytest.raises(SystemExit) as exited:
        parser.parse_args([str(tmp_path), "--saves-per-minute", "many"])
    assert exited.value.code == 2
    assert "'many': use a whole number or 'none'" in capsys.readouterr().err


def test_recent_answers_are_built_once_a_period() -> None:
    from killsafe.server.app import RecentAnswers

    builds: list[int] = []

    def build() -> bytes:
        builds.append(1)
        return b"%d" % len(builds)

    def fail() -> bytes:
        raise ConfigError("nothing to answer yet")

    kept = RecentAnswers(ttl=3600.0)
    with pytest.raises(ConfigError):
        kept.get("report", fail)  # an error is never kept
    assert [kept.get("report", build) for _ in range(5)] == [b"1"] * 5
    assert kept.get(("history", 3), build) == b"2"  # another key, another answer
    fresh = RecentAnswers(ttl=0.0)
    assert [fresh.get("report", build) for _ in range(2)] == [b"3", b"4"]
