"""Progress, history mirrors and the report of real runs in real processes.

A child process runs a loop under ``Run``; the test stops it with real signals,
a time limit or an exception, kills it with SIGKILL, resumes it, and reads what
it left behind: the plain progress lines, ``status.json``, ``metrics.csv``, the
TensorBoard mirror and ``report.txt``/``report.json``/``report.png``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from report_helpers import PNG_MAGIC, wait_for_png

pytestmark = pytest.mark.slow

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None

# argv: run_dir, mode, total_steps, hold_at (the step inside which to wait), tensorboard
JOB = """
import json, sys, time
from pathlib import Path
import killsafe

run_dir, mode, total, hold_at, tensorboard = sys.argv[1:6]
total, hold_at = int(total), int(hold_at)
marks = Path(run_dir + ".marks")
marks.mkdir(exist_ok=True)
options = dict(
    total_steps=total, save_every_steps=5, best=("loss", "min"), save_metrics=True,
    tensorboard=tensorboard == "1", progress_every=0.05, keyboard=False, async_save=False,
)
if mode == "time-limit":
    options["stop_after"] = 0.3
with killsafe.Run(run_dir, **options) as run:
    run.track(tally={"games": 0})
    tally = run.state["tally"]
    run.set_phase("self-play")
    for step in run.steps():
        tally["games"] += 2
        run.count("games", tally["games"], total=2 * total)
        run.log(loss=1.0 / (step + 1), win_rate=step / total)
        if mode == "error" and step + 1 == hold_at:
            raise RuntimeError(f"boom in step {step + 1}")
        if mode == "time-limit":
            time.sleep(0.01)
        if step + 1 == hold_at and mode in ("hold", "forced"):
            (marks / "holding").write_text(str(step + 1))
            while not run.should_stop:
                time.sleep(0.005)
            (marks / "stopping").write_text(str(step + 1))
            while mode == "forced":  # ignore the stop: only a second Ctrl+C ends it
                time.sleep(0.005)
    run.summary(parameters=1234, hidden_nodes=16)
