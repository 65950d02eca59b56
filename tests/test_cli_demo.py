"""``resumable demo``: a real training run, stopped with Ctrl+C (SIGINT) and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, cli

STEPS = 400


def demo_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "resumable", "demo", str(run_dir), "--steps", str(STEPS)]


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("step-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def test_the_demo_stops_on_ctrl_c_and_the_same_command_finishes_it(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("resumable.run")
    run_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*demo_command(run_dir), "--no-serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "stopped", run
    stopped_at = run["sessions"][-1]["end_step"]
    assert 0 < stopped_at < STEPS
    assert f"resumable demo {run_dir}" in out  # what to try next, with the real directory
    assert f"resumable report {run_dir}" in out

    again = subprocess.run(demo_command(run_dir), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished"
    assert [s["start_step"] for s in run["sessions"]] == [0, stopped_at]
    steps = [json.loads(line)["step"] for line in (run_dir / "history.jsonl").open()]
    assert len(steps) == len(set(steps)) == STEPS  # every step once: nothing lost or redone
    assert (run_dir / "report.txt").exists()
    assert f"({run_dir} is finished)" in again.stdout


def test_the_demo_without_torch_says_how_to_install_it(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None; from resumable.cli import main; "
        f"raise SystemExit(main(['demo', {str(tmp_path / 'demo')!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert_one_line_error(out, 2, "pip install -c constraints.txt -e '.[torch]'")
    assert not (tmp_path / "demo").exists()


def test_the_demo_refuses_a_file_as_its_directory(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert_one_line_error(cli("demo", a_file, "--steps", "10"), 2, "is a file")
