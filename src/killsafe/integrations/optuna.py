"""Optuna: a study whose trials and sampler survive a stop, a kill or a crash.

Two ways in. With a ``Run``, one step is one trial and the study is a tracked
``Stateful``; a stop request (Ctrl+C, SIGTERM, a time limit) lets the running
trial finish, and the checkpoint includes it::

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    with killsafe.Run("runs/search", total_steps=100, save_every_steps=10) as run:
        run.track(study=StudyState(study))    # resumed: trials and sampler restored
        for _ in run.steps():
            study.optimize(objective, n_trials=1)
            run.log(value=study.trials[-1].value, best=study.best_value)

Without a ``Run``, ``CheckpointCallback`` saves the study into a
``CheckpointStore`` every N trials and on every improvement, and ends the
search after the running trial when ``should_stop()`` turns true;
``resume_study`` rebuilds the study from the newest checkpoint.

The checkpoint holds plain data only: each finished trial's params, its
distributions as JSON (``optuna.distributions.distribution_to_json``), values,
state, user and system attributes and intermediate values, plus the random
states of the sampler (numpy ``RandomState`` arrays), so the sampler continues
as if never stopped: a resumed seeded search proposes the same parameters an
uninterrupted one would.

With one of Optuna's own storages (``sqlite:///...`` and other RDB storages)
the trials already live in the storage, and a trial may be finished there
after the newest checkpoint (a kill between the two writes). Track
``StudyState(study, trials=False, owner=RUN_DIR)`` and search with
``state.optimize(fn, n_trials=1)``: each trial is created tagged with the
owner, and the sampler's random state is written into its system attributes
in the same storage before the trial is told finished, so a finished trial
always carries the sampler state after it.
On resume the sampler continues from the newest finished trial, and a trial
this owner left RUNNING (its process was killed) is marked FAIL with the
system attribute ``killsafe:stale``; the sampler then proposes the same
parameters again in a new trial::

    state = StudyState(study, trials=False, owner=str(run.directory))
    run.track(study=state)
    for _ in run.steps():
        if state.finished() >= n_trials:
            continue
        state.optimize(objective, n_trials=1)

Give each process that shares one study its own ``owner``: only RUNNING
trials of the same owner are failed on resume.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from typing import Any

try:
    import optuna
    from optuna.distributions import distribution_to_json, json_to_distribution
    from optuna.samplers._lazy_random_state import LazyRandomState
    from optuna.trial import FrozenTrial, TrialState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("killsafe.integrations.optuna needs Optuna; run: pip install optuna") from exc

from killsafe.errors import StateMismatch

__all__ = [
    "CheckpointCallback",
    "StudyState",
    "fail_stale_trials",
    "finished_trials",
    "restore_sampler_from_storage",
    "resume_study",
    "sampler_state",
    "set_sampler_state",
    "study_state",
]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
OWNER_ATTR = "killsafe:owner"
SAMPLER_ATTR = "killsafe:sampler"
STALE_ATTR = "killsafe:stale"


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The study's trials that completed or were pruned (failed and running ones excluded)."""
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)


# -- the sampler's random state ---------------------------------------------


def sampler_state(sampler: optuna.samplers.BaseSampler) -> dict[str, Any]:
    """The numpy random states inside ``sampler`` (and its nested samplers), by attribute path."""
    found: dict[str, Any] = {}
    _walk_sampler(sampler, "", found, read=True)
    return found


def set_sampler_state(sampler: optuna.samplers.BaseSampler, state: Mapping[str, Any]) -> None:
    """Put back what ``sampler_state`` returned; ``StateMismatch`` if the sampler differs."""
    found: dict[str, Any] = {}
    _walk_sampler(sampler, "", found, read=False)
    if set(found) != set(state):
        raise StateMismatch(
            f"sampler random states differ: saved {sorted(state)}, this sampler has "
            f"{sorted(found)}; resume with the same sampler class and options"
        )
    for path, rng in found.items():
        saved = state[path]
        rng.set_state((str(saved[0]), saved[1], int(saved[2]), int(saved[3]), float(saved[4])))


