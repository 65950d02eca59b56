"""When to save, and when to stop: small policy objects over plain data.

A ``Run`` asks its policies at every step boundary, handing them a ``Boundary``
(the step, the clocks, the metrics logged during the step, the best values so
far, whether the run is exiting or a save was requested). Save policies are
frozen dataclasses with one pure method, ``should_save(boundary) -> reason |
None``: the reason a checkpoint is due (``"periodic"``, ``"best"``, ...), which
the checkpoint records. They are validated when built and composed with
``AnyOf`` or ``|``, where the first reason wins::

    policy = EveryNSteps(500) | EveryNSeconds(600) | OnImprovement("val_loss")
    policy.should_save(Boundary(step=500))  # "periodic"

A policy of your own may also answer ``True``/``False``; ``True`` counts as
the reason ``"policy"``.

Stop policies answer ``should_stop(boundary) -> reason | None``. ``TimeLimit``
is pure; ``EarlyStopping`` keeps counters and is ``Stateful``, so a ``Run``
saves them with each checkpoint and a resumed run keeps its patience.

The ``Run`` keyword shortcuts (``save_every_steps=``, ``save_every_seconds=``,
``save_every_epochs=``, ``stop_after=``) build these objects (with none given,
``EveryEpochOrNSeconds``); ``describe_save_policy`` says in one line when a
policy saves; ``Run(save=POLICY, stop_policy=POLICY)``
takes your own. Retention (which checkpoints to keep) lives in ``retention``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, runtime_checkable

from killsafe.errors import ConfigError

__all__ = [
    "AnyOf",
    "AtSteps",
    "Boundary",
    "EarlyStopping",
    "EveryEpochOrNSeconds",
    "EveryNEpochs",
    "EveryNSeconds",
    "EveryNSteps",
    "OnExit",
    "OnImprovement",
    "OnRequest",
    "SavePolicy",
    "StopPolicy",
    "TimeLimit",
    "describe_save_policy",
    "is_better",
    "parse_duration",
]

MODES = ("min", "max")


_NO_VALUES: Mapping[str, Any] = MappingProxyType({})


class Boundary(NamedTuple):
    """What a policy sees at a step boundary (or when the run is about to exit).

    A named tuple: built after every step, so it must be cheap.

    Attributes:
        step: steps completed so far.
        elapsed: seconds since this session started.
        since_save: seconds since the last committed checkpoint, or since the
            loop started when none was committed in this session.
        last_save_step: the step of the last committed checkpoint, if any.
        metrics: the metrics logged during the step just finished (latest values).
        best: the best value of each watched metric before ``metrics``.
        step_seconds: the mean wall time of one step in this session (0 when unknown).
        exiting: the run is about to end (finished or a stop was requested).
        requested: a save was asked for (``run.save()`` or a control request).
        epoch: with ``run.epochs()``, the epoch whose end code has not run yet
            (at an epoch end: the epochs completed); ``None`` in a flat loop.
        epoch_end: ``run.epochs()`` advanced here, after the epoch's end code.
    """

    step: int
    elapsed: float = 0.0
    since_save: float = 0.0
    last_save_step: int | None = None
    metrics: Mapping[str, Any] = _NO_VALUES
    best: Mapping[str, float] = _NO_VALUES
    step_seconds: float = 0.0
    exiting: bool = False
    requested: bool = False
    epoch: int | None = None
    epoch_end: bool = False


@runtime_checkable
class SavePolicy(Protocol):
    """Decides whether a checkpoint is due at a boundary, and why. Must not do I/O.

    ``should_save`` returns the reason (a short word the checkpoint records)
    or ``None``; ``True`` means the reason ``"policy"``, ``False`` means not due.
    """

    def should_save(self, boundary: Boundary) -> str | bool | None: ...


@runtime_checkable
class StopPolicy(Protocol):
    """Decides whether the run should stop at a boundary; returns the reason or ``None``."""

    def should_stop(self, boundary: Boundary) -> str | None: ...


class _Composable:
    def __or__(self, other: SavePolicy) -> AnyOf:
        return AnyOf(self, other)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EveryNSteps(_Composable):
    """Save when the step count is a multiple of ``n`` (step 500, 1000, ... for ``n=500``).

    Multiples, not "n steps since the last save", so checkpoints stay aligned
    after a resume from an emergency checkpoint at an odd step.
    """

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ConfigError(f"EveryNSteps(n={self.n!r}): n must be a positive integer")

    def should_save(self, boundary: Boundary) -> str | None:
        return "periodic" if boundary.step > 0 and boundary.step % self.n == 0 else None


@dataclass(frozen=True)
class EveryNSeconds(_Composable):
    """Save when ``seconds`` of wall time have passed since the last checkpoint."""

    seconds: float

    def __post_init__(self) -> None:
        if not _positive_number(self.seconds):
            raise ConfigError(
                f"EveryNSeconds(seconds={self.seconds!r}): seconds must be a positive number"
            )

    def should_save(self, boundary: Boundary) -> str | None:
        return "periodic" if boundary.since_save >= self.seconds else None


@dataclass(frozen=True)
class EveryNEpochs(_Composable):
    """Save at the end of every ``n``-th epoch of ``run.epochs()``, after its end code."""

    n: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ConfigError(f"EveryNEpochs(n={self.n!r}): n must be a positive integer")

    def should_save(self, boundary: Boundary) -> str | None:
        if boundary.epoch_end and boundary.epoch is not None and boundary.epoch % self.n == 0:
            return "periodic"
        return None


@dataclass(frozen=True)
class EveryEpochOrNSeconds(_Composable):
    """The default with no save policy given: every epoch of ``run.epochs()``, else every
    ``seconds`` of wall time (a flat loop)."""

    seconds: float

    def __post_init__(self) -> None:
        if not _positive_number(self.seconds):
            raise ConfigError(
                f"EveryEpochOrNSeconds(seconds={self.seconds!r}): use a positive number"
            )

    def should_save(self, boundary: Boundary) -> str | None:
        if boundary.epoch is not None:
            return "periodic" if boundary.epoch_end else None
        return "periodic" if boundary.since_save >= self.seconds else None


@dataclass(frozen=True)
class AtSteps(_Composable):
    """Save at each of the given step counts."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        values = frozenset(steps)
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in values):
            raise ConfigError(f"AtSteps({sorted(values)!r}): steps must be positive integers")
        object.__setattr__(self, "steps", values)

    def should_save(self, boundary: Boundary) -> str | None:
        return "periodic" if boundary.step in self.steps else None


