"""The step boundary's one value: a ``Decision``, cast as a ``Vote``, settled from the
``Agreement`` every process acts on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import killsafe
from killsafe.distributed.coordinator import Agreement, LocalCoordinator, Vote
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


def test_every_boundary_of_a_run_is_agreed_through_its_coordinator(tmp_path: Path) -> None:
    run = killsafe.Run(
        tmp_path / "run",
        total_steps=3,
        save_every_steps=2,
        async_save=False,
        progress=False,
        keyboard=False,
        report=False,
    )
    coordinator = RecordingCoordinator()
    run._parts = dataclasses.replace(run._parts, coordinator=coordinator)
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
