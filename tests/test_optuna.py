"""Optuna studies checkpointed and resumed: trials kept, sampler continuing."""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

optuna = pytest.importorskip("optuna")

from killsafe.errors import ConfigError, StateMismatch  # noqa: E402
from killsafe.integrations.optuna import (  # noqa: E402
    CheckpointCallback,
    StudyState,
    finished_trials,
    resumable_study,
    resume_study,
)
from killsafe.store import CheckpointStore  # noqa: E402

JournalStorage = optuna.storages.journal.JournalStorage
JournalFileBackend = optuna.storages.journal.JournalFileBackend

optuna.logging.set_verbosity(optuna.logging.WARNING)


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -5, 5)
    kind = trial.suggest_categorical("kind", ["a", "b"])
    n = trial.suggest_int("n", 1, 8, log=True)
    trial.set_user_attr("double", 2 * x)
    trial.report(x * x, step=0)
    return (x - 1.5) ** 2 + (0.3 if kind == "a" else 0.0) + 0.01 * n


def new_study(storage: str | None = None, name: str = "s") -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=7, n_startup_trials=5)
    return optuna.create_study(
        sampler=sampler, storage=storage, study_name=name, load_if_exists=True
    )


def params(study: optuna.Study) -> list[dict]:
    return [t.params for t in finished_trials(study)]


def test_state_round_trip_continues_the_sampler(tmp_path: Path) -> None:
    reference = new_study()
    reference.optimize(objective, n_trials=16)

    first = new_study()
    first.optimize(objective, n_trials=7)
    store = CheckpointStore(tmp_path / "ckpt")
    store.save({"study": StudyState(first).state_dict()}, step=7)

    resumed = new_study()
    StudyState(resumed).load_state_dict(store.load("latest")["study"])
    assert params(resumed) == params(first)
    assert [t.user_attrs for t in resumed.trials] == [t.user_attrs for t in first.trials]
    assert resumed.trials[0].intermediate_values == first.trials[0].intermediate_values
    resumed.optimize(objective, n_trials=9)
    assert params(resumed) == params(reference)
    assert resumed.best_value == reference.best_value


