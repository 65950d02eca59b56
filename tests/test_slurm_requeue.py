"""The SLURM batch script of docs/distributed.md, run by bash with stand-in srun and scontrol.

SLURM's warning (``--signal=B:USR1@90``) reaches the batch shell, whose
trap forwards it to ``srun`` and so to the training; the run stops with a
checkpoint and exit code 75, and the script requeues the job with
``scontrol requeue $SLURM_JOB_ID``. The requeued job resumes and finishes,
and is not requeued again. The stand-in ``srun`` runs its command as the
one task; the stand-in ``scontrol`` writes its arguments to a file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STOPPED = 75

LOOP = """\
    run.track(done=[])
    for step in run.steps():
        run.state["done"].append(step)
        Path("started").touch()
        time.sleep(0.02)
sys.exit(run.exit_code)
"""

TRAIN = (
    """\
import sys, time
from pathlib import Path
import killsafe

with killsafe.Run("run", total_steps=60, signals=("SIGUSR1",), progress=False) as run:
"""
    + LOOP
)

# The second script of the section: the run requeues itself (--requeue).
TRAIN_WITH_FLAGS = (
    """\
import argparse, sys, time
from pathlib import Path
import killsafe

parser = argparse.ArgumentParser()
killsafe.add_arguments(parser, directory="run")
options = dict(total_steps=60, signals=("SIGUSR1",), progress=False)
with killsafe.Run.from_args(parser.parse_args(), **options) as run:
"""
    + LOOP
)


def batch_script(which: int) -> str:
    page = (ROOT / "docs" / "distributed.md").read_text()
    section = page[page.index("## SLURM") :]
    return re.findall(r"```bash\n(.*?)```", section, re.S)[which]


@pytest.fixture(params=[0, 1], ids=["script-requeues", "run-requeues"])
def job(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, dict[str, str]]:
    """A job directory with the batch script, train.py and the stand-ins on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "srun": '#!/bin/bash\nexec "$@"\n',
        "scontrol": '#!/bin/bash\necho "$@" >> "$SCONTROL_LOG"\n',
        "python": f'#!/bin/bash\nexec "{sys.executable}" "$@"\n',
    }
    for name, text in stand_ins.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    (tmp_path / "train.py").write_text(TRAIN_WITH_FLAGS if request.param else TRAIN)
    (tmp_path / "job.sh").write_text(batch_script(request.param))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    }
    return tmp_path, env


def start(job: tuple[Path, dict[str, str]]) -> subprocess.Popen[str]:
    directory, env = job
    return subprocess.Popen(
        ["bash", "job.sh"],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_the_warning_stops_with_a_checkpoint_and_the_script_requeues_the_job(
    job: tuple[Path, dict[str, str]],
) -> None:
    directory = job[0]
    shell = start(job)
    deadline = time.monotonic() + 60
    while not (directory / "started").exists():
        assert shell.poll() is None and time.monotonic() < deadline, shell.communicate()[0]
        time.sleep(0.05)
    shell.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 sends: to the batch shell
    output, _ = shell.communicate(timeout=60)
    assert shell.returncode == STOPPED, output
    assert (directory / "scontrol.log").read_text() == "requeue 4242\n"
    run_json = json.loads((directory / "run" / "run.json").read_text())
    assert (run_json["status"], run_json["exit_reason"]) == ("stopped", "signal:SIGUSR1")
    stopped_at = run_json["sessions"][-1]["end_step"]
    assert 0 < stopped_at < 60

    requeued = start(job)  # SLURM starts the script again
    output, _ = requeued.communicate(timeout=60)
    assert requeued.returncode == 0, output
    assert (directory / "scontrol.log").read_text() == "requeue 4242\n"  # not again
    run_json = json.loads((directory / "run" / "run.json").read_text())
    assert [s["status"] for s in run_json["sessions"]] == ["stopped", "finished"]
    assert run_json["sessions"][1]["resumed_from"].endswith(f"step-{stopped_at:06d}")
