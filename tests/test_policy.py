"""Save and stop policies as tables: a boundary in, a decision out, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from killsafe.errors import ConfigError
from killsafe.policy import (
    AnyOf,
    AtSteps,
    Boundary,
    EarlyStopping,
    EveryNSeconds,
    EveryNSteps,
    OnExit,
    OnImprovement,
    OnRequest,
    SavePolicy,
    TimeLimit,
    describe_save_policy,
    is_better,
    parse_duration,
)


@dataclass(frozen=True)
class OddSteps:
    """A policy of one's own that answers True or False."""

    def should_save(self, boundary: Boundary) -> bool:
        return boundary.step % 2 == 1


@dataclass(frozen=True)
class WarmupSteps:
    """A policy of one's own that gives its own reason."""

    def should_save(self, boundary: Boundary) -> str | None:
        return "warmup" if boundary.step <= 2 else None


@pytest.mark.parametrize(
    ("policy", "boundary", "expected"),
    [
        (EveryNSteps(3), Boundary(step=0), None),
        (EveryNSteps(3), Boundary(step=2), None),
        (EveryNSteps(3), Boundary(step=3), "periodic"),
        (EveryNSteps(3), Boundary(step=7), None),
        (EveryNSteps(3), Boundary(step=9, last_save_step=8), "periodic"),
        (EveryNSteps(1), Boundary(step=1), "periodic"),
        (EveryNSeconds(60), Boundary(step=5, since_save=59.9), None),
        (EveryNSeconds(60), Boundary(step=5, since_save=60.0), "periodic"),
        (EveryNSeconds(0.5), Boundary(step=5, since_save=3.0), "periodic"),
        (AtSteps([10, 20]), Boundary(step=10), "periodic"),
        (AtSteps([10, 20]), Boundary(step=15), None),
        (OnImprovement("loss"), Boundary(step=1, metrics={"loss": 1.0}), "best"),
        (OnImprovement("loss"), Boundary(step=1, metrics={"acc": 1.0}), None),
        (
            OnImprovement("loss"),
            Boundary(step=2, metrics={"loss": 0.9}, best={"loss": 1.0}),
            "best",
        ),
        (OnImprovement("loss"), Boundary(step=2, metrics={"loss": 1.0}, best={"loss": 1.0}), None),
        (OnImprovement("loss"), Boundary(step=2, metrics={"loss": 1.1}, best={"loss": 1.0}), None),
        (
            OnImprovement("loss", min_delta=0.2),
            Boundary(step=2, metrics={"loss": 0.9}, best={"loss": 1.0}),
            None,
        ),
        (
            OnImprovement("acc", mode="max"),
            Boundary(step=2, metrics={"acc": 0.8}, best={"acc": 0.7}),
            "best",
        ),
        (
            OnImprovement("acc", mode="max"),
            Boundary(step=2, metrics={"acc": float("nan")}, best={"acc": 0.7}),
            None,
        ),
        (OnExit(), Boundary(step=4), None),
        (OnExit(), Boundary(step=4, exiting=True), "exit"),
        (OnRequest(), Boundary(step=4), None),
        (OnRequest(), Boundary(step=4, requested=True), "request"),
        (AnyOf(EveryNSteps(10), OnExit()), Boundary(step=10), "periodic"),
        (AnyOf(EveryNSteps(10), OnExit()), Boundary(step=11), None),
        (AnyOf(EveryNSteps(10), OnExit()), Boundary(step=11, exiting=True), "exit"),
        # The first reason wins.
        (AnyOf(EveryNSteps(10), OnExit()), Boundary(step=10, exiting=True), "periodic"),
        (AnyOf(OnExit(), EveryNSteps(10)), Boundary(step=10, exiting=True), "exit"),
        (AnyOf(OnRequest(), OddSteps()), Boundary(step=3, requested=True), "request"),
        # A policy answering True or False still works: True is the reason "policy".
        (AnyOf(OddSteps()), Boundary(step=3), "policy"),
        (AnyOf(OddSteps()), Boundary(step=4), None),
        (AnyOf(OddSteps(), OnRequest()), Boundary(step=4, requested=True), "request"),
        (AnyOf(OddSteps(), WarmupSteps()), Boundary(step=2), "warmup"),
        (EveryNSteps(10) | EveryNSeconds(5), Boundary(step=3, since_save=6), "periodic"),
        (AnyOf(), Boundary(step=10, exiting=True), None),
    ],
)
def test_save_policy_table(policy: SavePolicy, boundary: Boundary, expected: str | None) -> None:
    assert policy.should_save(boundary) == expected


def test_any_of_flattens_and_is_frozen() -> None:
    combined = EveryNSteps(2) | EveryNSeconds(3) | OnExit()
    assert combined == AnyOf(EveryNSteps(2), EveryNSeconds(3), OnExit())
    assert len(combined.policies) == 3
    with pytest.raises(AttributeError):
        combined.policies = ()  # type: ignore[misc]
    assert hash(EveryNSteps(5)) == hash(EveryNSteps(5))