def test_callback_saves_periodically_on_improvement_and_stops_after_the_trial(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    stop_after = {"n": 6}

    def should_stop() -> bool:
        return len(finished_trials(study)) >= stop_after["n"]

    study = new_study()
    callback = CheckpointCallback(store, every_trials=4, should_stop=should_stop)
    study.optimize(objective, n_trials=20, callbacks=[callback])
    # The stop request ended the search after the sixth trial, which finished.
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 6
    latest = store.latest()
    assert latest is not None and latest.step == 6 and latest.reason == "stop"
    steps = [info.step for info in store.list()]
    assert 4 in steps and 1 in steps  # periodic, and the first value is an improvement

    resumed = new_study()
    assert resume_study(store, resumed) == 6
    stop_after["n"] = 10**9
    resumed.optimize(objective, n_trials=14, callbacks=[CheckpointCallback(store)])
    reference = new_study()
    reference.optimize(objective, n_trials=20)
    assert params(resumed) == params(reference)


def test_sqlite_storage_keeps_trials_and_checkpoint_only_the_sampler(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = CheckpointStore(tmp_path / "ckpt")
    study = new_study(url)
    study.optimize(
        objective, n_trials=8, callbacks=[CheckpointCallback(store, every_trials=1, trials=False)]
    )
    saved = store.load("latest")["study"]
    assert saved["trials"] is None and saved["n_finished"] == 8

    resumed = new_study(url)
    assert resume_study(store, resumed) == 8
    assert len(finished_trials(resumed)) == 8  # from the storage, not re-added
    resumed.optimize(objective, n_trials=8)
    reference = new_study()
    reference.optimize(objective, n_trials=16)
    assert params(resumed) == params(reference)


def test_mismatched_sampler_is_refused(tmp_path: Path) -> None:
    study = new_study()
    study.optimize(objective, n_trials=2)
    state = StudyState(study).state_dict()
    other = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    with pytest.raises(StateMismatch, match="sampler differs"):
        StudyState(other).load_state_dict(state)
    maximize = optuna.create_study(direction="maximize", sampler=new_study().sampler)
    with pytest.raises(StateMismatch, match="directions"):
        StudyState(maximize).load_state_dict(state)


KILLED_WORKER = """
import sys, time, pathlib
import optuna
from killsafe.integrations.optuna import StudyState
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, owner, marker, n_done = sys.argv[1:5]
sampler = optuna.samplers.TPESampler(seed=7, n_startup_trials=5)
study = optuna.create_study(sampler=sampler, storage=url, study_name="s", load_if_exists=True)
state = StudyState(study, trials=False, owner=owner)

def objective(trial):
    x = trial.suggest_float("x", -5, 5)
    kind = trial.suggest_categorical("kind", ["a", "b"])
    n = trial.suggest_int("n", 1, 8, log=True)
    trial.set_user_attr("double", 2 * x)
    trial.report(x * x, step=0)
    if len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) >= int(n_done):
        pathlib.Path(marker).write_text("in the trial")
        time.sleep(600)  # killed here, mid-trial
    return (x - 1.5) ** 2 + (0.3 if kind == "a" else 0.0) + 0.01 * n

state.optimize(objective, n_trials=100)
"""


def test_storage_trial_killed_mid_run_is_failed_and_proposed_again(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    url = f"sqlite:///{tmp_path / 'study.db'}"
    marker = tmp_path / "marker"
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER)
    proc = subprocess.Popen([sys.executable, str(script), url, "me", str(marker), "6"])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the worker never got there"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    study = new_study(url)
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert len(running) == 1 and running[0].params  # killed mid-trial, left RUNNING
    # Another owner's view leaves it alone; the owner's own resume fails it.
    assert StudyState(new_study(url), trials=False, owner="someone else").stale == []
    state = StudyState(study, trials=False, owner="me")
    assert [t.number for t in state.stale] == [running[0].number]
    failed = study.trials[running[0].number]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.system_attrs["killsafe:stale"] is True

    state.optimize(objective, n_trials=16 - state.finished())
    assert study.trials[failed.number + 1].params == failed.params  # proposed again
    reference = new_study()
    reference.optimize(objective, n_trials=16)
    assert params(study) == params(reference)  # the sampler continued exactly


def test_storage_newer_than_the_checkpoint_continues_the_sampler(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = CheckpointStore(tmp_path / "ckpt")
    study = new_study(url)
    state = StudyState(study, trials=False, owner="me")
    state.optimize(objective, n_trials=5)
    store.save({"study": state.state_dict()}, step=5)
    # Three more trials reach the storage, then the process dies before its next save.
    state.optimize(objective, n_trials=3)

    resumed = new_study(url)  # a fresh sampler, seeded like the first
    resumed_state = StudyState(resumed, trials=False, owner="me")
    resumed_state.load_state_dict(store.load("latest")["study"])  # older than the storage
    assert resumed_state.finished() == 8 and resumed_state.stale == []
    resumed_state.optimize(objective, n_trials=8)
    reference = new_study()
    reference.optimize(objective, n_trials=16)
    assert params(resumed) == params(reference)
    assert {t.state for t in resumed.trials} == {optuna.trial.TrialState.COMPLETE}


def test_storage_optimize_honours_study_stop(tmp_path: Path) -> None:
    study = new_study(f"sqlite:///{tmp_path / 'study.db'}")
    state = StudyState(study, trials=False, owner="me")

    def stop_after_three(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if state.finished() >= 3:
            study.stop()

    state.optimize(objective, n_trials=10, callbacks=[stop_after_three])
    assert state.finished() == 3
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}


# -- study.optimize as people call it -------------------------------------------

SEARCH = Path(__file__).with_name("optuna_search_script.py")
N_TRIALS = 10
STOPPED = 75


def start_search(kind: str, directory: Path, hold_at: int | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.pop("KILLSAFE_TEST_HOLD_AT", None)
    if hold_at is not None:
        env["KILLSAFE_TEST_HOLD_AT"] = str(hold_at)
    command = [sys.executable, str(SEARCH), kind, str(directory), str(N_TRIALS)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def search_result(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("result: ")]
    assert len(lines) == 1, out
    return json.loads(lines[0].removeprefix("result: "))


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Path]:
    """A directory for a search, in memory-backed /dev/shm where there is one.

    SQLite commits every storage write with fsync; on a busy disk that, not
    the search, would take most of the test's time.
    """
    if not Path("/dev/shm").is_dir():
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="killsafe-optuna-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return search_result(start_search("memory", tmp_path_factory.mktemp("reference")))


def hold_then_signal(proc: subprocess.Popen[str], directory: Path, sig: signal.Signals) -> None:
    """Signal ``proc`` while its held trial runs; a trial asked to stop then goes on."""
    deadline = time.monotonic() + 60
    while not (directory / "holding").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the search never reached the held trial"
        time.sleep(0.005)
    proc.send_signal(sig)
    if sig != signal.SIGKILL:
        time.sleep(0.05)  # the handler has run; the trial must not notice
        (directory / "go").write_text("")
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == STOPPED, err[-3000:]
        assert "result: " not in out and "stopped" in err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["memory", "sqlite", "journal"])
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name
)
def test_search_signalled_mid_trial_ends_as_an_uninterrupted_one(
    kind: str, sig: signal.Signals, directory: Path, uninterrupted: dict
) -> None:
    hold_at = random.randint(2, N_TRIALS - 1)
    hold_then_signal(start_search(kind, directory, hold_at), directory, sig)
    # The same command again: the same trials, parameters, states and best value.
    assert search_result(start_search(kind, directory)) == uninterrupted
    starts = (directory / "starts.log").read_text().splitlines()
    repeated = [p for p, n in collections.Counter(starts).items() if n > 1]
    if sig != signal.SIGKILL:
        assert len(starts) == N_TRIALS and repeated == []  # the held trial finished
        return
    # The trial cut short ran again, once, with the same parameters.
    assert len(starts) == N_TRIALS + 1 and repeated == [starts[hold_at - 1]]
    if kind != "memory":
        study = optuna.load_study(study_name="search", storage=storage_of(kind, directory))
        failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
        assert len(failed) == 1 and failed[0].system_attrs["killsafe:stale"] is True
        assert study.trials[failed[0].number + 1].params == failed[0].params


def storage_of(kind: str, directory: Path) -> Any:
    if kind == "sqlite":
        return f"sqlite:///{directory / 'study.db'}"
    return JournalStorage(JournalFileBackend(str(directory / "journal.log")))


def test_n_trials_counts_the_trials_of_earlier_starts(tmp_path: Path) -> None:
    study = resumable_study(new_study(), tmp_path)
    study.optimize(objective, n_trials=6)
    assert study.finished and study.exit_code == 0
    again = resumable_study(new_study(), tmp_path)  # a new process, the same command
    assert len(again.ran_to_end()) == 6
    again.optimize(objective, n_trials=6)
    assert again.finished and len(again.trials) == 6  # nothing more to run
    again.optimize(objective, n_trials=9)
    reference = new_study()
    reference.optimize(objective, n_trials=9)
    assert params(again) == params(reference)


@pytest.mark.parametrize("storage", [None, "sqlite"])
def test_a_trial_cut_by_a_second_ctrl_c_runs_again_with_its_parameters(
    storage: str | None, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage else None
    seen: list[dict] = []

    def cut_at_the_fifth(trial: optuna.Trial) -> float:
        value = objective(trial)
        seen.append(dict(trial.params))
        if len(seen) == 5:
            raise KeyboardInterrupt  # what a second Ctrl+C raises mid-trial
        return value

    with pytest.raises(KeyboardInterrupt):
        resumable_study(new_study(url), tmp_path).optimize(cut_at_the_fifth, n_trials=9)
    resumed = resumable_study(new_study(url), tmp_path)
    resumed.optimize(cut_at_the_fifth, n_trials=9)
    assert seen[5] == seen[4] and len(seen) == 10  # the cut trial, again, once
    reference = new_study()
    reference.optimize(objective, n_trials=9)
    assert params(resumed) == params(reference)


def test_failures_of_the_objective_count_and_callbacks_can_stop(tmp_path: Path) -> None:
    def fails_on_odd(trial: optuna.Trial) -> float:
        value = objective(trial)
        if trial.number % 2:
            raise ValueError("odd")
        return value

    def stop_at_five(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number == 4:
            study.stop()

    study = resumable_study(new_study(f"sqlite:///{tmp_path / 'study.db'}"))
    study.optimize(fails_on_odd, n_trials=8, catch=ValueError, callbacks=[stop_at_five])
    assert not study.finished and len(study.ran_to_end()) == 5
    study.optimize(fails_on_odd, n_trials=8, catch=(ValueError,))
    states = [t.state.name for t in study.ran_to_end()]
    assert study.finished and states == ["COMPLETE", "FAIL"] * 4


def test_resumable_study_refuses_what_it_cannot_resume(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give resumable_study a directory"):
        resumable_study(new_study())
    study = resumable_study(new_study(), tmp_path)
    with pytest.raises(ConfigError, match="n_jobs=2"):
        study.optimize(objective, n_trials=2, n_jobs=2)
