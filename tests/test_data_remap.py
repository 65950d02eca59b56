"""A DistributedSampler's epoch stopped on one number of ranks and resumed on another.

No processes: each rank's ``LoaderSource`` is built with the rank and
world size its ``DistributedSampler`` would get from the job.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from killsafe.run.data import LoaderSource  # noqa: E402

DATASET = TensorDataset(torch.arange(30))
EPOCH = 3


def source(rank: int, world: int, *, drop_last: bool = False) -> LoaderSource:
    sampler = DistributedSampler(
        DATASET, num_replicas=world, rank=rank, shuffle=True, seed=5, drop_last=drop_last
    )
    return LoaderSource(DataLoader(DATASET, batch_size=2, sampler=sampler))


def take(world: int, batches: int | None, saved: list[Any] | None, skip: int) -> Any:
    """Each rank's samples for ``batches`` batches (all: None), and its state then."""
    seen, states = [], []
    for rank in range(world):
        src = source(rank, world)
        mine = []
        for count, (batch,) in enumerate(src.begin(EPOCH, skip, saved[0] if saved else None)):
            if batches is not None and count == batches:
                break
            mine += batch.tolist()
        seen.append(mine)
        states.append(src.state())
    return seen, states


def test_two_ranks_then_one_use_every_sample_of_the_epoch_once() -> None:
    first, states = take(2, 3, None, 0)
    rest, _ = take(1, None, states, 3)
    used = [i for seen in (*first, *rest) for i in seen]
    assert sorted(used) == list(range(30))


def test_two_then_three_then_one_rank_and_the_same_count_again() -> None:
    first, states = take(2, 2, None, 0)  # 8 used
    second, states = take(3, 1, states, 2)  # 6 more, dealt over 3 ranks
    assert states[0]["offset"] == 8 and states[0]["replicas"] == 3
    third, states = take(3, 1, states, 3)  # the same 3 ranks again: still dealt, not replayed
    last, _ = take(1, None, states, 4)
    used = [i for seen in (*first, *second, *third, *last) for i in seen]
    assert sorted(used) == list(range(30))


def test_the_same_number_of_ranks_replays_the_sampler_as_before() -> None:
    first, states = take(2, 2, None, 0)
    rest, _ = take(2, None, states, 2)
    whole, _ = take(2, None, None, 0)
    assert [a + b for a, b in zip(first, rest, strict=True)] == whole
    assert "offset" not in states[0]
