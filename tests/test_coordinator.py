"""The Coordinator seam without torch: how votes combine, and the one-process coordinator."""

from __future__ import annotations

import subprocess
import sys

import pytest

from killsafe.distributed import Agreement, Coordinator, LocalCoordinator, Vote, decide


@pytest.mark.parametrize(
    ("votes", "expected"),
    [
        ([Vote(), Vote()], Agreement()),
        ([Vote(), Vote(stop="SIGTERM")], Agreement(stop="SIGTERM", stopped_by=1)),
        (
            [Vote(), Vote(stop="q"), Vote(stop="SIGTERM")],
            Agreement(stop="q", stopped_by=1),
        ),
        ([Vote(stop="time limit"), Vote(stop="q")], Agreement(stop="time limit", stopped_by=0)),
        (
            [Vote(save="every 100 steps", name="s100"), Vote(save="ignored", name="ignored")],
            Agreement(save="every 100 steps", name="s100"),
        ),
        ([Vote(), Vote(save="only rank 0 counts")], Agreement()),
        (
            [Vote(save="exit"), Vote(), Vote(stop="")],
            Agreement(stop="", stopped_by=2, save="exit"),
        ),
    ],
)
def test_votes_combine_stop_from_any_rank_save_from_rank_0(
    votes: list[Vote], expected: Agreement
) -> None:
    assert decide(votes) == expected


def test_local_coordinator_is_the_identity() -> None:
    local = LocalCoordinator()
    assert isinstance(local, Coordinator)
    assert (local.rank, local.world_size) == (0, 1)
    assert local.agree(Vote()) == Agreement()
    assert local.agree(Vote(stop="q", save="exit", name="last")) == Agreement(
        stop="q", stopped_by=0, save="exit", name="last"
    )
    pending = local.agree_async(Vote(stop="q"))
    assert pending.done()
    assert pending.wait() == pending.wait() == Agreement(stop="q", stopped_by=0)
    assert local.broadcast({"a": [1, 2]}) == {"a": [1, 2]}
    assert local.gather("x") == ["x"]
    local.barrier("anywhere")


def test_votes_are_small_frozen_values() -> None:
    vote = Vote(stop="q")
    with pytest.raises(AttributeError):
        vote.stop = None  # type: ignore[misc]
    assert hash(vote) == hash(Vote(stop="q"))


def test_the_coordinator_seam_needs_no_torch() -> None:
    code = (
        "import sys, killsafe.distributed as d; "
        "d.LocalCoordinator().agree(d.Vote()); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