"""


class Job:
    """One session of the child run."""

    def __init__(
        self,
        run_dir: Path,
        mode: str,
        *,
        total: int = 30,
        hold_at: int = 0,
        tensorboard: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.marks = Path(str(run_dir) + ".marks")
        for mark in ("holding", "stopping"):
            (self.marks / mark).unlink(missing_ok=True)
        script = run_dir.parent / "job.py"
        script.write_text(JOB)
        argv = [str(run_dir), mode, str(total), str(hold_at), "1" if tensorboard else "0"]
        self.process = subprocess.Popen(
            [sys.executable, str(script), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_for(self, mark: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.marks / mark).exists():
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                raise AssertionError(f"the job ended before {mark!r}:\n{err}")
            assert time.monotonic() < deadline, f"no {mark!r} mark after {timeout}s"
            time.sleep(0.01)

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def finish(self, expect_rc: int | None = 0, timeout: float = 60.0) -> str:
        """Wait for the end; returns stderr."""
        _, err = self.process.communicate(timeout=timeout)
        if expect_rc is not None:
            assert self.process.returncode == expect_rc, err
        return err


def report_cli(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "killsafe", "report", str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def tokens(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def red_pixels(path: Path) -> int:
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(str(path))[..., :3]
    tab_red = np.array([214, 39, 40]) / 255.0
    return int((np.abs(image - tab_red).max(axis=-1) < 0.05).sum())


def load_report(run_dir: Path) -> dict[str, Any]:
    report = json.loads((run_dir / "report.json").read_text())
    text = (run_dir / "report.txt").read_text()
    assert text.startswith(f"killsafe report: {run_dir}\n")
    assert wait_for_png(run_dir).read_bytes()[:8] == PNG_MAGIC  # drawn after the exit
    return report


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_a_run_stopped_killed_and_resumed_leaves_a_continuous_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    # Session 1: SIGTERM inside step 12; the stop checkpoint is at step 12.
    job = Job(run_dir, "hold", hold_at=12, tensorboard=True)
    job.wait_for("holding")
    running = report_cli(run_dir)  # a run still going in another process
    assert running.returncode == 0, running.stderr
    assert "status:            running" in running.stdout
    assert "still running" in running.stdout
    job.send(signal.SIGTERM)
    err = job.finish()
    progress_lines = [line for line in err.splitlines() if line.startswith("progress ")]
    last = tokens(progress_lines[-1])
    assert last["step"] == "12/30" and last["phase"] == "self-play"
    assert last["games"] == "24/60" and last["loss"] == "0.08333"
    assert last["best_loss"] == "0.08333@12" and last["ckpt_age"].endswith("s")
    assert last["cpu"].endswith("%") and last["rss"].endswith("B")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["phase"] == "self-play"
    assert status["counters"]["games"]["value"] == 24
    assert status["counters"]["games"]["total"] == 60
    assert status["best"]["loss"] == {"value": pytest.approx(1 / 12), "step": 12}
    # Not named in best=, but its name says higher is better.
    assert status["best"]["win_rate"] == {"value": pytest.approx(11 / 30), "step": 12}
    assert last["best_win_rate"] == "0.3667@12"
    assert status["last_checkpoint"]["step"] == 12
    assert status["resources"]["rss_bytes"] > 0
    first = load_report(run_dir)
    assert first["status"] == "stopped" and first["exit_reason"] == "signal:SIGTERM"

    # Session 2: resumed at 12, killed with SIGKILL inside step 18 (checkpoint at 15).
    job = Job(run_dir, "hold", hold_at=18, tensorboard=True)
    job.wait_for("holding")
    job.send(signal.SIGKILL)
    job.finish(expect_rc=-signal.SIGKILL)
    killed = report_cli(run_dir, "--json")
    assert killed.returncode == 0, killed.stderr
    report = json.loads(killed.stdout)
    assert report["status"] == "interrupted" and report["sessions"][-1]["status"] == "interrupted"
    assert read_csv(run_dir / "metrics.csv")[-1][0] == "18"

    # Session 3: resumed at 15 (steps 16..18 are dropped and run again), runs to the end.
    job = Job(run_dir, "run", tensorboard=True)
    job.finish()
    report = load_report(run_dir)
    assert report["status"] == "finished" and report["exit_reason"] == "finished"
    sessions = report["sessions"]
    assert [(s["start_step"], s["end_step"]) for s in sessions] == [(0, 12), (12, 15), (15, 30)]
    assert [s["status"] for s in sessions] == ["stopped", "interrupted", "finished"]
    assert sessions[1]["resumed_from"].endswith("step-000012")
    assert sessions[2]["resumed_from"].endswith("step-000015")
    assert report["steps"]["final"] == 30 and report["steps"]["all_sessions"] == 30
    durations = [s["duration"] for s in sessions]
    assert report["duration"]["all_sessions"] == pytest.approx(sum(durations))
    assert report["duration"]["this_session"] == durations[-1]
    assert report["throughput"]["steps_per_second"] > 0
    games = report["throughput"]["counters"]["games"]
    assert games["value"] == 60 and games["total"] == 60 and games["per_second"] > 0
    assert report["resources"]["peak_rss_bytes"] > 0
    assert report["resources"]["cpu_percent_average"] is not None
    assert report["metrics"]["final"]["loss"] == pytest.approx(1 / 30)
    assert report["metrics"]["best"]["loss"]["step"] == 30
    assert report["metrics"]["best"]["win_rate"]["step"] == 30  # a "win" metric is maximised
    status = json.loads((run_dir / "status.json").read_text())
    assert status["best"]["win_rate"] == {"value": pytest.approx(29 / 30), "step": 30}
    assert report["history"] == {
        "records": 30,
        "first_step": 1,
        "last_step": 30,
        "metrics": ["loss", "win_rate"],
        "continuous": True,
    }
    kept = report["checkpoints"]
    assert [(c["step"], c["reason"]) for c in kept][-3:] == [
        (20, "periodic"),
        (25, "periodic"),
        (30, "finished"),
    ]
    assert all(c["size"] > 0 for c in kept)
    assert report["latest_checkpoint"].endswith("step-000030")
    assert report["best_checkpoint"].endswith("step-000030")
    assert report["summary"] == {"parameters": 1234, "hidden_nodes": 16}
    text = (run_dir / "report.txt").read_text()
    assert "sessions:          3" in text and "history:           30 records, steps 1..30" in text
    assert "step-000030  step=30  reason=finished  size=" in text
    assert "  parameters: 1234" in text
    assert red_pixels(run_dir / "report.png") > 50  # the two resumes are marked

    # metrics.csv went on across the resumes: every step once, session 3's values for 16..18.
    rows = read_csv(run_dir / "metrics.csv")
    assert rows[0] == ["step", "time", "loss", "win_rate"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 31))
    exported = report_cli(run_dir, "--csv", "-")
    assert exported.returncode == 0 and exported.stdout.splitlines() == [",".join(r) for r in rows]

    # The TensorBoard mirror too: one point a step, the dropped steps purged.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in points] == list(range(1, 31))
    assert points[-1][1] == pytest.approx(1 / 30)


@pytest.mark.parametrize(
    ("mode", "sig", "reason", "status", "rc"),
    [
        ("hold", signal.SIGINT, "keyboard", "stopped", 0),
        ("forced", signal.SIGINT, "keyboard:forced", "stopped", -signal.SIGINT),
        ("time-limit", None, "time-limit", "stopped", 0),
        ("error", None, "error", "failed", 1),
    ],
)
def test_every_kind_of_exit_writes_the_report(
    tmp_path: Path, mode: str, sig: signal.Signals | None, reason: str, status: str, rc: int
) -> None:
    run_dir = tmp_path / "run"
    total = 100_000 if mode == "time-limit" else 30
    job = Job(run_dir, mode, total=total, hold_at=7)
    if sig is not None:
        job.wait_for("holding")
        job.send(sig)
    if mode == "forced":
        job.wait_for("stopping")
        job.send(sig)  # the second Ctrl+C: out at once, no checkpoint
    job.finish(expect_rc=rc)
    report = load_report(run_dir)
    assert report["status"] == status and report["exit_reason"] == reason
    assert report["sessions"][0]["exit_reason"] == reason
    assert report["duration"]["this_session"] > 0
    final = report["steps"]["final"]
    if mode == "time-limit":
        assert 0 < final < total and final == report["history"]["last_step"]
    else:
        # Step 7 logged; an exception or a second Ctrl+C leaves it unfinished.
        assert final == (7 if mode == "hold" else 6)
        assert report["history"]["last_step"] == 7
    saved = [(c["step"], c["reason"]) for c in report["checkpoints"]]
    if mode in ("hold", "time-limit"):
        assert saved[-1] == (final, reason)  # the stop checkpoint
        assert report["latest_checkpoint"].endswith(f"step-{final:06d}")
    else:
        assert all(step < final for step, _ in saved)  # no checkpoint at the failing step
    assert f"status:            {status} ({reason})" in (run_dir / "report.txt").read_text()


def test_summary_after_the_run_rewrites_the_report(tmp_path: Path) -> None:
    from killsafe import Run

    with Run(tmp_path / "run", total_steps=3, progress=False, keyboard=False) as run:
        for _ in run.steps():
            run.log(loss=0.5)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["summary"] == {}
    run.summary(test_accuracy=0.91)  # a final evaluation after the loop
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["summary"] == {"test_accuracy": 0.91}
    assert "  test_accuracy: 0.91" in (tmp_path / "run" / "report.txt").read_text()


def test_tensorboard_without_the_package_is_refused_by_run_in_one_line(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['tensorboard'] = None\n"
        "import importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'tensorboard' else real(n, *a)\n"
        "import killsafe\n"
        "killsafe.Run(sys.argv[1], tensorboard=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("killsafe.errors.ConfigError: tensorboard=True needs the tensorboard")
    assert "pip install tensorboard" in last
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_preflight_of_a_run_checks_its_tracked_state_and_stops_on_no_go(tmp_path: Path) -> None:
    from killsafe import Run

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"x": i, "y": i % 2}) + "\n" for i in range(40)))
    with Run(tmp_path / "run", total_steps=1, keep_last=2, progress=False, keyboard=False) as run:
        run.track(weights=[0.5, -0.0, 1e-300], name="exp")
        preflight = run.preflight(
            requires=["rich"],
            jsonl=[{"path": data, "required": ["x", "y"], "balance": "y"}],
            checks={"one batch loads": lambda: None},
        )
        result = preflight.run()
        assert result.ok, result.format_table()
        names = [row.name for row in result.rows]
        assert names == [
            "directory writable",
            "free disk",
            "existing checkpoints",
            "package rich",
            f"jsonl {data}",
            "save/load round trip",
            "one batch loads",
        ]
        disk = next(row for row in result.rows if row.name == "free disk")
        assert "(4 checkpoints of ~" in disk.detail  # keep_last 2 + 2
        out = io.StringIO()
        assert preflight.run_or_exit(stream=out).ok
        assert out.getvalue().splitlines()[-1] == "GO: 7 checks, none failed"
        preflight.add("model builds", lambda: "CUDA out of memory")
        with pytest.raises(SystemExit) as stop:
            preflight.run_or_exit(stream=out)
        assert stop.value.code == 1
        assert out.getvalue().splitlines()[-1] == "NO-GO: 1 of 8 checks failed (model builds)"
        run.stop("preflight")


def test_preflight_keep_all_checks_room_for_at_least_three(tmp_path: Path) -> None:
    from killsafe.preflight import Preflight

    rows = Preflight(tmp_path, state_size=1000, keep_last=None).run().rows
    disk = next(row for row in rows if row.name == "free disk")
    assert disk.status == "ok" and "keep_last=None keeps all: at least" in disk.detail
    assert "(3 checkpoints of ~1000 B)" in disk.detail


def test_a_stale_status_of_a_live_process_on_this_host_is_still_running(tmp_path: Path) -> None:
    from killsafe.report import build_report, format_text
    from killsafe.rundir import this_host, write_json_atomic

    updated = time.time()  # this process is older than its status
    line = json.dumps({"step": 1, "time": updated - 20, "loss": 1})
    (tmp_path / "history.jsonl").write_text(line + "\n")
    write_json_atomic(
        tmp_path / "run.json",
        {"sessions": [{"pid": os.getpid(), "started": updated - 20}], "status": "running"},
    )
    status = {"pid": os.getpid(), "host": this_host(), "updated": updated, "state": "running"}
    write_json_atomic(tmp_path / "status.json", status)
    now = updated + 40  # forty seconds inside one step: the status went stale
    report = build_report(tmp_path, now=now)
    assert report["status"] == "running" and report["attached"] is True
    assert "still running (in a long step: no status update for 40s)" in format_text(report)

    # The same files with a pid that started after the status was written: not this run.
    status["updated"] = 1_000_000.0
    write_json_atomic(tmp_path / "status.json", status)
    assert build_report(tmp_path, now=now)["status"] == "interrupted"


def test_best_values_are_kept_for_metrics_whose_names_say_which_way(tmp_path: Path) -> None:
    from killsafe import Run

    with Run(tmp_path / "run", total_steps=4, progress=False, keyboard=False) as run:
        for step in run.steps():
            run.log(lr=0.1 * step, val_acc=[0.5, 0.9, 0.7, 0.8][step])
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["best"] == {"val_acc": {"value": 0.9, "step": 2}}  # lr has no direction
    with Run(tmp_path / "run", total_steps=6, progress=False, keyboard=False) as run:
        for step in run.steps():
            run.log(lr=0.1 * step, val_acc=0.6)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["best"] == {"val_acc": {"value": 0.9, "step": 2}}  # carried by the checkpoint


def test_status_json_stays_fresh_inside_a_long_step(tmp_path: Path, monkeypatch: Any) -> None:
    from killsafe import Run, rundir

    monkeypatch.setattr(rundir, "STATUS_INTERVAL", 0.05)
    status_path = tmp_path / "run" / "status.json"

    def status() -> dict[str, Any]:
        return json.loads(status_path.read_text())

    with Run(tmp_path / "run", total_steps=2, progress=False, keyboard=False) as run:
        for step in run.steps():
            if step == 1:  # a long evaluation: the loop writes nothing meanwhile
                beat = run._heartbeat
                run.set_phase("evaluation")
                for done in (1, 2):
                    run.count("evaluations", done, total=2)
                    before = status()["updated"]
                    deadline = time.monotonic() + 30
                    while status()["updated"] == before:
                        assert time.monotonic() < deadline, "status.json went stale"
                        time.sleep(0.01)
                    seen = status()
                    assert seen["state"] == "running" and seen["phase"] == "evaluation"
                    assert seen["counters"]["evaluations"]["value"] == done
                assert rundir.is_attached(status())
    assert beat is not None and not beat.is_alive()
    assert status()["state"] == "finished"
