"""The report of a run directory: finished, interrupted and resumed, running, damaged."""

from __future__ import annotations

import argparse
import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from killsafe.errors import CheckpointNotFound, ConfigError
from killsafe.history import History
from killsafe.report import (
    add_cli_arguments,
    build_report,
    format_text,
    list_checkpoints,
    plot_history,
    run_cli,
    write_report,
)
from killsafe.rundir import write_json_atomic
from killsafe.store import CheckpointStore

T0 = 1_780_000_000.0  # a fixed wall-clock origin for the fake runs


def write_checkpoint(
    run_dir: Path, step: int, reason: str, metrics: dict[str, Any], size: int
) -> Path:
    """Commit a real checkpoint of ``size`` payload bytes through the store."""
    import numpy as np

    store = CheckpointStore(run_dir / "checkpoints")
    try:
        state = {"weights": np.frombuffer(os.urandom(size), dtype=np.uint8).copy()}
        info = store.save(state, step=step, reason=reason, metrics=metrics)
    finally:
        store.close()
    return info.path


def log_steps(run_dir: Path, steps: range, start_time: float, seconds_per_step: float) -> None:
    clock = iter(start_time + i * seconds_per_step for i in range(1, len(steps) + 1))
    history = History(run_dir, clock=lambda: next(clock))
    for step in steps:
        metrics: dict[str, Any] = {"loss": 1.0 / step}
        if step % 10 == 0:
            metrics["val_loss"] = 2.0 / step + (0.05 if step == 90 else 0.0)
        history.append(step, metrics)


def interrupted_and_resumed_run(run_dir: Path) -> Path:
    """Three sessions: SIGTERM at 40, SIGKILL at 70 (resumed from 60), finished at 100."""
    run_dir.mkdir()
    log_steps(run_dir, range(1, 41), T0, 1.0)
    write_checkpoint(run_dir, 20, "periodic", {"val_loss": 0.1}, 1000)
    write_checkpoint(run_dir, 40, "signal:SIGTERM", {"val_loss": 0.05}, 1000)

    s2 = T0 + 100
    History(run_dir).truncate_after(40)
    log_steps(run_dir, range(41, 71), s2, 2.0)  # killed at step 70, last log at s2 + 60
    write_checkpoint(run_dir, 60, "periodic", {"val_loss": 2 / 60}, 1000)

    s3 = T0 + 300
    History(run_dir).truncate_after(60)  # steps 61..70 of session 2 are dropped
    log_steps(run_dir, range(61, 101), s3, 0.5)
    write_checkpoint(run_dir, 80, "periodic", {"val_loss": 2 / 80}, 2000)
    write_checkpoint(run_dir, 100, "finished", {"val_loss": 0.02}, 3000)
    run = {
        "run_id": "exp-42",
        "directory": str(run_dir),
        "config": {"total_steps": 100, "best": ["val_loss", "min"], "keep_last": 3},
        "sessions": [
            {
                "pid": 101,
                "host": "node1",
                "started": T0,
                "ended": T0 + 41,
                "start_step": 0,
                "end_step": 40,
                "resumed_from": None,
                "exit_reason": "signal:SIGTERM",
                "status": "stopped",
            },
            {
                "pid": 102,
                "host": "node1",
                "started": s2,
                "ended": None,
                "start_step": 40,
                "end_step": None,
                "resumed_from": str(run_dir / "checkpoints" / "step-000040"),
                "exit_reason": None,
                "status": "running",
            },
            {
                "pid": 103,
                "host": "node1",
                "started": s3,
                "ended": s3 + 21,
                "start_step": 60,
                "end_step": 100,
                "resumed_from": str(run_dir / "checkpoints" / "step-000060"),
                "exit_reason": "finished",
                "status": "finished",
            },
        ],
        "status": "finished",
        "exit_reason": "finished",
        "summary": {"parameters": 12345, "hidden_nodes": 64, "win_rate": 0.625},
    }
    write_json_atomic(run_dir / "run.json", run)
    status = {
        "pid": 103,
        "host": "node1",
        "updated": s3 + 21,
        "state": "finished",
        "step": 100,
        "total_steps": 100,
        "counters": {"games": {"value": 420, "total": 500, "rate": 12.0}},
        "resources": {
            "cpu_percent": 97.0,
            "rss_bytes": 200 * 2**20,
            "peak_rss_bytes": 300 * 2**20,
            "cpu_seconds": 10.5,
            "gpu_memory_bytes": None,
        },
        "best": {"val_loss": {"value": 0.02, "step": 100}},
    }
    write_json_atomic(run_dir / "status.json", status)
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def red_pixels(path: Path) -> int:
    import matplotlib.image

    np = pytest.importorskip("numpy")
    image = matplotlib.image.imread(str(path))[..., :3]
    tab_red = np.array([214, 39, 40]) / 255.0
    return int((np.abs(image - tab_red).max(axis=-1) < 0.05).sum())


