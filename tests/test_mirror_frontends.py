"""``killsafe report`` and ``killsafe serve`` on a mirror's URL: the run's files under
``run/``, its checkpoints beside them, read-only.

In-process against ``memory://``, and as real processes against the module's
SeaweedFS server.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, cli, cli_json

import killsafe
from killsafe import storage
from killsafe.cli import main
from killsafe.rundir.remote import mirrored_run_copy

TIMEOUT = 10.0


def stopped_run(directory: Path, mirror: str) -> None:
    """A run stopped at step 17 of 40, saving every 10; its stop checkpoint goes up."""
    rng = np.random.default_rng(0)
    with killsafe.Run(
        directory,
        total_steps=40,
        save_every_steps=10,
        mirror=mirror,
        progress=False,
        keyboard=False,
        report=False,
    ) as run:
        run.track(rng=rng)
        for step in run.steps():
            run.log(loss=1.0 / (step + 1), position=float(rng.normal()))
            if step + 1 == 17:
                run.stop("test")


def memory_url() -> str:
    return f"memory://frontends-{uuid.uuid4().hex[:8]}/exp"


def report_json(capsys: pytest.CaptureFixture[str], where: str) -> Any:
    assert main(["report", where, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_report_of_a_mirror_is_the_report_of_its_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = memory_url()
    stopped_run(tmp_path / "run", url)
    remote = report_json(capsys, url)
    local = report_json(capsys, str(tmp_path / "run"))
    assert remote["run_dir"] == url
    assert remote["checkpoints"][-1]["path"] == f"{url}/step-000017"
    assert remote["latest_checkpoint"] == f"{url}/step-000017"
    for part in ("run_id", "status", "exit_reason", "steps", "metrics", "history", "sessions"):
        assert remote[part] == local[part], part
    assert remote["steps"]["final"] == 17

    assert main(["report", url]) == 0
    text = capsys.readouterr().out
    assert url in text and "step-000017" in text


def test_the_csv_of_a_mirror_is_its_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = memory_url()
    stopped_run(tmp_path / "run", url)
    assert main(["report", url, "--csv", "-"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "loss" in lines[0] and len(lines) == 1 + 17


def test_a_url_without_a_mirrored_run_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = memory_url()
    with killsafe.CheckpointStore(url) as store:  # checkpoints, but no run's files
        store.save({"x": 1}, step=1)
    for command in (["report", url], ["serve", url, "--port", "0"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds no run/run.json" in err[0], err
    assert main(["report", url, "--write"]) == 2
    assert "is a mirror, read-only" in capsys.readouterr().err


def test_the_dashboard_of_a_mirror_is_read_only(tmp_path: Path) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from killsafe.server import serve_in_thread

    url = memory_url()
    stopped_run(tmp_path / "run", url)
    # A report the run saved names its own machine's paths; the mirror's is built anew.
    storage.write_bytes(storage.open(url), "run/report.json", b'{"run_dir": "/elsewhere"}')
    with (
        mirrored_run_copy(url) as copy,
        serve_in_thread(copy, mirror=url) as server,
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as client,
    ):
        status = client.get("/api/status").json()
        assert status["attached"] is False and status["directory"] == url
        listed = client.get("/api/checkpoints").json()["checkpoints"]
        assert [c["step"] for c in listed] == [10, 17] and listed[-1]["latest"]
        assert client.get("/api/history").json()["total"] == 17
        report = client.get("/api/report").json()
        assert report["steps"]["final"] == 17
        assert report["latest_checkpoint"] == f"{url}/step-000017"
        for method, path in (
            ("POST", "/api/checkpoints"),
            ("POST", "/api/stop"),
            ("DELETE", "/api/checkpoints/step-000010"),
        ):
            answer = client.request(method, path, json={})
            assert answer.status_code == 409 and "read-only" in answer.json()["detail"]
    assert [i.step for i in killsafe.CheckpointStore(url).list()] == [10, 17]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_report_and_serve_take_an_s3_mirror_as_processes(tmp_path: Path, s3_url: str) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    stopped_run(tmp_path / "run", s3_url)
    report = cli_json("report", s3_url)
    assert report["run_dir"] == s3_url and report["steps"]["final"] == 17
    assert report["latest_checkpoint"] == f"{s3_url}/step-000017"
    assert_one_line_error(cli("report", f"{s3_url}/nothing"), 2, "holds no run/run.json")

    port = free_port()
    serve = ["serve", s3_url, "--port", str(port), "--refresh", "0.2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "killsafe", *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=TIMEOUT) as client:
            listed = _when_serving(client, proc)
            assert [c["step"] for c in listed][-1] == 17
            status = client.get("/api/status").json()
            assert status["directory"] == s3_url and status["step"] == 17
            assert client.post("/api/stop", json={}).status_code == 409
            # A live run on another machine uploads a newer status: the dashboard follows it.
            backend = storage.open(s3_url)
            newer = json.dumps({**status, "step": 99}).encode()
            storage.write_bytes(backend, "run/status.json", newer)
            for _ in range(600):
                if client.get("/api/status").json()["step"] == 99:
                    break
                time.sleep(0.05)
            assert client.get("/api/status").json()["step"] == 99
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=TIMEOUT * 3)
    assert proc.returncode == 0, output


def _when_serving(client: Any, proc: subprocess.Popen[str]) -> Any:
    """The checkpoints the server lists, once it answers (it downloads the run files first)."""
    import httpx

    for _ in range(600):
        assert proc.poll() is None, proc.communicate()
        try:
            return client.get("/api/checkpoints").json()["checkpoints"]
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("killsafe serve did not answer")
