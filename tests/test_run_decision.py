"""The step boundary's one value: a ``Decision``, cast as a ``Vote``, settled from the
``Agreement`` every process acts on."""

from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

import killsafe
from killsafe.distributed.coordinator import Agreement, LocalCoordinator, Pending, Vote
from killsafe.errors import ConfigError
from killsafe.run.boundary import NOTHING, Decision, settle, vote_for

DECISIONS = [
    NOTHING,
    Decision(save=True, save_reason="periodic"),
    Decision(save=True, save_reason="request", name="asked", note="looks good"),
    Decision(stop=True, stop_reason="finished", save=True, save_reason="finished"),
    Decision(stop=True, stop_reason="exit"),
    Decision(stop=True, stop_reason="signal:SIGTERM", asked=True, save=True, save_reason="x"),
]


def test_one_process_acts_on_exactly_what_it_decided() -> None:
    coordinator = LocalCoordinator()
    for decision in DECISIONS:
        assert settle(decision, coordinator.agree(vote_for(decision))) == decision


def test_nothing_to_do_is_one_shared_empty_vote() -> None:
    assert vote_for(NOTHING) == Vote()
    assert settle(NOTHING, LocalCoordinator().agree(vote_for(NOTHING))) is NOTHING


def test_a_stop_asked_by_another_process_is_announced_here() -> None:
    agreed = settle(NOTHING, Agreement(stop="signal:SIGTERM", stopped_by=1))
    assert (agreed.stop, agreed.stop_reason, agreed.asked, agreed.save) == (
        True,
        "signal:SIGTERM",
        True,
        False,
    )


def test_the_save_and_name_are_the_agreed_ones_the_note_stays_local() -> None:
    mine = Decision(save=True, save_reason="request", name="mine", note="a note")
    agreed = settle(mine, Agreement(save="periodic", name=None))
    assert (agreed.save_reason, agreed.name, agreed.note) == ("periodic", None, "a note")
    assert settle(mine, Agreement()) is NOTHING


class RecordingCoordinator(LocalCoordinator):
    def __init__(self) -> None:
        self.votes: list[Vote] = []

    def agree(self, vote: Vote) -> Agreement:
        self.votes.append(vote)
        return super().agree(vote)


def quiet_run(directory: Path, coordinator: LocalCoordinator, **options: Any) -> killsafe.Run:
    """A synchronous Run that shows nothing, deciding through ``coordinator``."""
    run = killsafe.Run(
        directory, async_save=False, progress=False, keyboard=False, report=False, **options
    )
    run._parts = dataclasses.replace(run._parts, coordinator=coordinator)
    return run


def test_every_boundary_of_a_run_is_agreed_through_its_coordinator(tmp_path: Path) -> None:
    coordinator = RecordingCoordinator()
    run = quiet_run(tmp_path / "run", coordinator, total_steps=3, save_every_steps=2)
    with run:
        run.track(counter={"n": 0})
        for _ in run.steps():
            run.state["counter"]["n"] += 1
    assert coordinator.votes == [
        Vote(),
        Vote(save="periodic"),
        Vote(stop="finished", save="finished"),
    ]
    saved = [
        (c.step, c.reason) for c in killsafe.CheckpointStore(tmp_path / "run/checkpoints").list()
    ]
    assert saved == [(2, "periodic"), (3, "finished")]


class LoneJobCoordinator(RecordingCoordinator):
    """Rank 0 of a pretend job of two whose other rank never raises a flag."""

    world_size = 2

    def __init__(self) -> None:
        super().__init__()
        self.flags: list[tuple[int, tuple[int, ...]]] = []  # (boundary, values) sent
        self.boundary = 0

    def max_async(self, values: tuple[int, ...]) -> Pending[tuple[int, ...]]:
        self.flags.append((self.boundary, values))
        return Pending.settled(values)


def run_job_steps(
    tmp_path: Path, steps: int, step_seconds: float, stop_at: int | None = None
) -> tuple[LoneJobCoordinator, killsafe.Run]:
    coordinator = LoneJobCoordinator()
    run = quiet_run(tmp_path / "run", coordinator, total_steps=steps, save_every_steps=10**6)
    with run:
        for step in run.steps():
            coordinator.boundary = step
            time.sleep(step_seconds)
            if step == stop_at:
                run.stop()
    return coordinator, run


def test_short_steps_exchange_flags_every_few_boundaries_as_rank_0_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILLSAFE_FLAG_PERIOD", "0.05")
    coordinator, run = run_job_steps(tmp_path, 60, 0.005)
    sent = coordinator.flags
    assert 3 <= len(sent) <= 30  # 5 ms steps and a 50 ms period: not at every boundary
    for (boundary, values), (next_boundary, _) in itertools.pairwise(sent):
        assert values[2] >= 2  # rank 0's wait, in boundaries
        assert next_boundary - boundary == values[2]
    assert run.exit_reason == "finished"


def test_a_stop_between_exchanges_waits_for_the_next_one_then_every_rank_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILLSAFE_FLAG_PERIOD", "0.05")
    coordinator, run = run_job_steps(tmp_path, 1000, 0.005, stop_at=23)
    raised = [boundary for boundary, values in coordinator.flags if values[0]]
    assert raised and raised[0] >= 23
    # body 23 asked; its boundary (step 24) or a later one sent the flag, and
    # the boundary after that one agreed in full and stopped
    assert run.step == raised[0] + 2
    assert (run.exit_reason, coordinator.votes[-1].stop) == ("stop", "stop")


def test_a_period_of_zero_exchanges_flags_at_every_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILLSAFE_FLAG_PERIOD", "0")
    coordinator, _ = run_job_steps(tmp_path, 10, 0.0)
    assert [boundary for boundary, _ in coordinator.flags] == list(range(9))
    assert {values[2] for _, values in coordinator.flags} == {1}


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "3600"])
def test_a_bad_flag_period_is_one_clear_error(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILLSAFE_FLAG_PERIOD", value)
    with pytest.raises(ConfigError, match=r"KILLSAFE_FLAG_PERIOD=.* is not a number of seconds"):
        run_job_steps(tmp_path, 3, 0.0)
