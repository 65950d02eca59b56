"""A search as optuna-examples write one, plus killsafe's one wrapper call (run by tests).

``python optuna_search_script.py STORAGE DIR N_TRIALS``; STORAGE is ``memory``,
``sqlite`` or ``journal``. Each trial appends its parameters to DIR/starts.log
as it starts. With KILLSAFE_TEST_HOLD_AT=K, trial start K (counting lines of
that log) waits for DIR/go before going on, so a test can signal the process
mid-trial. A finished search prints one ``result: {...}`` line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from killsafe.integrations.optuna import resumable_study


def hold_if_asked(where: Path, starts: int) -> None:
    if os.environ.get("KILLSAFE_TEST_HOLD_AT") == str(starts):
        (where / "holding").write_text("")
        while not (where / "go").exists():
            time.sleep(0.005)


def make_objective(where: Path):  # type: ignore[no-untyped-def]
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -4.0, 4.0)
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        layers = trial.suggest_int("layers", 1, 5)
        act = trial.suggest_categorical("act", ["relu", "tanh"])
        with open(where / "starts.log", "a") as log:
            log.write(json.dumps(trial.params, sort_keys=True) + "\n")
        hold_if_asked(where, len((where / "starts.log").read_text().splitlines()))
        value = 0.0
        for step in range(4):
            value = (x - 1.0) ** 2 + abs(lr - 0.01) * 10 + 0.1 * layers + 2.0 / (step + 1)
            value += 0.2 if act == "tanh" else 0.0
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return value

    return objective


def main() -> None:
    kind, directory, n_trials = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage: str | JournalStorage | None = None
    if kind == "sqlite":
        storage = f"sqlite:///{directory / 'study.db'}"
    elif kind == "journal":
        storage = JournalStorage(JournalFileBackend(str(directory / "journal.log")))
    study = optuna.create_study(
        study_name="search",
        storage=storage,
        load_if_exists=storage is not None,
        sampler=optuna.samplers.TPESampler(seed=3, n_startup_trials=4),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    )
    study = resumable_study(study, directory)
    study.optimize(make_objective(directory), n_trials=n_trials)
    if study.finished:
        trials = study.ran_to_end()
        result = {
            "params": [t.params for t in trials],
            "states": [t.state.name for t in trials],
            "values": [t.value for t in trials],
            "best_value": study.best_value,
        }
        print("result: " + json.dumps(result, sort_keys=True), flush=True)
    sys.exit(study.exit_code)


if __name__ == "__main__":
    main()
