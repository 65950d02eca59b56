"""Optuna: a study whose trials and sampler survive a stop, a kill or a crash.

The way in: wrap the study, then call ``optimize`` as usual::

    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study = resumable_study(study, "runs/search")   # in memory: checkpoints go here
    study.optimize(objective, n_trials=40)           # the same command resumes
    sys.exit(study.exit_code)                        # 0 when done, 75 when stopped

``n_trials`` counts the trials of earlier starts, so the search ends with
exactly 40 trials that ran to their end, the same parameters and best value
as one never interrupted. Ctrl+C or SIGTERM lets the running trial finish; a
trial cut short (SIGKILL, a second Ctrl+C) runs again with the same
parameters. With Optuna's storages (SQLite, journal files, PostgreSQL) each
trial records, before Optuna tells it finished, the state it is told and the
sampler state after it (system attribute ``killsafe:end``); several workers
on a storage with Optuna's heartbeat share one study and stop at exactly
``n_trials`` between them (see ``ResumableStudy``).

The checkpoint holds plain data only: each finished trial's params, its
distributions as JSON (``optuna.distributions.distribution_to_json``), values,
state, user and system attributes and intermediate values, plus the random
states of the sampler (numpy ``RandomState`` arrays), so the sampler continues
as if never stopped.

Other ways in, for a study inside a ``killsafe.Run`` or a store of your own:
``StudyState`` is a ``Stateful`` view of a study (one step of the run is one
trial; ``StudyState(study, trials=False, owner=RUN_DIR)`` and
``state.optimize(fn, n_trials=1)`` with an Optuna storage, whose RUNNING
trials of that owner are marked FAIL with ``killsafe:stale`` on resume);
``CheckpointCallback`` saves the study into a ``CheckpointStore`` from
Optuna's callbacks and ``resume_study`` restores the newest checkpoint.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

try:
    import optuna
    from optuna.distributions import distribution_to_json, json_to_distribution
    from optuna.samplers._lazy_random_state import LazyRandomState
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import FrozenTrial, TrialState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("killsafe.integrations.optuna needs Optuna; run: pip install optuna") from exc

from killsafe.errors import ConfigError, StateMismatch
from killsafe.interrupt import StopRequests
from killsafe.store import CheckpointStore

__all__ = [
    "CheckpointCallback",
    "ResumableStudy",
    "StudyState",
    "fail_stale_trials",
    "finished_trials",
    "restore_sampler_from_storage",
    "resumable_study",
    "resume_study",
    "sampler_state",
    "set_sampler_state",
    "study_state",
]

logger = logging.getLogger("killsafe")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
OWNER_ATTR = "killsafe:owner"
SAMPLER_ATTR = "killsafe:sampler"
STALE_ATTR = "killsafe:stale"
END_ATTR = "killsafe:end"
RETRY_OF_ATTR = "killsafe:retry_of"


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
    """Set the sampler to the state recorded by the newest trial that ended as recorded.

    A record is trusted only when the trial ended in the state its own process
    was telling (a trial killed between its record and the tell was failed by
    someone else). Returns that trial, or None (sampler untouched) when no
    trial recorded one.
    """
    for trial in reversed(study.get_trials(deepcopy=False, states=FINISHED)):
        recorded = _recorded_sampler(trial)
        if recorded is not None:
            set_sampler_state(study.sampler, _decode_sampler_state(recorded))
            return trial
    return None


def _recorded_sampler(trial: FrozenTrial) -> Mapping[str, Any] | None:
    """The sampler state ``trial`` recorded, if it ended as recorded; else None."""
    end = trial.system_attrs.get(END_ATTR)
    if end is not None:
        return end["sampler"] if _ended_as_told(trial) else None
    return trial.system_attrs.get(SAMPLER_ATTR) if _ended_as_told(trial) else None


def _ended_as_told(trial: FrozenTrial) -> bool:
    """Whether ``trial`` ended in the state its own process recorded it was telling."""
    attrs = trial.system_attrs
    end = attrs.get(END_ATTR)
    if end is not None:
        return bool(end["state"] == trial.state.name)
    # recorded by an earlier version (the sampler alone): trusted unless failed as stale
    return attrs.get(SAMPLER_ATTR) is not None and not attrs.get(STALE_ATTR)


def _is_cut_short(trial: FrozenTrial) -> bool:
    """A trial of ours that failed without its process telling so (killed or interrupted)."""
    if trial.state != TrialState.FAIL or OWNER_ATTR not in trial.system_attrs:
        return False
    return not _ended_as_told(trial)


def _counts(trial: FrozenTrial) -> bool:
    """Whether ``trial`` counts towards ``n_trials``: it ran to an end its process told."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and not _is_cut_short(trial)


