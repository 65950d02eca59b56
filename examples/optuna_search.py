"""An Optuna search that a stop never costs a trial and a resume never repeats one.

One step of the ``Run`` is one trial, and a checkpoint is taken every
``--save-every`` trials (default 5) and whenever the best value improves. The
study is tracked as a ``StudyState``:
its finished trials (params, distributions, values, attributes) and the random
state of its TPE sampler are in every checkpoint, so a resumed search neither
re-runs a finished trial nor changes what the sampler proposes next. Ctrl+C or
SIGTERM lets the running trial finish: it is recorded as COMPLETE, never left
RUNNING or FAIL, and checkpointed with the rest. The search ends with exactly
``--trials`` finished trials, however often it was stopped::

    python examples/optuna_search.py --dir runs/search --save-every 5

With ``--storage sqlite:///runs/search.db`` the trials live in Optuna's own
storage, each with the sampler state after it, and the checkpoint (written
after every trial) carries only the sampler state. After a SIGKILL the trial
that was running is marked FAIL (``killsafe:stale``) and proposed again.

The last line printed is ``result: ...`` (finished trials, best value, a
digest of all finished trials' parameters): the same for an uninterrupted
search and for one stopped and resumed. The line before it, ``trials: ...``,
counts the trials by state: only COMPLETE ones, except the one FAIL a kill
leaves in an Optuna storage. ``--small`` or ``KILLSAFE_EXAMPLE_SMALL=1`` runs
fewer trials of a cheaper objective.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
from pathlib import Path

import optuna

import killsafe
from killsafe.integrations.optuna import StudyState, finished_trials


def objective(trial: optuna.Trial, work: int) -> float:
    """A bumpy function of four parameters; ``work`` repeats it to cost real time."""
    x = trial.suggest_float("x", -4.0, 4.0)
    y = trial.suggest_float("y", -4.0, 4.0)
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    layers = trial.suggest_int("layers", 1, 6)
    act = trial.suggest_categorical("activation", ["relu", "gelu", "tanh"])
    value = 0.0
    for k in range(work):
        value = (
            (x - 1.2) ** 2
            + (y + 0.7) ** 2
            + 0.3 * math.sin(3 * x) * math.cos(2 * y)
            + abs(math.log10(lr) + 2.5) * 0.2
            + 0.05 * (layers - 3) ** 2
            + {"relu": 0.1, "gelu": 0.0, "tanh": 0.2}[act]
            + k * 0.0
        )
    trial.set_user_attr("work", work)
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    killsafe.add_arguments(parser, directory="runs/optuna_search")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--storage", default=None, help="an Optuna storage URL (sqlite:///...)")
    parser.add_argument("--small", action="store_true", help="a tiny run for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("KILLSAFE_EXAMPLE_SMALL") == "1"
    n_trials = args.trials or (20 if small else 150)
    work = 3000 if small else 100_000
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    sampler = optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=10)
    study = optuna.create_study(
        study_name="example",
        sampler=sampler,
        storage=args.storage,
        load_if_exists=args.storage is not None,
    )
    in_storage = args.storage is not None
    with killsafe.Run.from_args(
        args,
        total_steps=n_trials,
        save_every_steps=1 if in_storage else 5,
        save=killsafe.OnImprovement("best", mode="min"),  # and whenever the best improves
        best=("value", "min"),
    ) as run:
        owner = str(Path(run.directory).resolve())
        state = StudyState(study, trials=not in_storage, owner=owner)
        run.track(study=state)
        for _ in run.steps():
            if state.finished() >= n_trials:
                continue  # done in the storage after the last checkpoint
            state.optimize(lambda t: objective(t, work), n_trials=1)
            run.log(value=study.trials[-1].value, best=study.best_value)
    if run.exit_reason != "finished":
        return
    trials = finished_trials(study)
    states = collections.Counter(t.state.name for t in study.trials)
    best = [t.number for t in trials].index(study.best_trial.number)
    params = json.dumps([t.params for t in trials], sort_keys=True).encode()
    print("trials: " + " ".join(f"{k}={v}" for k, v in sorted(states.items())), flush=True)
    print(
        f"result: finished={len(trials)} best_value={study.best_value:.6f} "
        f"best_finished_index={best} params_sha={hashlib.sha256(params).hexdigest()[:16]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
