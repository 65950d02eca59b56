"""``killsafe report`` and ``killsafe preflight``: the front ends the CLI mounts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cli_helpers import (
    assert_one_line_error,
    cli,
    cli_in_process,
    cli_json,
    cli_json_in_process,
    snapshot,
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run's files, written as a run writes them."""
    run = tmp_path / "run"
    run.mkdir()
    now = time.time()
    session = {"pid": 1, "host": "h", "started": now - 60, "ended": now, "start_step": 0}
    session.update(end_step=3, exit_reason="finished", status="finished", resumed_from=None)
    (run / "run.json").write_text(
        json.dumps(
            {
                "run_id": "r1",
                "directory": str(run),
                "config": {"total_steps": 3, "best": ["loss", "min"]},
                "sessions": [session],
                "status": "finished",
                "exit_reason": "finished",
            }
        )
    )
    lines = [{"step": s, "time": now - 30 + s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_report_json_and_text(run_dir: Path) -> None:
    before = snapshot(run_dir)
    report = cli_json_in_process("report", run_dir)
    assert report["status"] == "finished"
    out = cli_in_process("report", run_dir)
    assert out.returncode == 0 and "finished" in out.stdout
    assert snapshot(run_dir) == before  # reading a report writes nothing


def test_report_csv_export(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "metrics.csv"
    out = cli_in_process("report", run_dir, "--csv", target)
    assert out.returncode == 0, out.stderr
    rows = target.read_text().splitlines()
    assert rows[0].startswith("step,time,loss") and len(rows) == 4


def test_report_of_a_missing_directory_is_bad_input(tmp_path: Path) -> None:
    out = cli_in_process("report", tmp_path / "nowhere")
    assert_one_line_error(out, 2, "nowhere")
    assert out.stderr.startswith("killsafe report: error: ")
    (tmp_path / "empty").mkdir()
    out = cli_in_process("report", tmp_path / "empty")
    assert_one_line_error(out, 2, "not a run directory")
    assert out.stderr.startswith("killsafe report: error: ")


def test_preflight_go_and_no_go(tmp_path: Path) -> None:
    result = cli_json("preflight", "--dir", tmp_path / "new-run")
    assert result["ok"] is True
    failed = cli_json(
        "preflight", "--dir", tmp_path, "--require", "no_such_package_killsafe_xyz", expect=1
    )
    assert failed["ok"] is False


def test_preflight_usage_error_exits_2() -> None:
    out = cli("preflight", "--keep-last", "many")
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_preflight_bad_input_is_one_error_line() -> None:
    out = cli("preflight", "--keep-last", "-1")
    assert_one_line_error(out, 2, "--keep-last -1")
    assert out.stderr.startswith("killsafe preflight: error: ")
