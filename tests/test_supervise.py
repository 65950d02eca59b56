"""``killsafe run``: the supervisor, driven through real subprocesses and real signals."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from killsafe.supervise import ChildExit, backoff_delay, classify, run_dir_from_command

# The child records every start (and the environment the supervisor gave it) in
# starts.jsonl, opens a session in run.json as a killsafe run does, then acts
# out the behaviour named on its command line.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from pathlib import Path

    run_dir = Path(sys.argv[sys.argv.index("--dir") + 1])
    behaviour = sys.argv[1]
    starts = run_dir / "starts.jsonl"
    with open(starts, "a") as f:
        f.write(json.dumps({
            "resume": os.environ.get("KILLSAFE_RESUME"),
            "supervisor": os.environ.get("KILLSAFE_SUPERVISOR"),
            "restarts": os.environ.get("KILLSAFE_RESTARTS"),
            "own_group": os.getpgrp() == os.getpid(),
        }) + "\\n")
    start = len(starts.read_text().splitlines())
    run_json = run_dir / "run.json"
    if run_json.exists():
        data = json.loads(run_json.read_text())
        data["sessions"].append({"pid": os.getpid()})
        data["status"] = "running"
        run_json.write_text(json.dumps(data))

    def wait_for_signal():
        (run_dir / f"ready-{start}").write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)

    if behaviour == "crash-twice":
        sys.exit(1 if start <= 2 else 0)
    if behaviour == "kill-self-once":
        if start == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)
    if behaviour == "always-fail":
        sys.exit(7)
    if behaviour == "stop-on-sigterm":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
        wait_for_signal()
    if behaviour == "default-signals":
        wait_for_signal()
    if behaviour == "usr1-done":
        signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))
        wait_for_signal()
    if behaviour == "open-line-then-crash-once":
        sys.stderr.write(f"step {start} rss=323.9MiB")  # a live display's last line, no newline
        sys.stderr.flush()
        sys.exit(1 if start == 1 else 0)
    if behaviour == "whole-line-then-crash-once":
        sys.stderr.write(f"step {start} rss=323.9MiB\\n")
        sys.stderr.flush()
        sys.exit(1 if start == 1 else 0)
    if behaviour == "stopped-by-request":
        data = json.loads(run_json.read_text())
        data["status"] = "stopped"
        run_json.write_text(json.dumps(data))
        sys.exit(5)
    """
)