@dataclass(frozen=True)
class OnImprovement(_Composable):
    """Save when a logged ``metric`` beats its best so far by more than ``min_delta``.

    The first value logged counts as an improvement.
    """

    metric: str
    mode: str = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        _check_metric(self.metric, self.mode, self.min_delta, "OnImprovement")

    def should_save(self, boundary: Boundary) -> str | None:
        value = _number(boundary.metrics.get(self.metric))
        if value is None:
            return None
        best = boundary.best.get(self.metric)
        improved = best is None or is_better(value, best, self.mode, self.min_delta)
        return "best" if improved else None


@dataclass(frozen=True)
class OnExit(_Composable):
    """Save when the run ends: finished, or stopped (signal, ``q``, time limit, request).

    Its reason is ``"exit"``; a ``Run`` records why it ends instead
    (``finished``, ``signal:SIGTERM``, ...).
    """

    def should_save(self, boundary: Boundary) -> str | None:
        return "exit" if boundary.exiting else None


@dataclass(frozen=True)
class OnRequest(_Composable):
    """Save when asked: ``run.save()`` or a ``save`` request from another process."""

    def should_save(self, boundary: Boundary) -> str | None:
        return "request" if boundary.requested else None


@dataclass(frozen=True)
class AnyOf(_Composable):
    """Save when any of ``policies`` says so, for the first reason given, in order.

    Nested ``AnyOf`` are flattened. A policy that answers ``True`` gives the
    reason ``"policy"``.
    """

    policies: tuple[SavePolicy, ...]

    def __init__(self, *policies: SavePolicy) -> None:
        flat: list[SavePolicy] = []
        for policy in policies:
            if isinstance(policy, AnyOf):
                flat.extend(policy.policies)
            elif isinstance(policy, SavePolicy):
                flat.append(policy)
            else:
                raise ConfigError(
                    f"AnyOf got {type(policy).__name__}; pass save policies "
                    "(objects with should_save(boundary) -> reason or None)"
                )
        object.__setattr__(self, "policies", tuple(flat))

    def should_save(self, boundary: Boundary) -> str | None:
        for policy in self.policies:
            reason = policy.should_save(boundary)
            if reason:
                return reason if isinstance(reason, str) else "policy"
        return None


@dataclass(frozen=True)
class TimeLimit:
    """Stop (with a checkpoint) before ``seconds`` of wall time have passed in this session.

    It stops at the first boundary where one more step of the mean length
    seen so far would cross the limit, so a job with a wall-time limit ends
    cleanly instead of being killed mid-step. Reason: ``time-limit``.
    """

    seconds: float

    def __post_init__(self) -> None:
        if not _positive_number(self.seconds):
            raise ConfigError(f"TimeLimit(seconds={self.seconds!r}): use a positive number")

    def should_stop(self, boundary: Boundary) -> str | None:
        if boundary.elapsed + boundary.step_seconds >= self.seconds:
            return "time-limit"
        return None


