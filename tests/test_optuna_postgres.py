"""Several workers share one study in a real PostgreSQL server and survive SIGKILL.

The server is Debian's ``postgresql``, started by ``scripts/postgres.sh`` in a
temporary directory on a free port of 127.0.0.1; the tests are skipped when
its binaries or the ``psycopg2`` driver are missing.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg2")

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = ROOT / "scripts" / "postgres.sh"
WORKER = Path(__file__).with_name("optuna_worker_script.py")
N_TRIALS = 15
KILLS = 3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        and not os.environ.get("KILLSAFE_PG_BIN"),
        reason="PostgreSQL's binaries are missing (apt-get install postgresql)",
    ),
]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server of the tests' own, started and stopped by scripts/postgres.sh."""
    # Not under pytest's tmp_path: as root the server runs as `postgres`, which
    # cannot enter pytest's private directories.
    directory = Path(tempfile.mkdtemp(prefix="killsafe-pg-"))
    directory.chmod(0o755)
    env = dict(os.environ, KILLSAFE_PG_OPTIONS="-c fsync=off -c synchronous_commit=off")
    started = subprocess.run(
        ["bash", str(POSTGRES), "start", str(directory / "server")],
        capture_output=True,
        text=True,
        env=env,
    )
    if started.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {started.stderr.strip()}")
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run(["bash", str(POSTGRES), "stop", str(directory / "server")], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def start_worker(url: str, directory: Path, *, hold: bool = False) -> subprocess.Popen[str]:
    env = dict(os.environ, KILLSAFE_TEST_HOLD="1" if hold else "0")
    command = [sys.executable, str(WORKER), url, str(N_TRIALS), str(directory)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)


def test_three_workers_killed_mid_trial_end_with_exactly_n_trials(
    postgres_url: str, tmp_path: Path
) -> None:
    optuna.create_study(study_name="shared", storage=postgres_url)  # tables and study, once
    held = start_worker(postgres_url, tmp_path, hold=True)
    workers = [held, start_worker(postgres_url, tmp_path), start_worker(postgres_url, tmp_path)]
    # The first kill lands in a trial for certain; the others at random moments.
    deadline = time.monotonic() + 60
    while not (tmp_path / f"holding-{held.pid}").exists():
        assert held.poll() is None and time.monotonic() < deadline, "the held trial never began"
        time.sleep(0.01)
    held.kill()
    held.wait()
    workers[0] = start_worker(postgres_url, tmp_path)
    for _ in range(KILLS - 1):
        time.sleep(random.uniform(0.2, 1.0))
        victim = random.randrange(len(workers))
        workers[victim].kill()
        workers[victim].wait()
        workers[victim] = start_worker(postgres_url, tmp_path)  # the same command again
    for worker in workers:
        _out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    by_state = {state: study.get_trials(states=(state,)) for state in optuna.trial.TrialState}
    assert len(by_state[optuna.trial.TrialState.COMPLETE]) == N_TRIALS
    assert not by_state[optuna.trial.TrialState.RUNNING]
    assert not by_state[optuna.trial.TrialState.WAITING]
    failed = by_state[optuna.trial.TrialState.FAIL]
    assert 1 <= len(failed) <= KILLS
    # Each trial cut short ran again exactly once, with the parameters it had
    # (none when the kill came before its first suggestion).
    for trial in failed:
        again = [t for t in study.trials if t.system_attrs.get("killsafe:retry_of") == trial.number]
        assert len(again) == 1 and trial.params.items() <= again[0].params.items()
    assert any(trial.params for trial in failed)  # the held trial, at least
