"""An Optuna search that is safe to kill: the same command resumes it exactly.

The search is written as Optuna's own examples write one (a seeded
``TPESampler``, a ``MedianPruner``, ``study.optimize(objective, n_trials=N)``);
killsafe adds one line, ``study = resumable_study(study, args.dir)``::

    python examples/optuna_search.py --dir runs/search

Ctrl+C or SIGTERM lets the running trial finish and exits with status 75;
after a SIGKILL the trial that was running is run again with the same
parameters. Started again with the same command, the search ends with exactly
``--trials`` trials that ran to their end, and the same parameters, states and
best value as a search never interrupted. In memory (the default) the study
is checkpointed into ``--dir`` after every trial; with ``--storage
sqlite:///runs/search.db`` (or a PostgreSQL URL) the trials live in Optuna's
storage and each records the sampler state after it.

The last line printed is ``result: ...`` (trials that ran to their end, best
value, a digest of their parameters and states): the same for an
uninterrupted search and for one stopped and resumed. The line before it,
``trials: ...``, counts all the study's trials by state: a SIGKILL leaves one
FAIL in an Optuna storage. ``--small`` or ``KILLSAFE_EXAMPLE_SMALL=1`` runs
fewer trials of a cheaper objective.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import sys

import optuna

from killsafe.integrations.optuna import resumable_study


def objective(trial: optuna.Trial, work: int) -> float:
    """A bumpy function of five parameters, refined over ``work`` steps that can be pruned."""
    x = trial.suggest_float("x", -4.0, 4.0)
    y = trial.suggest_float("y", -4.0, 4.0)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    layers = trial.suggest_int("layers", 1, 6)
    act = trial.suggest_categorical("activation", ["relu", "gelu", "tanh"])
    value = 0.0
    for step in range(4):
        for _ in range(work):
            value = (
                (x - 1.2) ** 2
                + (y + 0.7) ** 2
                + 0.3 * math.sin(3 * x) * math.cos(2 * y)
                + abs(math.log10(lr) + 2.5) * 0.2
                + 0.05 * (layers - 3) ** 2
                + {"relu": 0.1, "gelu": 0.0, "tanh": 0.2}[act]
                + 1.0 / (step + 1)
            )
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/optuna_search", help="checkpoints of the study")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--storage", default=None, help="an Optuna storage URL (sqlite:///...)")
    parser.add_argument("--small", action="store_true", help="a tiny run for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("KILLSAFE_EXAMPLE_SMALL") == "1"
    n_trials = args.trials or (20 if small else 150)
    work = 1000 if small else 30_000
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    study = optuna.create_study(
        study_name="example",
        sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=10),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
        storage=args.storage,
        load_if_exists=args.storage is not None,
    )
    study = resumable_study(study, args.dir)  # the one line killsafe adds
    study.optimize(lambda trial: objective(trial, work), n_trials=n_trials)
    if not study.finished:
        return study.exit_code  # 75: stopped; the same command continues

    trials = study.ran_to_end()
    states = collections.Counter(t.state.name for t in study.trials)
    ran = json.dumps([[t.params, t.state.name] for t in trials], sort_keys=True).encode()
    print("trials: " + " ".join(f"{k}={v}" for k, v in sorted(states.items())), flush=True)
    print(
        f"result: finished={len(trials)} best_value={study.best_value:.6f} "
        f"params_sha={hashlib.sha256(ran).hexdigest()[:16]}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