class EarlyStopping:
    """Stop when ``metric`` has not improved (by ``min_delta``) for ``patience`` evaluations.

    Each boundary whose metrics hold ``metric`` is one evaluation. The counters
    (best value, evaluations without improvement) are saved with every
    checkpoint through ``state_dict``/``load_state_dict``. Reason: ``early-stop``.

    Example::

        stopper = EarlyStopping("val_loss", patience=2)
        for loss in (1.0, 0.9, 0.95, 0.91):
            reason = stopper.should_stop(Boundary(step=1, metrics={"val_loss": loss}))
        assert reason == "early-stop"
    """

    def __init__(
        self, metric: str, *, mode: str = "min", patience: int = 10, min_delta: float = 0.0
    ) -> None:
        _check_metric(metric, mode, min_delta, "EarlyStopping")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(f"EarlyStopping(patience={patience!r}): use a positive integer")
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_evaluations = 0

    def should_stop(self, boundary: Boundary) -> str | None:
        value = _number(boundary.metrics.get(self.metric))
        if value is None:
            return None
        if self.best is None or is_better(value, self.best, self.mode, self.min_delta):
            self.best = value
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        return "early-stop" if self.bad_evaluations >= self.patience else None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evaluations": self.bad_evaluations}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.bad_evaluations = int(state["bad_evaluations"])

    def __repr__(self) -> str:
        return (
            f"EarlyStopping({self.metric!r}, mode={self.mode!r}, patience={self.patience}, "
            f"min_delta={self.min_delta})"
        )


def describe_save_policy(policy: SavePolicy, *, epochs: bool | None = None) -> str:
    """A save policy in words, as a run's start line shows it.

    ``"every 500 steps, every 10 min and on exit"``. ``OnRequest`` goes
    unsaid (every run saves when asked) unless it is the only policy:
    ``"only on request"``. A policy of your own is named by its
    ``describe()`` method when it has one, else by its class name.
    ``epochs`` says whether the loop is ``run.epochs()`` (``None``: not
    known yet), which decides what the default policy does.
    """
    policies = policy.policies if isinstance(policy, AnyOf) else (policy,)
    said = [_describe_one(p, epochs) for p in policies if not isinstance(p, (OnExit, OnRequest))]
    if any(isinstance(p, OnExit) for p in policies):
        said.append("on exit")
    if not said:
        return "only on request"
    return said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]


def _describe_one(policy: SavePolicy, epochs: bool | None) -> str:
    if isinstance(policy, EveryNSteps):
        return "every step" if policy.n == 1 else f"every {policy.n} steps"
    if isinstance(policy, EveryNSeconds):
        return f"every {_spoken_duration(policy.seconds)}"
    if isinstance(policy, EveryNEpochs):
        return "every epoch" if policy.n == 1 else f"every {policy.n} epochs"
    if isinstance(policy, EveryEpochOrNSeconds):
        seconds = f"every {_spoken_duration(policy.seconds)}"
        if epochs is None:
            return f"every epoch with run.epochs(), else {seconds}"
        return "every epoch" if epochs else seconds
    if isinstance(policy, AtSteps):
        steps = sorted(policy.steps)
        shown = steps if len(steps) <= 4 else [*steps[:3], "...", steps[-1]]
        return f"at steps ({', '.join(map(str, shown))})"
    if isinstance(policy, OnImprovement):
        return f"when {policy.metric} improves"
    describe = getattr(policy, "describe", None)
    if callable(describe):
        return str(describe())
    return f"by {type(policy).__name__}"


def _spoken_duration(seconds: float) -> str:
    """``"45 s"``, ``"10 min"``, ``"1 h 30 min"``, ``"2 d"``: a duration for a sentence."""
    if seconds < 60:
        return f"{seconds:g} s"
    whole = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        count, whole = divmod(whole, size)
        if count:
            parts.append(f"{count} {unit}")
    return " ".join(parts[:2])


def is_better(value: float, best: float, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (``mode`` "min" or "max")."""
    if math.isnan(value):
        return False
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"3h50m"``, ``"90s"``, ``"1d2h"``, ``"1.5h"`` or a plain number of seconds.

    Raises ``ConfigError`` on anything else, or on a duration that is not positive.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        cleaned = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(cleaned)
        except ValueError:
            parts = _DURATION_PART.findall(cleaned)
            if not parts or "".join(n + u for n, u in parts) != cleaned:
                raise ConfigError(
                    f"duration {text!r} not understood; write it like 3h50m, 90m, 45s or 1d2h"
                ) from None
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not _positive_number(seconds):
        raise ConfigError(f"duration {text!r} must be positive")
    return seconds


def _check_metric(metric: str, mode: str, min_delta: float, owner: str) -> None:
    if not isinstance(metric, str) or not metric:
        raise ConfigError(f"{owner}(metric={metric!r}): name a logged metric")
    if mode not in MODES:
        raise ConfigError(f"{owner}(mode={mode!r}): use 'min' or 'max'")
    if not isinstance(min_delta, (int, float)) or min_delta < 0:
        raise ConfigError(f"{owner}(min_delta={min_delta!r}): use a number >= 0")


def _positive_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if hasattr(value, "item"):  # numpy and torch scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    if isinstance(value, (int, float)):
        return float(value)
    return None
