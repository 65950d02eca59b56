"""``Run`` end to end: real child processes, real signals, a real pseudo-terminal.

The child (``CHILD`` below) runs a loop whose state is a running sum of the
step numbers and appends every step it runs to ``ran.txt``, so a test can
prove which steps really ran, that none was repeated after a graceful stop,
and that the resumed state is exact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from killsafe.rundir import ControlRequest, read_jsonl, submit_request

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent(
    """
    import json, logging, os, sys, threading, time
    from pathlib import Path

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    from killsafe.run import Run

    opts = json.loads(sys.argv[1])
    run_dir = Path(opts.pop("dir"))
    marks = run_dir.parent
    ready_at = opts.pop("ready_at", None)
    stuck_at = opts.pop("stuck_at", None)
    fail_at = opts.pop("fail_at", None)
    sleep = opts.pop("sleep", 0.0)
    tty_settings = None
    if opts.pop("check_tty", False):
        import termios
        tty_settings = termios.tcgetattr(0)
    opts.setdefault("progress", False)
    opts.setdefault("report", False)  # the report has its own tests; it costs an import
    state = {"sum": 0}
    with Run(run_dir, **opts) as run:
        run.track(state=state)
        (marks / "resumed.txt").write_text(str(run.step))
        for step in run.steps():
            state["sum"] += step
            with open(marks / "ran.txt", "a") as f:
                f.write(f"{step}\\n")
            run.log(value=float(step))
            if step == fail_at:
                raise RuntimeError(f"failure injected at step {step}")
            if step == stuck_at:
                (marks / "stuck").write_text("")
                while True:
                    time.sleep(0.01)
            if step == ready_at:
                (marks / "ready").write_text("")
            if sleep:
                time.sleep(sleep)
    report = {
        "step": run.step,
        "sum": state["sum"],
        "exit_reason": run.exit_reason,
        "threads": sorted(t.name for t in threading.enumerate()),
    }
    if tty_settings is not None:
        import termios
        report["tty_restored"] = termios.tcgetattr(0) == tty_settings
    (marks / "result.json").write_text(json.dumps(report))
    """
)


class Child:
    """One run of CHILD in ``tmp/run``; marks (ran.txt, ready, result.json) live in ``tmp``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.script = tmp / "child.py"
        self.script.write_text(CHILD)
        self.run_dir = tmp / "run"

    def start(self, env: dict[str, str] | None = None, **opts: Any) -> subprocess.Popen[str]:
        for mark in ("ready", "stuck", "result.json", "resumed.txt"):
            (self.tmp / mark).unlink(missing_ok=True)
        return subprocess.Popen(
            [sys.executable, str(self.script), json.dumps({"dir": str(self.run_dir), **opts})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def run(self, **opts: Any) -> subprocess.CompletedProcess[str]:
        proc = self.start(**opts)
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def wait_for(self, mark: str, proc: subprocess.Popen[str] | None = None) -> None:
        _wait(lambda: (self.tmp / mark).exists(), proc, f"mark {mark}")

    def ran(self) -> list[int]:
        path = self.tmp / "ran.txt"
        return [int(x) for x in path.read_text().split()] if path.exists() else []

    def result(self) -> dict[str, Any]:
        return json.loads((self.tmp / "result.json").read_text())

    def run_json(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "run.json").read_text())

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        events = read_jsonl(self.run_dir / "events.jsonl")
        return [e for e in events if kind is None or e["kind"] == kind]

    def checkpoints(self) -> list[dict[str, Any]]:
        root = self.run_dir / "checkpoints"
        if not root.exists():
            return []
        found = []
        for path in sorted(root.iterdir()):
            if path.name.startswith("step-"):
                found.append(json.loads((path / "manifest.json").read_text()))
        return sorted(found, key=lambda m: m["step"])

    def history_steps(self) -> list[int]:
        return [r["step"] for r in read_jsonl(self.run_dir / "history.jsonl")]


def _wait(ready: Callable[[], bool], proc: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"child exited ({proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def child(tmp_path: Path) -> Child:
    return Child(tmp_path)


def _finish(child: Child, total: int) -> None:
    """Resume to the end and check the exactness of the whole run."""
    done = child.run(total_steps=total)
    assert done.returncode == 0, done.stderr
    result = child.result()
    assert result["step"] == total
    assert result["sum"] == sum(range(total))
    assert result["exit_reason"] == "finished"
    assert child.history_steps() == list(range(1, total + 1))


@pytest.mark.parametrize(
    ("sig", "options", "reason"),
    [
        (signal.SIGTERM, {}, "signal:SIGTERM"),
        (signal.SIGINT, {}, "keyboard"),
        (signal.SIGUSR1, {"signals": ["SIGUSR1"]}, "signal:SIGUSR1"),
    ],
)
def test_a_signal_stops_with_an_emergency_checkpoint_and_resume_repeats_nothing(
    child: Child, sig: signal.Signals, options: dict[str, Any], reason: str
) -> None:
    proc = child.start(total_steps=400, ready_at=20, sleep=0.005, save_every_steps=1000, **options)
    child.wait_for("ready", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = child.result()
    assert result["exit_reason"] == reason
    assert 20 < result["step"] < 400
    assert result["threads"] == ["MainThread"]
    checkpoints = child.checkpoints()
    assert [c["step"] for c in checkpoints] == [result["step"]]
    assert checkpoints[0]["reason"] == reason
    data = child.run_json()
    assert data["status"] == "stopped"
    assert data["exit_reason"] == reason
    assert data["sessions"][-1]["end_step"] == result["step"]
    assert f"stopped at step {result['step']}" in err
    assert [e["reason"] for e in child.events("stop-requested")] == [reason]
    _finish(child, 400)
    # A graceful stop never repeats a step: each ran exactly once.
    assert child.ran() == list(range(400))
    data = child.run_json()
    assert [s["status"] for s in data["sessions"]] == ["stopped", "finished"]
    assert data["sessions"][1]["resumed_from"].endswith(f"step-{result['step']:06d}")


def test_a_second_ctrl_c_leaves_at_once_without_a_checkpoint(child: Child) -> None:
    proc = child.start(total_steps=100, save_every_steps=5, stuck_at=12)
    child.wait_for("stuck", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)  # let the first one be handled before the second arrives
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert [c["step"] for c in child.checkpoints()] == [5, 10]
    data = child.run_json()
    assert data["exit_reason"] == "keyboard:forced"
    assert data["status"] == "stopped"
    _finish(child, 30)
    assert child.ran().count(10) == 2  # step 10 (after the checkpoint at 10) ran again
    assert child.ran().count(9) == 1


def test_q_and_enter_on_a_terminal_stops_gracefully(child: Child) -> None:
    opts = {
        "dir": str(child.run_dir),
        "total_steps": 2000,
        "ready_at": 10,
        "sleep": 0.005,
        "check_tty": True,
    }
    proc, master = _spawn_on_terminal(child.script, opts)
    output = bytearray()
    try:
        child.wait_for("ready", proc)
        os.write(master, b"q\n")
        _wait(lambda: proc.poll() is not None, None, "the child to stop", timeout=60)
        output += _drain(master)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    assert proc.returncode == 0, output.decode(errors="replace")
    result = child.result()
    assert result["exit_reason"] == "keyboard"
    assert result["tty_restored"] is True
    assert result["threads"] == ["MainThread"]
    assert child.checkpoints()[-1]["reason"] == "keyboard"


def _spawn_on_terminal(script: Path, opts: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int]:
    """Start CHILD with a new pseudo-terminal as its controlling terminal; returns the master."""
    import pty

    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, str(script), json.dumps(opts)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=controlling_terminal,
    )
    os.close(slave)
    return proc, master


def _drain(fd: int) -> bytes:
    import select

    data = b""
    while select.select([fd], [], [], 0.1)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_stop_after_stops_with_a_time_limit_checkpoint(child: Child) -> None:
    done = child.run(total_steps=100_000, sleep=0.002, stop_after="0.5s")
    assert done.returncode == 0, done.stderr
    result = child.result()
    assert result["exit_reason"] == "time-limit"
    assert 0 < result["step"] < 100_000
    assert child.checkpoints()[-1]["reason"] == "time-limit"
    assert child.checkpoints()[-1]["step"] == result["step"]


def test_an_exception_propagates_without_a_checkpoint_and_run_json_records_it(
    child: Child,
) -> None:
    done = child.run(total_steps=20, save_every_steps=5, fail_at=7)
    assert done.returncode == 1
    assert "failure injected at step 7" in done.stderr
    assert [c["step"] for c in child.checkpoints()] == [5]
    data = child.run_json()
    assert data["status"] == "failed"
    assert "RuntimeError: failure injected at step 7" in data["error"]
    assert data["sessions"][0]["end_step"] == 7
    assert child.history_steps() == list(range(1, 9))
    _finish(child, 20)
    assert (child.tmp / "resumed.txt").read_text() == "5"
    assert child.ran()[:8] == list(range(8))
    assert child.ran()[8:] == list(range(5, 20))


def test_sigkill_then_resume_keeps_the_history_free_of_duplicates(child: Child) -> None:
    proc = child.start(total_steps=300, ready_at=33, sleep=0.002, save_every_steps=10)
    child.wait_for("ready", proc)
    proc.kill()
    proc.wait()
    assert child.history_steps()[-1] > 30
    _finish(child, 300)
    assert sorted(set(child.ran())) == list(range(300))


def test_resume_never_refuses_existing_checkpoints_unless_cleared(child: Child) -> None:
    assert child.run(total_steps=6, save_every_steps=3).returncode == 0
    refused = child.run(total_steps=6, resume="never")
    assert refused.returncode == 1
    assert "ConfigError" in refused.stderr and "clear=True" in refused.stderr
    assert len(child.checkpoints()) == 2
    cleared = child.run(total_steps=4, resume="never", clear=True)
    assert cleared.returncode == 0, cleared.stderr
    assert (child.tmp / "resumed.txt").read_text() == "0"
    assert child.result()["sum"] == sum(range(4))
    assert [c["step"] for c in child.checkpoints()] == [4]
    assert child.history_steps() == [1, 2, 3, 4]


def test_resume_from_a_path_a_step_and_a_missing_one(child: Child) -> None:
    assert child.run(total_steps=9, save_every_steps=3, keep_last=None).returncode == 0
    step3 = child.run_dir / "checkpoints" / "step-000003"
    by_path = child.run(total_steps=9, resume=str(step3))
    assert by_path.returncode == 0, by_path.stderr
    assert (child.tmp / "resumed.txt").read_text() == "3"
    assert child.result()["sum"] == sum(range(9))
    assert "newer checkpoints (steps 6, 9)" in by_path.stderr
    assert "abandoned continuation" in by_path.stderr
    assert [c["step"] for c in child.checkpoints()] == [3, 6, 9]
    by_step = child.run(total_steps=9, resume=6)
    assert (child.tmp / "resumed.txt").read_text() == "6"
    assert by_step.returncode == 0
    missing = child.run(total_steps=9, resume=str(child.tmp / "nowhere"))
    assert missing.returncode == 1
    assert "CheckpointNotFound" in missing.stderr
    assert not (child.tmp / "resumed.txt").exists()


def test_the_environment_overrides_resume(child: Child) -> None:
    assert child.run(total_steps=4, save_every_steps=2).returncode == 0
    proc = child.start(env={"KILLSAFE_RESUME": "auto"}, total_steps=6, resume="never")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (child.tmp / "resumed.txt").read_text() == "4"
    assert child.result()["sum"] == sum(range(6))


def test_resume_ask_on_a_terminal(child: Child) -> None:
    assert child.run(total_steps=6, save_every_steps=2, keep_last=None).returncode == 0
    for answer, resumed in ((b"2\n", "2"), (b"y\n", "6")):
        opts = {"dir": str(child.run_dir), "total_steps": 6, "resume": "ask"}
        proc, fd = _spawn_on_terminal(child.script, opts)
        seen = bytearray()

        def asked(fd: int = fd, seen: bytearray = seen) -> bool:
            seen.extend(_drain(fd))
            return b"Resume from step 6?" in seen

        try:
            _wait(asked, None, "the question")
            os.write(fd, answer)
            proc.wait(timeout=60)
            seen.extend(_drain(fd))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            os.close(fd)
        output = bytes(seen)
        assert proc.returncode == 0, output
        assert b"reason finished" in output
        assert (child.tmp / "resumed.txt").read_text() == resumed


def test_control_requests_save_once_and_stop(child: Child) -> None:
    proc = child.start(total_steps=100_000, ready_at=5, sleep=0.002)
    child.wait_for("ready", proc)
    first = submit_request(child.run_dir, ControlRequest("save", name="manual"))
    second = submit_request(child.run_dir, ControlRequest("save"))
    _wait(lambda: len(child.events("saved")) >= 2, proc, "saved events")
    assert not first.exists() and not second.exists()
    saved = child.events("saved")
    assert {e["request_id"] for e in saved} == {first.stem, second.stem}
    assert len({e["path"] for e in saved}) == 1
    assert saved[0]["name"] == "manual"
    stop = ControlRequest("stop")
    submit_request(child.run_dir, stop)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert child.result()["exit_reason"] == "request"
    assert child.checkpoints()[-1]["reason"] == "request"
    assert child.events("stopped")[-1]["request_id"] == stop.id
    assert child.events("stop-requested")[-1]["request_id"] == stop.id
    status = json.loads((child.run_dir / "status.json").read_text())
    assert status["state"] == "stopped"
    assert status["step"] == child.result()["step"]


def test_a_stop_request_with_a_reason_carries_it_into_the_exit_reason(child: Child) -> None:
    proc = child.start(total_steps=100_000, ready_at=5, sleep=0.002)
    child.wait_for("ready", proc)
    stop = ControlRequest("stop", note="enough")  # what POST /api/stop {"reason": ...} drops
    submit_request(child.run_dir, stop)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert child.result()["exit_reason"] == "request:enough"
    assert child.run_json()["exit_reason"] == "request:enough"
    assert child.checkpoints()[-1]["reason"] == "request:enough"
    assert child.events("stop-requested")[-1]["reason"] == "request:enough"
    assert child.events("stopped")[-1]["request_id"] == stop.id


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_lives(
    child: Child,
) -> None:
    proc = child.start(total_steps=100_000, ready_at=3, sleep=0.002)
    try:
        child.wait_for("ready", proc)
        second = subprocess.run(
            [sys.executable, str(child.script), json.dumps({"dir": str(child.run_dir)})],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"in use by a live run (pid {proc.pid}" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert child.result()["exit_reason"] == "signal:SIGTERM"