def test_report_of_an_interrupted_and_resumed_run(tmp_path: Path) -> None:
    run_dir = interrupted_and_resumed_run(tmp_path / "run")
    report = write_report(run_dir)

    assert report["status"] == "finished" and report["exit_reason"] == "finished"
    assert report["run_id"] == "exp-42"
    sessions = report["sessions"]
    assert [s["start_step"] for s in sessions] == [0, 40, 60]
    # Session 2 was killed: what survives of it ends at the checkpoint it was resumed from.
    assert [s["end_step"] for s in sessions] == [40, 60, 100]
    assert [s["exit_reason"] for s in sessions] == ["signal:SIGTERM", None, "finished"]
    assert [s["status"] for s in sessions] == ["stopped", "interrupted", "finished"]
    assert sessions[1]["ended"] == T0 + 100 + 40  # its last surviving log
    assert [s["duration"] for s in sessions] == [41.0, 40.0, 21.0]
    assert report["started"] == T0 and report["ended"] == T0 + 321
    assert report["duration"] == {"this_session": 21.0, "all_sessions": 102.0}
    assert report["steps"] == {
        "final": 100,
        "total": 100,
        "this_session": 40,
        "all_sessions": 40 + 20 + 40,
    }
    assert report["throughput"]["steps_per_second"] == pytest.approx(40 / 21)
    assert report["throughput"]["steps_per_second_all_sessions"] == pytest.approx(100 / 102)
    games = report["throughput"]["counters"]["games"]
    assert games["per_second"] == 12.0
    assert games["per_second_all_sessions"] == pytest.approx(420 / 102)
    assert report["resources"]["cpu_percent_average"] == pytest.approx(50.0)
    assert report["resources"]["peak_rss_bytes"] == 300 * 2**20

    history = report["history"]
    assert history == {
        "records": 100,
        "first_step": 1,
        "last_step": 100,
        "metrics": ["loss", "val_loss"],
        "continuous": True,
    }
    assert report["metrics"]["final"] == {"loss": 0.01, "val_loss": 0.02}
    assert report["metrics"]["best"]["val_loss"] == {"value": 0.02, "step": 100, "mode": "min"}
    assert report["metrics"]["best"]["loss"]["step"] == 100

    checkpoints = report["checkpoints"]
    assert [(c["step"], c["reason"]) for c in checkpoints] == [
        (20, "periodic"),
        (40, "signal:SIGTERM"),
        (60, "periodic"),
        (80, "periodic"),
        (100, "finished"),
    ]
    assert checkpoints[-1]["size"] > 3000  # payload plus manifest
    assert report["latest_checkpoint"] == str(run_dir / "checkpoints" / "step-000100")
    assert report["best_checkpoint"] == str(run_dir / "checkpoints" / "step-000100")
    assert report["summary"] == {"parameters": 12345, "hidden_nodes": 64, "win_rate": 0.625}

    saved = json.loads((run_dir / "report.json").read_text())
    assert saved["sessions"] == sessions
    assert saved["files"]["png"] == str(run_dir / "report.png")
    text = (run_dir / "report.txt").read_text()
    assert text == format_text(saved)
    width, height = png_size(run_dir / "report.png")
    assert width >= 400 and height >= 200
    assert red_pixels(run_dir / "report.png") > 50  # the resume markers are drawn
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp")]


