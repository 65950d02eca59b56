"""The report at a run's exit: text and JSON before the process ends, the plot after it."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import cli
from report_helpers import PNG_MAGIC, wait_for_png

from killsafe import report as report_module
from killsafe.run import Run
from killsafe.rundir import read_jsonl, write_json_atomic

pytest.importorskip("matplotlib")

JOB = textwrap.dedent(
    """
    import sys, time
    import killsafe
    with killsafe.Run(sys.argv[1], progress=False, keyboard=False, save_every_steps=10**6) as run:
        run.track(weights=[0.0] * 8)
        for step in run.steps():
            run.state["weights"][0] += 1
            run.log(loss=1.0 / (step + 1))
            if step == 20:
                print("ready", flush=True)
            time.sleep(0.005)
    sys.exit(run.exit_code)
    """
)


def test_a_sigterm_exit_commits_the_checkpoint_then_the_report_and_the_plot_follows(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-c", JOB, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert job.stdout is not None and job.stdout.readline() == "ready\n"
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 75  # stopped: run again to resume

    # Complete when the process has ended, and written after the emergency checkpoint.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "stopped" and report["exit_reason"] == "signal:SIGTERM"
    step = report["steps"]["final"]
    assert step > 20
    assert (report["checkpoints"][-1]["step"], report["checkpoints"][-1]["reason"]) == (
        step,
        "signal:SIGTERM",
    )
    assert report["files"]["png"] == str(run_dir / "report.png")
    text = (run_dir / "report.txt").read_text()
    assert "status:            stopped (signal:SIGTERM)" in text
    assert f"step-{step:06d}  step={step}  reason=signal:SIGTERM" in text
    kinds = [event["kind"] for event in read_jsonl(run_dir / "events.jsonl")]
    assert kinds.index("saved") < kinds.index("stopped")

    png = wait_for_png(run_dir)  # drawn by a child that outlived the run
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert json.loads((run_dir / "report.json").read_text()) == report  # left as it was


def finished_run(run_dir: Path) -> Path:
    with Run(run_dir, total_steps=5, progress=False, keyboard=False, report=False) as run:
        for step in run.steps():
            run.log(loss=1.0 / (step + 1))
    report_module.write_report(run_dir)  # inline: the three files, now
    return run_dir


def test_png_only_redraws_the_plot_and_leaves_the_text_alone(tmp_path: Path) -> None:
    run_dir = finished_run(tmp_path / "run")
    (run_dir / "report.png").unlink()
    before = {name: (run_dir / name).read_bytes() for name in ("report.json", "report.txt")}
    out = cli("report", run_dir, "--png-only")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    assert (run_dir / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    both = cli("report", run_dir, "--png-only", "--write")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_a_plot_drawn_for_an_older_report_does_not_replace_the_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = finished_run(tmp_path / "run")
    old_png = (run_dir / "report.png").read_bytes()
    draw = report_module._plot_bytes

    def newer_report_while_drawing(directory: Path, report: dict) -> bytes:
        payload = draw(directory, report)
        write_json_atomic(directory / "report.json", {**report, "generated": 1.0})
        return payload

    monkeypatch.setattr(report_module, "_plot_bytes", newer_report_while_drawing)
    assert report_module.draw_report_png(run_dir) is None
    assert (run_dir / "report.png").read_bytes() == old_png


def test_without_matplotlib_the_exit_writes_text_and_json_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = report_module.importlib.util.find_spec
    monkeypatch.setattr(
        report_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    monkeypatch.setattr(report_module, "start_png_child", lambda _: pytest.fail("no plot child"))
    with caplog.at_level(logging.WARNING, logger="killsafe"):
        report = report_module.write_report(finished_run(tmp_path / "run"), plot="detached")
    assert report["files"]["png"] is None
    assert json.loads((tmp_path / "run" / "report.json").read_text())["files"]["png"] is None
    assert any("pip install matplotlib" in r.getMessage() for r in caplog.records)


def test_a_plot_child_that_cannot_start_leaves_a_truthful_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = finished_run(tmp_path / "run")
    (run_dir / "report.png").unlink()
    monkeypatch.setattr(report_module.sys, "executable", str(tmp_path / "no-python"))
    with caplog.at_level(logging.WARNING, logger="killsafe"):
        report_module.write_report(run_dir, plot="detached")
    assert json.loads((run_dir / "report.json").read_text())["files"]["png"] is None
    assert any("killsafe report" in r.getMessage() for r in caplog.records)
    assert not (run_dir / "report.png").exists()


def test_an_unknown_plot_mode_is_a_config_error(tmp_path: Path) -> None:
    from killsafe.errors import ConfigError

    with pytest.raises(ConfigError, match="plot='later'"):
        report_module.write_report(tmp_path, plot="later")
