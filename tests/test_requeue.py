"""``Run(requeue=True)``: a SLURM job preempted by a signal is requeued after its checkpoint.

A stand-in ``scontrol`` on PATH records how it was called and which
checkpoints existed at that moment, so the tests see that the requeue came
after the emergency checkpoint was committed.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
from pathlib import Path

import pytest

import killsafe
from killsafe.errors import ConfigError
from killsafe.run.requeue import requeue_slurm_job, should_requeue, slurm_job_id

STAND_IN = """#!/bin/sh
echo "$@" >> "{log}"
ls "{checkpoints}" >> "{log}"
{tail}
"""


def stand_in_scontrol(tmp_path: Path, run_dir: Path, tail: str = "exit 0") -> Path:
    """Put a fake ``scontrol`` first on PATH; returns the log it writes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "scontrol.log"
    script = bin_dir / "scontrol"
    script.write_text(STAND_IN.format(log=log, checkpoints=run_dir / "checkpoints", tail=tail))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return log


@pytest.fixture(autouse=True)
def slurm_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored after each test
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)


def train(run_dir: Path, *, stop_at: int, how: str, requeue: bool = True) -> killsafe.Run:
    with killsafe.Run(
        run_dir,
        total_steps=20,
        save_every_steps=100,
        signals=("SIGUSR1",),
        requeue=requeue,
        stop_after="1h" if how != "time-limit" else None,
        keyboard=False,
        progress=False,
        report=False,
    ) as run:
        state = run.track(done=[])
        for step in run.steps():
            state["done"].append(step)
            if step == stop_at:
                if how == "usr1":
                    os.kill(os.getpid(), signal.SIGUSR1)
                elif how == "stop":
                    run.stop()
    return run


def test_a_signal_saves_then_requeues_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    log = stand_in_scontrol(tmp_path, run_dir)
    caplog.set_level("INFO", logger="killsafe")
    run = train(run_dir, stop_at=6, how="usr1")
    assert run.exit_code == 75 and run.exit_reason == "signal:SIGUSR1"
    called, listed = log.read_text().splitlines()
    assert called == "requeue 4242"
    assert listed == f"step-{run.step:06d}"  # committed before scontrol ran
    assert "requeued SLURM job 4242" in caplog.text
    resumed = train(run_dir, stop_at=-1, how="none", requeue=False)
    assert resumed.finished and resumed.state["done"] == list(range(20))


def test_a_stop_the_user_asked_for_is_not_requeued(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log = stand_in_scontrol(tmp_path, run_dir)
    run = train(run_dir, stop_at=3, how="stop")
    assert run.exit_code == 75
    assert not log.exists()


def test_a_finished_run_or_requeue_false_is_not_requeued(tmp_path: Path) -> None:
    log = stand_in_scontrol(tmp_path, tmp_path / "a")
    assert train(tmp_path / "a", stop_at=-1, how="none").finished
    assert train(tmp_path / "b", stop_at=4, how="usr1", requeue=False).exit_code == 75
    assert not log.exists()


def test_a_failed_requeue_is_one_line_and_the_stop_stands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    stand_in_scontrol(
        tmp_path, run_dir, tail='echo "slurm_requeue error: Access denied" >&2; exit 1'
    )
    caplog.set_level("INFO", logger="killsafe")
    run = train(run_dir, stop_at=2, how="usr1")
    assert run.exit_code == 75
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("requeue")]
    assert lines == [
        "requeue of SLURM job 4242 failed: scontrol: slurm_requeue error: Access denied; "
        "submit it again"
    ]


def test_requeue_without_slurm_or_scontrol_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "scontrol is not on PATH" in requeue_slurm_job()
    assert "SLURM_JOB_ID is not set" in requeue_slurm_job({})


def test_an_array_task_is_requeued_by_its_array_id() -> None:
    assert (
        slurm_job_id({"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"})
        == "5_2"
    )
    assert slurm_job_id({"SLURM_JOB_ID": "7"}) == "7"


@pytest.mark.parametrize(
    ("reason", "requeued"),
    [
        ("signal:SIGTERM", True),
        ("signal:SIGUSR1", True),
        ("time-limit", True),
        ("keyboard", False),
        ("request", False),
        ("early-stop", False),
        ("finished", False),
        (None, False),
    ],
)
def test_which_stops_are_requeued(reason: str | None, requeued: bool) -> None:
    assert should_requeue(reason) is requeued


def test_the_flag_and_a_bad_value(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    killsafe.add_arguments(parser, directory=str(tmp_path))
    assert killsafe.Run.from_args(parser.parse_args(["--requeue"]))._config.requeue is True
    assert killsafe.Run.from_args(parser.parse_args([]))._config.requeue is False
    with pytest.raises(ConfigError, match="requeue='yes'"):
        killsafe.Run(tmp_path, requeue="yes")  # type: ignore[arg-type]