def _waiting_of(study: optuna.Study, owner: str | None) -> list[FrozenTrial]:
    """The WAITING trials (of ``owner``, or all when None): created, not yet started."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return [t for t in waiting if owner is None or t.system_attrs.get(OWNER_ATTR) == owner]


def _reserve(study: optuna.Study, owner: str, **system_attrs: Any) -> None:
    """Add a WAITING trial tagged with ``owner``, for the next ``study.ask()`` to pop.

    The tag is written with the trial in one storage call, so no trial of this
    owner is ever untagged, whatever moment a kill comes.
    """
    attrs = {OWNER_ATTR: owner, **system_attrs}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=attrs))


def _told_state(study: optuna.Study, value: Any) -> str:
    """The state Optuna will give a trial whose objective returned ``value``."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(values) != len(study.directions):
        return "FAIL"
    try:
        feasible = all(not math.isnan(float(v)) for v in values)
    except (TypeError, ValueError):
        return "FAIL"
    return "COMPLETE" if feasible else "FAIL"


def _recording(
    fn: Callable[[optuna.Trial], Any],
    owner: str,
    on_start: Callable[[], None] | None = None,
    *,
    with_sampler: bool = True,
) -> Callable[[optuna.Trial], Any]:
    """``fn`` wrapped to tag its trial with ``owner`` and record how it ends.

    The state the trial is about to be told (and, ``with_sampler``, the
    sampler state) is written into the trial before Optuna tells it: a trial
    found finished in the storage always carries the sampler state after it.
    An interrupt (``KeyboardInterrupt``) records nothing, so the trial counts
    as cut short.
    """

    def recording(trial: optuna.Trial) -> Any:
        if on_start is not None:
            on_start()
        storage, trial_id = trial.study._storage, trial._trial_id
        if storage.get_trial(trial_id).system_attrs.get(OWNER_ATTR) != owner:
            # a trial queued by someone else (enqueue_trial): it is ours now
            storage.set_trial_system_attr(trial_id, OWNER_ATTR, owner)
        told: str | None = None
        try:
            value = fn(trial)
            told = _told_state(trial.study, value)
            return value
        except optuna.TrialPruned:
            told = "PRUNED"
            raise
        except Exception:
            told = "FAIL"
            raise
        finally:
            if told is not None:
                # one write: a trial never holds a told state without its sampler state
                encoded = _encode_sampler_state(sampler_state(trial.study.sampler))
                storage.set_trial_system_attr(
                    trial_id, END_ATTR, {"state": told, "sampler": encoded}
                )

    return recording


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
        recording = _recording(fn, self.owner)
        for _ in range(n_trials):
            if not _waiting_of(self.study, self.owner):
                _reserve(self.study, self.owner)
            self.study.optimize(recording, n_trials=1, **kwargs)
            if getattr(self.study, "_stop_flag", False):  # study.stop() in a callback
                break

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


# -- a study that resumes: study.optimize as people call it -----------------------


class _StudyLock:
    """Serializes "count, reserve, start a trial" among the processes sharing a study.

    ``acquire`` blocks; ``release`` is idempotent, so the trial's start may
    release it early and the loop release it again. A process that dies
    holding it loses it with its file descriptor or its database connection.
    """

    def __init__(self, study: optuna.Study) -> None:
        self._held = False
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._path: str | None = None
        self._connection: Any = None
        self._key = 0
        backend: Any = getattr(study._storage, "_backend", study._storage)
        engine = getattr(backend, "engine", None)
        if engine is not None and engine.dialect.name == "postgresql":
            digest = hashlib.blake2b(f"killsafe:{study._study_id}".encode(), digest_size=8)
            self._key = int.from_bytes(digest.digest(), "big", signed=True)
            self._connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        elif engine is not None and engine.dialect.name == "sqlite" and engine.url.database:
            self._path = f"{engine.url.database}.killsafe-lock"
        elif isinstance(getattr(backend, "_file_path", None), str):
            self._path = f"{backend._file_path}.killsafe-lock"
        elif engine is not None:
            logger.warning(
                "%s storage: workers in other processes are not serialized, so they may "
                "run a few trials past n_trials; use PostgreSQL, SQLite or a journal file",
                engine.dialect.name,
            )

    def acquire(self) -> None:
        self._mutex.acquire()
        if self._connection is not None:
            from sqlalchemy import text

            self._connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        elif self._path is not None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._connection is not None:
            from sqlalchemy import text

            self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self._key})
        elif self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        self._mutex.release()

    def __enter__(self) -> _StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def close(self) -> None:
        self.release()
        if self._connection is not None:
            self._connection.close()
            self._connection = None


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped before the end; run the same command again