def test_report_text_names_every_part(tmp_path: Path) -> None:
    run_dir = interrupted_and_resumed_run(tmp_path / "run")
    text = format_text(build_report(run_dir))
    lines = text.splitlines()
    assert lines[0] == f"killsafe report: {run_dir}"
    assert "status:            finished" in lines  # the reason only when it says more
    sessions = [line for line in lines if line.startswith("  #")]
    assert "steps 0->40  stopped  signal:SIGTERM" in sessions[0]
    assert "steps 60->100  finished  resumed from" in sessions[2]
    assert not any("finished  finished" in line or "(finished)" in line for line in lines)
    assert "started:           2026-05-28 20:26:40 UTC" in lines
    assert "duration:          this session 21s, all sessions 1m42s" in lines
    assert "steps:             100/100 (this session 40, all sessions 100)" in lines
    assert any(line.startswith("throughput:") and "games 12/s" in line for line in lines)
    assert "cpu:               50% average of one core this session" in lines
    assert "peak memory:       300.0 MiB" in lines
    assert "best metrics:      loss=0.01@100(min) val_loss=0.02@100(min)" in lines
    assert "sessions:          3" in lines
    assert any("#2" in line and "resumed from" in line and "steps 40->60" in line for line in lines)
    assert "checkpoints:       5 kept" in lines
    assert any("step-000040  step=40  reason=signal:SIGTERM" in line for line in lines)
    assert f"latest checkpoint: {run_dir / 'checkpoints' / 'step-000100'}" in lines
    assert "  parameters: 12345" in lines and "  win_rate: 0.625" in lines
    assert "history:           100 records, steps 1..100" in lines


def test_a_history_with_a_repeated_step_is_flagged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log_steps(run_dir, range(1, 11), T0, 1.0)
    log_steps(run_dir, range(5, 8), T0 + 20, 1.0)  # a resume that did not truncate
    report = build_report(run_dir)
    assert report["history"]["continuous"] is False
    assert "(NOT continuous)" in format_text(report)


def test_report_of_a_run_still_running_in_this_process(tmp_path: Path) -> None:
    import time

    run_dir = tmp_path / "live"
    now = time.time()
    log_steps(run_dir, range(1, 31), now - 30, 1.0)
    write_json_atomic(
        run_dir / "run.json",
        {
            "run_id": "live",
            "config": {"total_steps": 1000},
            "sessions": [{"pid": os.getpid(), "started": now - 30, "start_step": 0}],
            "status": "running",
        },
    )
    write_json_atomic(
        run_dir / "status.json",
        {
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "updated": now,
            "state": "running",
            "step": 30,
            "total_steps": 1000,
        },
    )
    report = write_report(run_dir)
    assert report["status"] == "running" and report["attached"] is True
    assert report["ended"] is None
    assert report["steps"]["final"] == 30 and report["steps"]["total"] == 1000
    assert report["sessions"][0]["status"] == "running"
    assert report["duration"]["this_session"] == pytest.approx(30, abs=5)
    assert "ended:             still running" in (run_dir / "report.txt").read_text()


