"""What was written under the project's former name, ``resumable``, still works.

``tests/fixtures/resumable-0.1`` was written by resumable 0.1 (the last release
under that name): a finished ``Run`` directory (a ``Linear(4, 2)`` model and
its SGD optimizer, checkpoints at steps 3 and 6), a ``CheckpointStore`` with
two checkpoints and a ``Journal`` with a compacted checkpoint and records
after it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli_in_process, cli_json_in_process

import killsafe
from killsafe import environment
from killsafe.journal import Journal

FIXTURE = Path(__file__).parent / "fixtures" / "resumable-0.1"


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A private copy of the fixture, so that no test changes the committed files."""
    copy = tmp_path / "old"
    shutil.copytree(FIXTURE, copy)
    return copy


def test_the_old_root_error_is_the_new_one() -> None:
    assert killsafe.ResumableError is killsafe.KillsafeError
    with pytest.raises(killsafe.ResumableError):
        raise killsafe.CheckpointNotFound("x")


def test_an_old_store_lists_loads_and_verifies(old: Path) -> None:
    store = killsafe.CheckpointStore(old / "store")
    infos = store.list()
    assert [(i.step, i.name) for i in infos] == [(7, None), (9, "named")]
    assert infos[0].metrics == {"pnl": 1.5}
    state = store.load(7)
    assert state["cash"] == 1000.5 and state["positions"] == {"AAPL": 3}
    assert [float(v) for v in state["w"]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert store.load("named")["positions"] == {"AAPL": 4}
    for info in infos:
        store.verify(info.step if info.name is None else info.name)


def test_a_new_save_beside_old_checkpoints_says_killsafe(old: Path) -> None:
    store = killsafe.CheckpointStore(old / "store")
    info = store.save({"cash": 1.0}, step=10)
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["format"] == "killsafe"
    assert store.latest() is not None and store.latest().step == 10  # type: ignore[union-attr]


def test_the_command_line_reads_an_old_run(old: Path) -> None:
    listed = cli_json_in_process("list", old / "run")
    assert [row["step"] for row in listed["checkpoints"]] == [3, 6]
    out = cli_in_process("verify", old / "run")
    assert out.returncode == 0, out.stderr
    out = cli_in_process("inspect", old / "run" / "checkpoints" / "step-000006")
    assert out.returncode == 0, out.stderr
    assert "model.weight" in out.stdout
    out = cli_in_process("report", old / "run")
    assert out.returncode == 0, out.stderr


def test_an_old_run_resumes_and_continues(old: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = killsafe.CheckpointStore(old / "run" / "checkpoints").load(6)
    steps = []
    with killsafe.Run(old / "run", total_steps=9, save_every_steps=3) as run:
        run.track(model=model, optimizer=optimizer)
        assert run.resumed_from is not None and run.resumed_from.step == 6
        assert torch.equal(model.weight, saved["model"]["weight"])
        for step in run.steps():
            steps.append(step)
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
    assert steps == [6, 7, 8]
    assert run.exit_reason == "finished"
    sessions = json.loads((old / "run" / "run.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0]["end_step"] == 6


def test_an_old_journal_replays(old: Path) -> None:
    with Journal(old / "journal") as journal:
        assert journal.replay().latest() == {"tick": 5, "cash": 95.0}
        journal.append({"tick": 6, "cash": 94.0})
    with Journal(old / "journal") as journal:
        assert journal.replay().latest() == {"tick": 6, "cash": 94.0}


def test_an_old_environment_variable_works_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KILLSAFE_DIRECT_IO", raising=False)
    monkeypatch.setenv("RESUMABLE_DIRECT_IO", "0")
    monkeypatch.setattr(environment, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="killsafe"):
        assert environment.getenv("DIRECT_IO") == "0"
        assert environment.getenv("DIRECT_IO") == "0"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "RESUMABLE_DIRECT_IO is deprecated" in messages[0]
    assert "KILLSAFE_DIRECT_IO" in messages[0]


def test_the_new_environment_variable_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESUMABLE_RESUME", "never")
    monkeypatch.setenv("KILLSAFE_RESUME", "auto")
    assert environment.getenv("RESUME") == "auto"
    monkeypatch.delenv("KILLSAFE_RESUME")
    monkeypatch.delenv("RESUMABLE_RESUME")
    assert environment.getenv("RESUME", "fallback") == "fallback"


def test_old_resume_variable_steers_a_real_run(old: Path) -> None:
    """RESUMABLE_RESUME=never in a child process: a fresh start, and one warning line."""
    code = (
        "import killsafe, sys\n"
        f"with killsafe.Run({str(old / 'store-run')!r}, total_steps=2) as run:\n"
        "    run.track(state=killsafe.RNGState())\n"
        "    for _ in run.steps(): pass\n"
        "print('resumed', run.resumed_from)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILLSAFE_")}
    env["RESUMABLE_RESUME"] = "never"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "resumed None" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "deprecated" in line]
    assert warnings == [
        "RESUMABLE_RESUME is deprecated and will stop working in the next release: "
        "set KILLSAFE_RESUME instead"
    ]