@pytest.mark.parametrize(
    "build",
    [
        lambda: EveryNSteps(0),
        lambda: EveryNSteps(2.5),  # type: ignore[arg-type]
        lambda: EveryNSteps(True),  # type: ignore[arg-type]
        lambda: EveryNSeconds(0),
        lambda: EveryNSeconds(math.inf),
        lambda: AtSteps([0]),
        lambda: OnImprovement(""),
        lambda: OnImprovement("loss", mode="lowest"),
        lambda: OnImprovement("loss", min_delta=-1),
        lambda: AnyOf("every 5"),  # type: ignore[arg-type]
        lambda: TimeLimit(-3),
        lambda: EarlyStopping("loss", patience=0),
        lambda: EarlyStopping("loss", mode="up"),
    ],
)
def test_bad_policies_are_refused_when_built(build: object) -> None:
    with pytest.raises(ConfigError):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("elapsed", "step_seconds", "expected"),
    [
        (0.0, 0.0, None),
        (99.0, 0.0, None),
        (100.0, 0.0, "time-limit"),
        (95.0, 6.0, "time-limit"),
        (90.0, 6.0, None),
    ],
)
def test_time_limit_leaves_room_for_one_more_step(
    elapsed: float, step_seconds: float, expected: str | None
) -> None:
    boundary = Boundary(step=1, elapsed=elapsed, step_seconds=step_seconds)
    assert TimeLimit(100).should_stop(boundary) == expected


@pytest.mark.parametrize(
    ("mode", "patience", "min_delta", "values", "stops_at"),
    [
        ("min", 2, 0.0, [1.0, 0.9, 0.95, 0.91], 3),
        ("min", 2, 0.0, [1.0, 0.9, 0.95, 0.8, 0.85, 0.86], 5),
        ("min", 3, 0.0, [1.0, 1.0, 1.0, 1.0], 3),
        ("min", 1, 0.5, [1.0, 0.8], 1),
        ("max", 2, 0.0, [0.1, 0.2, 0.3, 0.4], None),
        ("max", 2, 0.0, [0.5, 0.4, 0.3], 2),
    ],
)
def test_early_stopping_table(
    mode: str, patience: int, min_delta: float, values: list[float], stops_at: int | None
) -> None:
    stopper = EarlyStopping("val", mode=mode, patience=patience, min_delta=min_delta)
    first_stop = None
    for i, value in enumerate(values):
        reason = stopper.should_stop(Boundary(step=i + 1, metrics={"val": value}))
        if reason is not None and first_stop is None:
            assert reason == "early-stop"
            first_stop = i
    assert first_stop == stops_at


def test_early_stopping_counts_only_evaluations_and_round_trips_its_counters() -> None:
    stopper = EarlyStopping("val", patience=2)
    stopper.should_stop(Boundary(step=1, metrics={"val": 1.0}))
    stopper.should_stop(Boundary(step=2, metrics={"loss": 5.0}))  # not an evaluation
    stopper.should_stop(Boundary(step=3, metrics={"val": 2.0}))
    assert stopper.state_dict() == {"best": 1.0, "bad_evaluations": 1}
    resumed = EarlyStopping("val", patience=2)
    resumed.load_state_dict(stopper.state_dict())
    assert resumed.should_stop(Boundary(step=4, metrics={"val": 3.0})) == "early-stop"


@pytest.mark.parametrize(
    ("value", "best", "mode", "delta", "expected"),
    [
        (1.0, 2.0, "min", 0.0, True),
        (2.0, 1.0, "min", 0.0, False),
        (2.0, 1.0, "max", 0.0, True),
        (1.05, 1.0, "max", 0.1, False),
        (math.nan, 1.0, "min", 0.0, False),
    ],
)
def test_is_better(value: float, best: float, mode: str, delta: float, expected: bool) -> None:
    assert is_better(value, best, mode, delta) is expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3h50m", 13800.0),
        ("90s", 90.0),
        ("90m", 5400.0),
        ("1d2h", 93600.0),
        ("1.5h", 5400.0),
        ("45", 45.0),
        (" 2H 30M ", 9000.0),
        (12, 12.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "3x", "h", "3h50", "-5", "0", "soon", "1h-2m"])
def test_parse_duration_refuses_nonsense(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


@dataclass(frozen=True)
class Nightly:
    """A policy of one's own that says what it does."""

    def should_save(self, boundary: Boundary) -> None:
        return None

    def describe(self) -> str:
        return "every night"


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (
            AnyOf(OnExit(), EveryNSteps(500), EveryNSeconds(600), OnRequest()),
            "every 500 steps, every 10 min and on exit",
        ),
        (AnyOf(OnExit(), EveryNSeconds(600), OnRequest()), "every 10 min and on exit"),
        (EveryNSteps(1), "every step"),
        (EveryNSeconds(45), "every 45 s"),
        (EveryNSeconds(5400), "every 1 h 30 min"),
        (EveryNSeconds(90.4), "every 1 min 30 s"),
        (EveryNSeconds(2 * 86400), "every 2 d"),
        (AnyOf(AtSteps([10, 20]), OnExit()), "at steps (10, 20) and on exit"),
        (AtSteps(range(1, 100)), "at steps (1, 2, 3, ..., 99)"),
        (OnImprovement("val_loss") | OnExit(), "when val_loss improves and on exit"),
        (AnyOf(OnExit(), OnRequest()), "on exit"),
        (AnyOf(OnRequest()), "only on request"),
        (AnyOf(OnExit(), Nightly()), "every night and on exit"),
        (AnyOf(OnExit(), OddSteps()), "by OddSteps and on exit"),
    ],
)
def test_a_save_policy_in_words(policy: SavePolicy, words: str) -> None:
    assert describe_save_policy(policy) == words
