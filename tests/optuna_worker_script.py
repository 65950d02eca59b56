"""One of several workers sharing an Optuna study in PostgreSQL (run by tests).

``python optuna_worker_script.py URL N_TRIALS DIR``. With KILLSAFE_TEST_HOLD=1
the worker's first trial never ends (DIR/holding-PID says it started), so a
test can kill it mid-trial.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import optuna

from killsafe.integrations.optuna import resumable_study


def main() -> None:
    url, n_trials, directory = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hold = os.environ.get("KILLSAFE_TEST_HOLD") == "1"

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -4.0, 4.0)
        y = trial.suggest_int("y", 0, 10)
        if hold:
            (directory / f"holding-{os.getpid()}").write_text(str(trial.number))
            time.sleep(3600)  # killed here
        time.sleep(0.1)
        return (x - 1.0) ** 2 + (y - 3) ** 2

    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="shared", storage=storage)
    study = resumable_study(study)
    study.optimize(objective, n_trials=n_trials)
    sys.exit(study.exit_code)


if __name__ == "__main__":
    main()