@pytest.fixture
def child(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


def make_run_dir(tmp_path: Path, run_json: bool = True) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if run_json:
        (run_dir / "run.json").write_text(json.dumps({"sessions": [], "status": "running"}))
    return run_dir


def supervise(child: Path, behaviour: str, run_dir: Path, *options: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "killsafe", "run", "--backoff", "0.01", *options]
    command += ["--", sys.executable, str(child), behaviour, "--dir", str(run_dir)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def starts(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_script_that_crashes_twice_is_restarted_twice_and_finishes(
    child: Path, tmp_path: Path
) -> None:
    run_dir = make_run_dir(tmp_path)
    proc = supervise(child, "crash-twice", run_dir)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 0, err
    seen = starts(run_dir)
    assert [s["resume"] for s in seen] == [None, "auto", "auto"]
    assert [s["restarts"] for s in seen] == ["0", "1", "2"]
    assert all(s["supervisor"] == "1" and s["own_group"] for s in seen)
    restarts = json.loads((run_dir / "run.json").read_text())["restarts"]
    assert [(r["attempt"], r["exit_code"], r["signal"]) for r in restarts] == [
        (1, 1, None),
        (2, 1, None),
    ]
    assert [r["delay"] for r in restarts] == [0.01, 0.02]  # exponential backoff
    assert err.count("restarting in") == 2
    assert "Traceback" not in err


def test_a_kill_nobody_asked_for_is_a_crash_and_is_recorded(child: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    proc = supervise(child, "kill-self-once", run_dir)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 0, err
    assert len(starts(run_dir)) == 2
    (restart,) = json.loads((run_dir / "run.json").read_text())["restarts"]
    assert (restart["exit_code"], restart["signal"]) == (137, "SIGKILL")
    assert "killed by SIGKILL" in err


@pytest.mark.parametrize(
    ("behaviour", "sig", "expected_code"),
    [
        ("stop-on-sigterm", signal.SIGTERM, 3),
        ("default-signals", signal.SIGTERM, 128 + signal.SIGTERM),
        ("default-signals", signal.SIGINT, 128 + signal.SIGINT),
        ("default-signals", signal.SIGHUP, 128 + signal.SIGHUP),
    ],
)
def test_a_forwarded_stop_signal_is_not_restarted_and_the_exit_code_passes_through(
    child: Path, tmp_path: Path, behaviour: str, sig: signal.Signals, expected_code: int
) -> None:
    run_dir = make_run_dir(tmp_path)
    proc = supervise(child, behaviour, run_dir)
    wait_until(lambda: (run_dir / "ready-1").exists())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == expected_code, err
    assert len(starts(run_dir)) == 1
    assert "restarting" not in err
    assert "restarts" not in json.loads((run_dir / "run.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_sent_to_the_child_itself_is_not_restarted(
    child: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    # A scheduler or a user may signal the job directly rather than the supervisor.
    run_dir = make_run_dir(tmp_path)
    proc = supervise(child, "default-signals", run_dir)
    wait_until(lambda: (run_dir / "ready-1").exists() and (run_dir / "ready-1").read_text() != "")
    os.kill(int((run_dir / "ready-1").read_text()), sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert len(starts(run_dir)) == 1 and "restarting" not in err


def test_user_signals_are_forwarded_to_the_child(child: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    proc = supervise(child, "usr1-done", run_dir)
    wait_until(lambda: (run_dir / "ready-1").exists())
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(starts(run_dir)) == 1


def test_gives_up_after_max_restarts_with_the_childs_exit_code(child: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path, run_json=False)
    proc = supervise(child, "always-fail", run_dir, "--max-restarts", "2")
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 7
    assert len(starts(run_dir)) == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("killsafe run: giving up after 2 restart(s)")
    assert "exited with code 7" in last
    assert not (run_dir / "run.json").exists()  # not a killsafe run: nothing recorded


def test_a_run_that_stopped_on_request_is_not_restarted(child: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    proc = supervise(child, "stopped-by-request", run_dir)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    assert len(starts(run_dir)) == 1


def test_a_stop_signal_during_the_backoff_ends_the_supervision(child: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    command = [sys.executable, "-m", "killsafe", "run", "--backoff", "120", "--max-backoff", "120"]
    command += ["--", sys.executable, str(child), "always-fail", "--dir", str(run_dir)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: "restarts" in json.loads((run_dir / "run.json").read_text()))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert len(starts(run_dir)) == 1


def test_the_command_may_follow_without_a_double_dash(child: Path, tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path)
    command = [sys.executable, "-m", "killsafe", "run", "--backoff", "0"]
    command += [sys.executable, str(child), "crash-twice", "--dir", str(run_dir)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(json.loads((run_dir / "run.json").read_text())["restarts"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run"], "no command given"),
        (["run", "--", "no-such-command-killsafe"], "command not found"),
        (["run", "--max-restarts", "-1", "--", "true"], "--max-restarts must be 0 or more"),
        (["run", "--backoff", "soon", "--", "true"], "invalid float value"),
    ],
)
def test_bad_usage_exits_2_with_one_line(argv: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "killsafe", *argv], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_classify_separates_finished_stopped_and_crashed() -> None:
    assert classify(ChildExit(0), stop_forwarded=False, run_stopped=False) == "finished"
    assert classify(ChildExit(1), stop_forwarded=False, run_stopped=False) == "crashed"
    assert classify(ChildExit(-9), stop_forwarded=False, run_stopped=False) == "crashed"
    assert classify(ChildExit(-15), stop_forwarded=True, run_stopped=False) == "stopped"
    assert classify(ChildExit(-15), stop_forwarded=False, run_stopped=False) == "stopped"
    assert classify(ChildExit(-11), stop_forwarded=False, run_stopped=False) == "crashed"
    assert classify(ChildExit(2), stop_forwarded=False, run_stopped=True) == "stopped"


def test_child_exit_reports_codes_as_shells_do() -> None:
    assert ChildExit(-9).exit_code == 137
    assert ChildExit(-9).signal == signal.SIGKILL
    assert ChildExit(3).exit_code == 3
    assert ChildExit(3).signal is None


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_delay(n, 0.5, 3.0) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_run_dir_from_command_reads_both_flag_forms() -> None:
    assert run_dir_from_command(["python", "t.py", "--dir", "runs/a"]) == Path("runs/a")
    assert run_dir_from_command(["python", "t.py", "--dir=runs/b"]) == Path("runs/b")
    assert run_dir_from_command(["python", "t.py"]) is None


def test_run_dir_from_command_knows_the_demo() -> None:
    python = sys.executable
    assert run_dir_from_command(["killsafe", "demo", "runs/x"]) == Path("runs/x")
    assert run_dir_from_command([python, "-m", "killsafe", "demo", "--steps", "9", "d"]) == Path(
        "d"
    )
    assert run_dir_from_command(["/usr/bin/killsafe", "demo", "--no-serve"]) == Path("runs/demo")
    assert run_dir_from_command(["killsafe", "list", "runs/x"]) is None


KILLSAFE_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import killsafe

    run_dir = sys.argv[1]
    start = int(os.environ["KILLSAFE_RESTARTS"]) + 1
    crash_at = {1: 37, 2: 71}.get(start)
    with killsafe.Run(run_dir, total_steps=100, save_every_steps=10, progress=False) as run:
        totals = {"sum": 0}
        run.track(totals=totals)
        for step in run.steps():
            if step == crash_at:
                os._exit(1)  # a crash: no checkpoint, no clean-up
            totals["sum"] += step
            run.log(value=step)
    print(json.dumps(run.state["totals"]))
    """
)


def test_a_killsafe_run_crashing_twice_ends_as_if_never_interrupted(tmp_path: Path) -> None:
    pytest.importorskip("killsafe.run")
    script = tmp_path / "train.py"
    script.write_text(KILLSAFE_CHILD)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "killsafe", "run", "--backoff", "0", "--dir", str(run_dir)]
    command += ["--", sys.executable, str(script), str(run_dir)]
    out = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["sum"] == sum(range(100))
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished"
    assert [r["attempt"] for r in run["restarts"]] == [1, 2]
    # Saves are asynchronous: the one submitted at step 30 (70) may still be in
    # flight when the crash comes, but the one before it was waited for.
    starts = [s["start_step"] for s in run["sessions"]]
    assert starts[0] == 0 and starts[1] in (20, 30) and starts[2] in (60, 70), starts


def test_the_restart_notice_starts_a_new_line_after_an_open_line_in_a_log(
    child: Path, tmp_path: Path
) -> None:
    for behaviour in ("open-line-then-crash-once", "whole-line-then-crash-once"):
        (tmp_path / behaviour).mkdir()
        run_dir = make_run_dir(tmp_path / behaviour)
        log = tmp_path / f"{behaviour}.log"
        command = [sys.executable, "-m", "killsafe", "run", "--backoff", "0.01", "--"]
        command += [sys.executable, str(child), behaviour, "--dir", str(run_dir)]
        with open(log, "w") as out:  # as `killsafe run ... > log 2>&1` opens it: write-only
            assert subprocess.run(command, stdout=out, stderr=out, timeout=60).returncode == 0
        lines = log.read_text().splitlines()
        assert lines[0] == "step 1 rss=323.9MiB", lines
        assert lines[1].startswith("killsafe run: ") and "restarting in" in lines[1], lines
        assert lines[2] == "step 2 rss=323.9MiB", lines


def test_the_restart_notice_starts_a_new_line_on_a_terminal(child: Path, tmp_path: Path) -> None:
    pyte = pytest.importorskip("pyte")
    run_dir = make_run_dir(tmp_path)
    screen = pyte.Screen(200, 12)
    stream = pyte.ByteStream(screen)
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 12, 200, 0, 0))
    command = [sys.executable, "-m", "killsafe", "run", "--backoff", "0.01", "--"]
    command += [sys.executable, str(child), "open-line-then-crash-once", "--dir", str(run_dir)]
    proc = subprocess.Popen(command, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not chunk:
            break
        stream.feed(chunk)
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    shown = [line.rstrip() for line in screen.display if line.strip()]
    assert shown[0] == "step 1 rss=323.9MiB", shown
    assert shown[1].startswith("killsafe run: ") and "restarting in" in shown[1], shown
    assert shown[2].startswith("step 2 rss=323.9MiB"), shown
    assert not screen.cursor.hidden