def test_report_of_a_killed_run_says_interrupted(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    pid = int(dead.stdout)
    run_dir = tmp_path / "killed"
    log_steps(run_dir, range(1, 21), T0, 1.0)
    write_json_atomic(
        run_dir / "run.json",
        {"sessions": [{"pid": pid, "started": T0, "start_step": 0}], "status": "running"},
    )
    write_json_atomic(
        run_dir / "status.json",
        {
            "pid": pid,
            "host": os.uname().nodename,
            "updated": T0 + 18,
            "state": "running",
            "step": 19,
        },
    )
    report = build_report(run_dir, now=T0 + 19)
    assert report["status"] == "interrupted" and report["attached"] is False
    assert report["sessions"][0]["end_step"] == 19
    assert report["sessions"][0]["duration"] == 18.0


def test_report_with_only_a_history(tmp_path: Path) -> None:
    log_steps(tmp_path, range(1, 6), T0, 2.0)
    report = write_report(tmp_path)
    assert report["status"] == "unknown"
    assert report["steps"]["final"] == 5
    assert report["checkpoints"] == [] and report["latest_checkpoint"] is None
    assert report["sessions"][0]["started"] == T0 + 2.0
    png_size(tmp_path / "report.png")
    assert red_pixels(tmp_path / "report.png") == 0  # no resume, no marker


def test_report_with_only_checkpoints(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 5, "periodic", {}, 10)
    write_checkpoint(tmp_path, 10, "request", {}, 10)
    (tmp_path / "checkpoints" / ".tmp-step-000015-abc").mkdir()  # being written: not listed
    broken = tmp_path / "checkpoints" / "step-000020"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    report = write_report(tmp_path)
    assert [c["step"] for c in report["checkpoints"]] == [5, 10]
    assert report["steps"]["final"] == 10
    assert report["sessions"] == []
    text = (tmp_path / "report.txt").read_text()
    assert "sessions:          0" in text and "checkpoints:       2 kept" in text
    png_size(tmp_path / "report.png")  # "no metrics logged"


def test_a_damaged_run_json_leaves_its_part_empty(tmp_path: Path) -> None:
    log_steps(tmp_path, range(1, 4), T0, 1.0)
    (tmp_path / "run.json").write_text('{"run_id": ')
    report = build_report(tmp_path)
    assert report["run_id"] is None and report["history"]["records"] == 3


def test_paths_that_are_not_run_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match="no such run directory"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a run directory"):
        build_report(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        build_report(tmp_path / "file")
    write_checkpoint(tmp_path / "run", 1, "periodic", {}, 1)
    with pytest.raises(ConfigError, match="probably"):
        build_report(tmp_path / "run" / "checkpoints")


def test_list_checkpoints_orders_by_step(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 100, "periodic", {"acc": 0.5}, 100)
    write_checkpoint(tmp_path, 7, "best", {"acc": 0.9}, 100)
    checkpoints = list_checkpoints(tmp_path)
    assert [c["step"] for c in checkpoints] == [7, 100]
    assert checkpoints[0]["metrics"] == {"acc": 0.9}


def test_plot_history_without_a_report_argument(tmp_path: Path) -> None:
    run_dir = interrupted_and_resumed_run(tmp_path / "run")
    out = plot_history(run_dir, tmp_path / "plot.png")
    assert png_size(out)[0] > 0


def cli(*argv: str) -> argparse.Namespace:
    return add_cli_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_prints_text_json_and_csv(tmp_path: Path, capsys: Any) -> None:
    run_dir = interrupted_and_resumed_run(tmp_path / "run")
    assert run_cli(cli(str(run_dir))) == 0
    assert capsys.readouterr().out.startswith(f"killsafe report: {run_dir}\n")
    assert not (run_dir / "report.txt").exists()  # printing does not write

    assert run_cli(cli(str(run_dir), "--json")) == 0
    assert json.loads(capsys.readouterr().out)["steps"]["final"] == 100

    assert run_cli(cli(str(run_dir), "--csv", str(tmp_path / "m.csv"), "--write")) == 0
    capsys.readouterr()
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "time", "loss", "val_loss"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 101))
    assert (run_dir / "report.png").exists()

    assert run_cli(cli(str(run_dir), "--csv", "-")) == 0
    assert capsys.readouterr().out.splitlines()[0] == "step,time,loss,val_loss"


def test_cli_bad_directory_exits_2_with_one_line(tmp_path: Path, capsys: Any) -> None:
    assert run_cli(cli(str(tmp_path / "nope"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such run directory" in err


def test_a_long_history_is_thinned_for_the_plot_but_keeps_its_last_point(tmp_path: Path) -> None:
    from killsafe.report import MAX_PLOT_POINTS, _numeric_series

    history = [{"step": s, "time": T0 + s, "loss": float(s)} for s in range(1, 12_346)]
    ((name, steps, values),) = _numeric_series(history)
    assert name == "loss" and len(steps) <= MAX_PLOT_POINTS + 1
    assert steps[0] == 1 and steps[-1] == 12_345 and values[-1] == 12_345.0
