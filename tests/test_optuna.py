"""Optuna studies checkpointed and resumed: trials kept, sampler continuing."""

from __future__ import annotations

from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from resumable.errors import StateMismatch  # noqa: E402
from resumable.integrations.optuna import (  # noqa: E402
    CheckpointCallback,
    StudyState,
    finished_trials,
    resume_study,
)
from resumable.store import CheckpointStore  # noqa: E402

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
