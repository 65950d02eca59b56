"""``killsafe demo``: a real training run with its dashboard, stopped with Ctrl+C
(SIGINT) and resumed; killed under ``killsafe run`` and restarted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, cli

STEPS = 400  # a few seconds: the default (about two minutes) is for people


def demo_command(run_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "killsafe", "demo", str(run_dir), "--steps", str(STEPS), *flags]


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def dashboard_url(proc: subprocess.Popen[str]) -> str:
    """Read the demo's stderr until it prints the dashboard's address."""
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        found = re.search(r"dashboard at (http://127\.0\.0\.1:\d+/)", line)
        if found:
            return found.group(1)
    raise AssertionError(f"the demo printed no dashboard address: {''.join(seen)}")


def test_the_demo_serves_stops_on_ctrl_c_and_the_same_command_finishes_it(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    run_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        demo_command(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = dashboard_url(proc)
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        wait_for_checkpoint(run_dir, proc)
        status = httpx.get(url + "api/status", timeout=30).json()
        assert status["attached"] is True and status["total_steps"] == STEPS
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "stopped" and run["exit_reason"] == "keyboard", run
    stopped_at = run["sessions"][-1]["end_step"]
    assert 0 < stopped_at < STEPS
    assert f"killsafe demo {run_dir}" in out  # what to try next, with the real directory
    assert f"killsafe report {run_dir}" in out
    with pytest.raises(httpx.TransportError):  # the dashboard ended with the run
        httpx.get(url + "api/status", timeout=5)

    again = subprocess.run(
        demo_command(run_dir, "--no-serve"), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "dashboard at" not in again.stderr
    assert f"progress step={STEPS}/{STEPS} 100.0%" in again.stderr  # the live progress line
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished"
    assert [s["start_step"] for s in run["sessions"]] == [0, stopped_at]
    steps = [json.loads(line)["step"] for line in (run_dir / "history.jsonl").open()]
    assert len(steps) == len(set(steps)) == STEPS  # every step once: nothing lost or redone
    assert "killsafe report:" in again.stdout and (run_dir / "report.txt").exists()
    assert f"({run_dir} is finished)" in again.stdout
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "finished"


def test_the_demo_killed_under_the_supervisor_is_restarted_and_finishes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    run_dir = tmp_path / "demo"
    supervisor = [sys.executable, "-m", "killsafe", "run", "--backoff", "0", "--"]
    proc = subprocess.Popen(
        [*supervisor, *demo_command(run_dir, "--no-serve")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_checkpoint(run_dir, proc)
        status = json.loads((run_dir / "status.json").read_text())
        os.kill(status["pid"], signal.SIGKILL)  # a crash nobody asked for
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "killed by SIGKILL (exit code 137); restarting" in err
    run = json.loads((run_dir / "run.json").read_text())  # found from `demo DIR`
    assert run["status"] == "finished"
    assert [(r["attempt"], r["signal"]) for r in run["restarts"]] == [(1, "SIGKILL")]
    assert len(run["sessions"]) == 2 and run["sessions"][1]["start_step"] > 0
    assert "killsafe report:" in out


def test_the_demo_without_torch_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None; from killsafe.cli import main; "
        f"raise SystemExit(main(['demo', {str(tmp_path / 'demo')!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert_one_line_error(out, 2, "pip install -c constraints.txt -e '.[torch]'")
    assert not (tmp_path / "demo").exists()


def test_the_demo_without_the_server_says_how_to_get_the_dashboard(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    code = (
        "import sys; sys.modules['fastapi'] = None; from killsafe.cli import main; "
        f"raise SystemExit(main(['demo', {str(tmp_path / 'demo')!r}, '--steps', '20']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "running without the dashboard" in out.stderr and "'.[server]'" in out.stderr
    assert "dashboard at" not in out.stderr
    assert json.loads((tmp_path / "demo" / "run.json").read_text())["status"] == "finished"


def test_the_demo_refuses_bad_input(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert_one_line_error(cli("demo", a_file, "--steps", "10"), 2, "is a file")
    assert_one_line_error(cli("demo", tmp_path / "d", "--steps", "0"), 2, "--steps must be 1")
    assert not (tmp_path / "d").exists()