class ResumableStudy(optuna.Study):
    """An Optuna study whose ``optimize`` survives stops, kills and crashes.

    Made by ``resumable_study(study, directory)``; it shares the study's
    storage, sampler and pruner. ``optimize(objective, n_trials=N)`` runs
    until the study holds ``N`` trials that ran to their end (COMPLETE,
    PRUNED, or FAIL from the objective itself), so the same command, started
    again after any interruption, ends with exactly ``N``:

    - Ctrl+C or SIGTERM lets the running trial finish, then ``optimize``
      returns with ``finished`` false and ``exit_code`` 75; a second Ctrl+C
      cuts the trial short (``KeyboardInterrupt``) and it is run again on the
      next start.
    - In memory, the study (trials and sampler state) is checkpointed into
      ``directory`` after every trial and restored when wrapped. With one of
      Optuna's storages the trials are durable there, and each trial records
      the sampler state after it before Optuna tells it finished.
    - One process per ``owner`` (the default): a trial the previous process
      left RUNNING is marked FAIL (``killsafe:stale``) and the sampler
      continues from the newest trial that ended as recorded, so the cut trial
      is proposed again with the same parameters and a seeded search proposes
      what an uninterrupted one would.
    - Several workers (with a storage whose heartbeat is on, e.g.
      ``RDBStorage(url, heartbeat_interval=...)``): Optuna fails the trial of
      a dead worker once its heartbeat is stale, and one worker queues it
      again with the same parameters (``killsafe:retry_of``); counting and
      starting trials is serialized (a PostgreSQL advisory lock, or a file
      lock beside a SQLite or journal file) so the workers stop at exactly
      ``N``.

    Not thread-safe: call ``optimize`` from one thread (``n_jobs=1``).
    """

    def __init__(
        self, study: optuna.Study, directory: str | os.PathLike[str] | None, *, owner: str
    ) -> None:
        super().__init__(study.study_name, study._storage, study.sampler, study.pruner)
        self.owner = owner
        self.finished = False
        self.stop_reason: str | None = None
        self.store: CheckpointStore | None = None
        self._saved = 0  # the step of the newest checkpoint (in memory)
        self._waited = False  # whether waiting for other processes was logged
        self.workers = is_heartbeat_enabled(self._storage)
        if isinstance(self._storage, optuna.storages.InMemoryStorage):
            if directory is None:
                raise ConfigError(
                    f"study {study.study_name!r} is in memory: give resumable_study a directory "
                    "for its checkpoints, or use an Optuna storage (sqlite:///...)"
                )
            self.store = CheckpointStore(Path(directory) / "checkpoints", keep_last=2)
            self._saved = resume_study(self.store, self)
        elif not self.workers:
            fail_stale_trials(self, owner)
            restore_sampler_from_storage(self)
        self._lock = _StudyLock(self)

    @property
    def exit_code(self) -> int:
        """0 once ``optimize`` reached ``n_trials``; 75 when it stopped before (run it again)."""
        return 0 if self.finished else EXIT_STOPPED

    def ran_to_end(self) -> list[FrozenTrial]:
        """The trials that count towards ``n_trials``: those that ran to an end they told."""
        return [t for t in self.get_trials(deepcopy=False) if _counts(t)]

    def optimize(
        self,
        func: Callable[[optuna.Trial], Any],
        n_trials: int | None = None,
        timeout: float | None = None,
        n_jobs: int = 1,
        catch: Iterable[type[Exception]] | type[Exception] = (),
        callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
        gc_after_trial: bool = False,
        show_progress_bar: bool = False,
    ) -> None:
        """Run trials until the study holds ``n_trials`` that ran to their end.

        Unlike ``optuna.Study.optimize``, ``n_trials`` counts the trials of
        earlier starts too; ``show_progress_bar`` is ignored. ``timeout``
        (seconds) limits this call. Returns
        when done (``finished`` true), at ``timeout``, after ``study.stop()``
        or after a stop signal (``stop_reason`` says which signal).
        """
        if n_jobs != 1:
            raise ConfigError(
                f"n_jobs={n_jobs}: a resumable study runs one trial at a time per process; "
                "start more processes on a shared storage instead"
            )
        self.finished = False
        self.stop_reason = None
        deadline = None if timeout is None else time.monotonic() + timeout
        stops = StopRequests()
        stops.install()
        # In memory the checkpoint holds the sampler state: trials need not.
        recording = _recording(
            func, self.owner, on_start=self._lock.release, with_sampler=self.store is None
        )
        try:
            while stops.reason is None and (deadline is None or time.monotonic() < deadline):
                if not self._one_trial(recording, n_trials, catch, callbacks, gc_after_trial):
                    break
                if self._stop_flag:  # study.stop() from a callback
                    break
        finally:
            stops.restore()
            self._lock.release()
            if self.store is not None:
                self.store.close()  # another process may continue the search now
        self.stop_reason = stops.reason
        if self.stop_reason is not None and not self.finished:
            logger.warning(
                "optuna: stopped (%s) with %d of %s trials run; run the same command to continue",
                self.stop_reason,
                len(self.ran_to_end()),
                n_trials,
            )

    def _one_trial(
        self,
        recording: Callable[[optuna.Trial], Any],
        n_trials: int | None,
        catch: Iterable[type[Exception]] | type[Exception],
        callbacks: Iterable[Callable[[optuna.Study, FrozenTrial], None]] | None,
        gc_after_trial: bool,
    ) -> bool:
        """Start one trial (or wait for other workers' trials); False once there are enough."""
        with self._lock:  # released by the trial's start, or here
            trials = self._recover()
            counted = sum(1 for t in trials if _counts(t))
            if n_trials is not None and counted >= n_trials:
                self.finished = True
                return False
            waiting = [t for t in trials if t.state == TrialState.WAITING]
            running = sum(1 for t in trials if t.state == TrialState.RUNNING)
            if n_trials is not None and not waiting and counted + running >= n_trials:
                self._lock.release()
                self._wait_for_others(counted, running, n_trials)
                return True
            if not waiting:
                _reserve(self, self.owner)
            self._keep_waiting_alive()
            catching = tuple(catch) if isinstance(catch, Iterable) else (catch,)
            try:
                super().optimize(
                    recording,
                    n_trials=1,
                    catch=catching,
                    callbacks=callbacks,
                    gc_after_trial=gc_after_trial,
                )
            except Exception:
                self._checkpoint()  # a crash resumes after the trial that raised
                raise
        self._checkpoint()
        return True

    def _recover(self) -> list[FrozenTrial]:
        """With workers: fail dead workers' trials and queue each cut trial once again."""
        if not self.workers:
            return self.get_trials(deepcopy=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self)
        trials = self.get_trials(deepcopy=False)
        retried = {t.system_attrs.get(RETRY_OF_ATTR) for t in trials}
        cut = [t for t in trials if _is_cut_short(t) and t.number not in retried]
        for trial in cut:
            fixed = {"fixed_params": dict(trial.params), RETRY_OF_ATTR: trial.number}
            _reserve(self, self.owner, **fixed)
            logger.info("optuna: trial %d was cut short; queued again", trial.number)
        return self.get_trials(deepcopy=False) if cut else trials

    def _keep_waiting_alive(self) -> None:
        """Fresh heartbeats for WAITING trials: one popped by a worker that dies goes stale."""
        if self.workers:
            for trial in _waiting_of(self, None):
                self._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]

    def _wait_for_others(self, counted: int, running: int, n_trials: int) -> None:
        """The last trials run in other processes: wait, as one of them may die."""
        if not self._waited:
            advice = (
                "a dead worker's trial is failed once its heartbeat is stale"
                if self.workers
                else "without Optuna's heartbeat (RDBStorage(heartbeat_interval=...)) a trial "
                "of a dead process stays RUNNING: fail it, or turn the heartbeat on"
            )
            logger.warning(
                "optuna: %d of %d trials ran, %d run in other processes; waiting (%s)",
                counted,
                n_trials,
                running,
                advice,
            )
            self._waited = True
        interval = getattr(self._storage, "get_heartbeat_interval", lambda: None)()
        time.sleep(min(interval or 1, 1))

    def _checkpoint(self) -> None:
        if self.store is None:
            return
        state = study_state(self)
        finished = state["n_finished"]
        if finished <= self._saved:
            return
        metrics = {} if state["best_value"] is None else {"best_value": state["best_value"]}
        self.store.save({"study": state}, step=finished, reason="trial", metrics=metrics)
        self._saved = finished


def resumable_study(
    study: optuna.Study,
    directory: str | os.PathLike[str] | None = None,
    *,
    owner: str = "killsafe",
) -> ResumableStudy:
    """Wrap ``study`` so that ``study.optimize(objective, n_trials=N)`` is safe to kill.

    ``directory`` holds the checkpoints of an in-memory study (required then;
    unused with an Optuna storage). ``owner`` names this process among those
    sharing a study without heartbeats; keep the default with one process.
    See ``ResumableStudy``::

        study = resumable_study(optuna.create_study(sampler=TPESampler(seed=0)), "runs/search")
        study.optimize(objective, n_trials=40)     # the same command resumes
        sys.exit(study.exit_code)                  # 0 when done, 75 when stopped
    """
    return ResumableStudy(study, directory, owner=owner)