def _encode_sampler_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``sampler_state`` as JSON (the key array as base64 of little-endian uint32)."""
    import numpy

    encoded = {}
    for path, (kind, keys, pos, has_gauss, gauss) in state.items():
        raw = numpy.ascontiguousarray(keys, dtype="<u4").tobytes()
        encoded[path] = [str(kind), base64.b64encode(raw).decode(), int(pos), int(has_gauss)]
        encoded[path].append(float(gauss))
    return encoded


def _decode_sampler_state(encoded: Mapping[str, Any]) -> dict[str, Any]:
    import numpy

    state = {}
    for path, (kind, keys, pos, has_gauss, gauss) in encoded.items():
        array = numpy.frombuffer(base64.b64decode(keys), dtype="<u4").astype(numpy.uint32)
        state[path] = (kind, array, pos, has_gauss, gauss)
    return state


def _walk_sampler(obj: Any, prefix: str, found: dict[str, Any], *, read: bool) -> None:
    import numpy

    for name, value in sorted(vars(obj).items()):
        path = f"{prefix}{name}"
        rng = None
        if isinstance(value, LazyRandomState):
            rng = value.rng
        elif isinstance(value, numpy.random.RandomState):
            rng = value
        if rng is not None:
            found[path] = tuple(rng.get_state()) if read else rng
        elif isinstance(value, optuna.samplers.BaseSampler):
            _walk_sampler(value, f"{path}.", found, read=read)


# -- trials as plain data ---------------------------------------------------


def _trial_record(trial: FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": list(trial.values) if trial.values is not None else None,
        "params": dict(trial.params),
        "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
        "user_attrs": dict(trial.user_attrs),
        "system_attrs": dict(trial.system_attrs),
        "intermediate_values": {int(k): float(v) for k, v in trial.intermediate_values.items()},
    }


def _frozen_trial(record: Mapping[str, Any]) -> FrozenTrial:
    values = record["values"]
    return optuna.trial.create_trial(
        state=TrialState[record["state"]],
        values=list(values) if values is not None else None,
        params=dict(record["params"]),
        distributions={
            k: json_to_distribution(v) for k, v in dict(record["distributions"]).items()
        },
        user_attrs=dict(record["user_attrs"]),
        system_attrs=dict(record["system_attrs"]),
        intermediate_values={int(k): v for k, v in dict(record["intermediate_values"]).items()},
    )


def study_state(
    study: optuna.Study, *, trials: bool = True, just_finished: FrozenTrial | None = None
) -> dict[str, Any]:
    """The study as a plain tree: finished trials (unless ``trials=False``) and sampler state.

    ``just_finished``: the trial a callback received, counted even when a storage
    does not list it as finished yet.
    """
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    if just_finished is not None and just_finished.state in FINISHED:
        finished = [t for t in finished if t.number != just_finished.number] + [just_finished]
        finished.sort(key=lambda t: t.number)
    records = [_trial_record(t) for t in finished]
    best = _best_value(study)
    return {
        "study_name": study.study_name,
        "directions": [d.name for d in study.directions],
        "trials": records if trials else None,
        "n_finished": len(records),
        "best_value": best,
        "sampler": {"class": type(study.sampler).__name__, "rng": sampler_state(study.sampler)},
    }


def _best_value(study: optuna.Study) -> float | None:
    if len(study.directions) != 1:
        return None
    try:
        return float(study.best_value)
    except ValueError:  # no completed trial yet
        return None


def load_study_state(study: optuna.Study, state: Mapping[str, Any]) -> None:
    """Restore ``state`` into ``study``: add the saved trials (when it has none) and the sampler."""
    directions = [d.name for d in study.directions]
    if list(state["directions"]) != directions:
        raise StateMismatch(
            f"study directions differ: saved {list(state['directions'])}, now {directions}; "
            "resume with the same directions"
        )
    sampler = state["sampler"]
    if sampler["class"] != type(study.sampler).__name__:
        raise StateMismatch(
            f"sampler differs: saved {sampler['class']}, now {type(study.sampler).__name__}; "
            "resume with the same sampler"
        )
    records = state["trials"]
    if records is not None:
        existing = len(study.get_trials(deepcopy=False))
        if existing not in (0, len(records)):
            raise StateMismatch(
                f"study {study.study_name!r} already holds {existing} trials, the checkpoint "
                f"{len(records)}; resume into a new in-memory study"
            )
        if existing == 0:
            study.add_trials([_frozen_trial(r) for r in records])
    set_sampler_state(study.sampler, sampler["rng"])


# -- studies on Optuna's own storages -----------------------------------------


def fail_stale_trials(study: optuna.Study, owner: str) -> list[FrozenTrial]:
    """Mark FAIL the trials ``owner`` left RUNNING (its process died); returns them.

    Call it only while no process of this ``owner`` is running trials: with
    the run directory as the owner, inside ``with Run(...)``, which refuses
    to start while another live run uses that directory. Each
    such trial gets the system attribute ``killsafe:stale`` first, so the
    sampler state is never taken from it.
    """
    storage = study._storage
    stale = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.system_attrs.get(OWNER_ATTR) == owner
    ]
    for trial in stale:
        storage.set_trial_system_attr(trial._trial_id, STALE_ATTR, True)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return stale


def restore_sampler_from_storage(study: optuna.Study) -> FrozenTrial | None:
    """Set the sampler to the state recorded by the newest finished trial that has one.

    Returns that trial, or None (sampler untouched) when no trial recorded one.
    """
    for trial in reversed(study.get_trials(deepcopy=False, states=FINISHED)):
        recorded = trial.system_attrs.get(SAMPLER_ATTR)
        if recorded is not None and not trial.system_attrs.get(STALE_ATTR):
            set_sampler_state(study.sampler, _decode_sampler_state(recorded))
            return trial
    return None


class StudyState:
    """A ``Stateful`` view of a study, to ``run.track(study=StudyState(study))``.

    ``trials=False`` for a study on one of Optuna's own storages: the trials
    are already durable there and only the sampler state is checkpointed.
    Then search with ``self.optimize(fn)``, which tags each trial with its
    owner and records the sampler state in it (see the module docstring),
    and name an ``owner`` (the run
    directory) distinct for every process sharing the study: building the
    ``StudyState`` and restoring a checkpoint fail the trials this owner left
    RUNNING and continue the sampler from the newest finished trial.
    """

    def __init__(
        self, study: optuna.Study, *, trials: bool = True, owner: str = "killsafe"
    ) -> None:
        self.study = study
        self.trials = trials
        self.owner = owner
        self.stale: list[FrozenTrial] = []
        if not trials:
            self._recover()

    def finished(self) -> int:
        """The number of COMPLETE and PRUNED trials in the study."""
        return len(finished_trials(self.study))

    def optimize(self, fn: Callable[[optuna.Trial], Any], n_trials: int = 1, **kwargs: Any) -> None:
        """``study.optimize(fn, n_trials=..., **kwargs)``, recording what a resume needs.

        With ``trials=False`` each trial is created tagged with the owner (as a
        WAITING trial that the search then runs, so no trial of this owner is
        ever untagged) and ends with the sampler state in its system attributes.
        With ``trials=True`` it is ``study.optimize`` itself.
        """
        if self.trials:
            self.study.optimize(fn, n_trials=n_trials, **kwargs)
            return
        recording = self._recording(fn)
        for _ in range(n_trials):
            if not self._waiting():
                template = optuna.trial.create_trial(
                    state=TrialState.WAITING, system_attrs={OWNER_ATTR: self.owner}
                )
                self.study.add_trial(template)
            self.study.optimize(recording, n_trials=1, **kwargs)
            if getattr(self.study, "_stop_flag", False):  # study.stop() in a callback
                break

    def _waiting(self) -> bool:
        """Whether a WAITING trial of this owner exists (a kill came before it ran)."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return any(t.system_attrs.get(OWNER_ATTR) == self.owner for t in waiting)

    def _recording(self, fn: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        owner = self.owner

        def recording(trial: optuna.Trial) -> Any:
            storage, trial_id = trial.study._storage, trial._trial_id
            if storage.get_trial(trial_id).system_attrs.get(OWNER_ATTR) != owner:
                # a trial queued by someone else (enqueue_trial): it is ours now
                storage.set_trial_system_attr(trial_id, OWNER_ATTR, owner)
            try:
                return fn(trial)
            finally:
                # Written before Optuna tells the trial finished: a trial found
                # finished in the storage always carries the state after it.
                encoded = _encode_sampler_state(sampler_state(trial.study.sampler))
                storage.set_trial_system_attr(trial_id, SAMPLER_ATTR, encoded)

        return recording

    def state_dict(self) -> dict[str, Any]:
        return study_state(self.study, trials=self.trials)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_study_state(self.study, state)
        if not self.trials:
            self._recover()  # the storage may be newer than the checkpoint

    def _recover(self) -> None:
        self.stale += fail_stale_trials(self.study, self.owner)
        restore_sampler_from_storage(self.study)


class CheckpointCallback:
    """An Optuna callback that checkpoints the study and honours stop requests.

    Args:
        store: a ``killsafe.CheckpointStore`` (or anything with ``save(state, step, ...)``).
        every_trials: save after every this many finished trials.
        on_improvement: also save when a trial improves the best value.
        should_stop: called after each trial; when it returns true the search
            ends after the trial that just finished, which is saved first.
        trials: ``False`` with an Optuna storage (save only the sampler); use
            ``every_trials=1`` then, so the sampler state matches the trials
            in the storage (such a save is small and fast). A kill between a
            trial's end and its save still leaves the sampler one trial
            behind; ``StudyState.optimize`` records the state in the trial
            itself and has no such gap.

    ``study.optimize(objective, n_trials=..., callbacks=[CheckpointCallback(store)])``.
    The checkpoint's step is the number of finished trials.
    """

    def __init__(
        self,
        store: Any,
        *,
        every_trials: int = 10,
        on_improvement: bool = True,
        should_stop: Callable[[], bool] | None = None,
        trials: bool = True,
    ) -> None:
        self.store = store
        self.every_trials = every_trials
        self.on_improvement = on_improvement
        self.should_stop = should_stop
        self.trials = trials
        self._best: float | None = None
        self.saves = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        state = study_state(study, trials=self.trials, just_finished=trial)
        finished = state["n_finished"]
        stop = self.should_stop is not None and self.should_stop()
        reason = None
        if stop:
            reason = "stop"
        elif self.every_trials and finished % self.every_trials == 0:
            reason = "periodic"
        elif self.on_improvement and _improved(study, self._best, state["best_value"]):
            reason = "best"
        if state["best_value"] is not None:
            self._best = state["best_value"]
        if reason is not None:
            metrics = {} if state["best_value"] is None else {"best_value": state["best_value"]}
            self.store.save({"study": state}, step=finished, reason=reason, metrics=metrics)
            self.saves += 1
        if stop:
            study.stop()


def _improved(study: optuna.Study, before: float | None, now: float | None) -> bool:
    if now is None or (before is not None and math.isclose(before, now)):
        return False
    if before is None:
        return True
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return now > before if maximize else now < before


def resume_study(store: Any, study: optuna.Study) -> int:
    """Restore the newest checkpoint of ``store`` into ``study``; returns its finished trials.

    Returns 0 (and changes nothing) when the store holds no checkpoint.
    """
    if store.latest() is None:
        return 0
    state = store.load("latest")["study"]
    load_study_state(study, state)
    if state["trials"] is None:  # on a storage: it may hold newer recorded sampler states
        restore_sampler_from_storage(study)
    return int(state["n_finished"])
