"""``run.finished`` and ``run.exit_code``: a finish and a stop look different to the shell."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import killsafe
from killsafe import EarlyStopping

SCRIPT = """
import sys, time, killsafe
with killsafe.Run(sys.argv[1], total_steps=int(sys.argv[2]), progress=False) as run:
    run.track(state=killsafe.RNGState())
    for step in run.steps():
        if step == 1:
            print("ready", flush=True)
        time.sleep(0.01)
print("after", run.finished, run.exit_reason, flush=True)
sys.exit(run.exit_code)
"""


def test_a_finished_run_exits_0(tmp_path: Path) -> None:
    with killsafe.Run(tmp_path, total_steps=3, progress=False) as run:
        assert run.exit_code is None and not run.finished
        for _ in run.steps():
            pass
    assert run.finished and run.exit_reason == "finished" and run.exit_code == 0


def test_a_stop_exits_75_and_is_not_a_finish(tmp_path: Path) -> None:
    with killsafe.Run(tmp_path, total_steps=10, progress=False) as run:
        for step in run.steps():
            if step == 2:
                run.stop("enough")
    assert not run.finished and run.exit_code == 75
    assert run.exit_reason is not None and "enough" in run.exit_reason


def test_a_failed_run_exits_1(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), killsafe.Run(tmp_path, total_steps=5, progress=False) as run:
        for step in run.steps():
            if step == 1:
                raise RuntimeError("boom")
    assert run.exit_reason == "error" and run.exit_code == 1 and not run.finished


def test_early_stopping_ends_the_run_with_0(tmp_path: Path) -> None:
    stop = EarlyStopping("loss", patience=1, mode="min")
    with killsafe.Run(tmp_path, total_steps=50, stop_policy=stop, progress=False) as run:
        for _ in run.steps():
            run.log(loss=1.0)
    assert run.exit_reason == "early-stop" and run.exit_code == 0


def test_the_shell_sees_75_after_sigterm_and_0_after_the_resumed_finish(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-c", SCRIPT, str(run_dir), "400"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 75, out
    assert "after False signal:SIGTERM" in out
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "after True finished" in again.stdout
