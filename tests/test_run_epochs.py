"""``run.epochs()`` and ``run.batches()``: the position, the data sources, the epoch boundary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import killsafe
from killsafe.errors import ConfigError, UnsupportedState
from killsafe.run.data import LoaderSource

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402


class Counting(Dataset[int]):
    """A dataset that records every index it loads."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.loaded: list[int] = []

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        self.loaded.append(index)
        return index


def quiet_run(directory: Path, **options: Any) -> killsafe.Run:
    return killsafe.Run(directory, progress=False, keyboard=False, report=False, **options)


def train(
    directory: Path, make_loader: Any, epochs: int, stop_at: int | None = None, **options: Any
) -> tuple[killsafe.Run, list[Any]]:
    """Run the nested loop, recording batches and end codes; ``stop_at``: stop after that step."""
    seen: list[Any] = []
    torch.manual_seed(0)
    loader = make_loader()
    with quiet_run(directory, **options) as run:
        run.track(seen=seen)
        for epoch in run.epochs(epochs):
            for batch in run.batches(loader):
                seen.append([epoch, run.batch_index, batch.tolist()])
                torch.rand(1)  # the loop's own randomness, as dropout
                if stop_at is not None and run.step + 1 == stop_at:
                    run.stop("test")
            seen.append(f"end {epoch}")
    return run, seen


def test_a_stopped_shuffled_loader_resumes_mid_epoch_with_the_batches_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    def loader() -> DataLoader[int]:
        return DataLoader(Counting(22), batch_size=4, shuffle=True)

    _, reference = train(tmp_path / "ref", loader, 3)
    run, first = train(tmp_path / "run", loader, 3, stop_at=9)  # the 4th batch of epoch 1
    assert run.exit_code == 75 and (run.epoch, run.batch_index, run.step) == (1, 3, 9)
    assert first[-1] != "end 1"  # the end code did not run on a partial epoch
    resumed, seen = train(tmp_path / "run", loader, 3)
    assert resumed.finished and seen == reference
    assert [x for x in seen if isinstance(x, str)] == ["end 0", "end 1", "end 2"]


def test_a_stop_at_an_epoch_boundary_resumes_the_next_shuffle_from_the_loaders_generator(
    tmp_path: Path,
) -> None:
    """The loader's own generator is not tracked: the data position carries it across epochs."""

    def loader() -> DataLoader[int]:
        generator = torch.Generator().manual_seed(7)
        return DataLoader(Counting(12), batch_size=4, shuffle=True, generator=generator)

    _, reference = train(tmp_path / "ref", loader, 3)
    run, _ = train(tmp_path / "run", loader, 3, stop_at=6)  # the last batch of epoch 1
    assert (run.epoch, run.batch_index, run.step) == (2, 0, 6)  # stopped after its end code
    _, seen = train(tmp_path / "run", loader, 3)
    assert seen == reference


def test_position_and_len_inside_the_loop(tmp_path: Path) -> None:
    loader = DataLoader(list(range(10)), batch_size=3)
    where = []
    with quiet_run(tmp_path) as run:
        assert (run.epoch, run.batch_index) == (None, None)
        for epoch in run.epochs(2):
            batches = run.batches(loader)
            assert len(batches) == 4
            for _ in batches:
                where.append((epoch, run.epoch, run.batch_index, run.step))
            assert (run.batch_index, run.step) == (4, 4 * (epoch + 1))
        assert run.epoch == 2 and run.save_policy_description == "every epoch and on exit"
    assert where[:5] == [(0, 0, 0, 0), (0, 0, 1, 1), (0, 0, 2, 2), (0, 0, 3, 3), (1, 1, 0, 4)]
    assert run.finished and run.step == 8


def test_len_stays_the_whole_epoch_in_a_resumed_epoch(tmp_path: Path) -> None:
    loader = DataLoader(list(range(20)), batch_size=2, shuffle=True)
    train(tmp_path, lambda: loader, 2, stop_at=3)
    with quiet_run(tmp_path) as run:
        run.track(seen=[])
        for _ in run.epochs(2):
            batches = run.batches(loader)
            assert len(batches) == 10
            assert sum(1 for _ in batches) == (7 if run.step <= 10 else 10)
            break


@pytest.mark.parametrize(
    "data", [iter([1, 2]), (x for x in range(3)), {"a": 1}], ids=["iterator", "generator", "dict"]
)
def test_a_plain_iterator_is_refused_saying_what_works(tmp_path: Path, data: Any) -> None:
    with quiet_run(tmp_path) as run:
        for _ in run.epochs(1):
            with pytest.raises(UnsupportedState) as info:
                run.batches(data)
            message = str(info.value)
            assert "DataLoader" in message and "Stateful" in message and "\n" not in message
            break


def test_batches_outside_epochs_and_a_second_loop_are_refused(tmp_path: Path) -> None:
    with quiet_run(tmp_path) as run:
        with pytest.raises(ConfigError, match=r"run\.epochs\(n\)"):
            run.batches([1, 2])
        run.epochs(1)
        with pytest.raises(ConfigError, match="one"):
            next(run.steps())


def test_resuming_a_million_batch_epoch_mid_way_loads_only_the_rest() -> None:
    dataset = Counting(1_000_000)
    loader = DataLoader(dataset, batch_size=1, shuffle=True)
    source = LoaderSource(loader)
    torch.manual_seed(5)
    first = source.begin(0, 0, None)
    saved = source.state()
    assert next(first).item() == dataset.loaded[0]
    dataset.loaded.clear()

    resumed = LoaderSource(loader)
    rest = [int(batch) for batch in resumed.begin(0, 999_990, saved)]
    assert len(rest) == 10 and dataset.loaded == rest  # no skipped batch was loaded


def test_a_distributed_sampler_is_set_to_each_epoch_and_resumed(tmp_path: Path) -> None:
    def loader() -> DataLoader[int]:
        data = list(range(40))
        sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
        return DataLoader(data, batch_size=5, sampler=sampler)

    _, reference = train(tmp_path / "ref", loader, 3)
    train(tmp_path / "run", loader, 3, stop_at=6)  # the 2nd batch of epoch 1
    _, seen = train(tmp_path / "run", loader, 3)
    assert seen == reference
    for epoch in range(3):
        sampler = DistributedSampler(list(range(40)), num_replicas=2, rank=1, seed=3)
        sampler.set_epoch(epoch)
        order = [i for x in reference if isinstance(x, list) and x[0] == epoch for i in x[2]]
        assert order == list(sampler)


class CountingStateful:
    """A loader of its own with the Stateful protocol and no ``len``."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.position = 0

    def __iter__(self) -> Any:
        while self.position < self.length:
            self.position += 1
            yield torch.tensor(self.position - 1)
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def test_a_checkpoint_after_the_last_batch_of_unknown_length_resumes_into_the_end_code(
    tmp_path: Path,
) -> None:
    _, reference = train(tmp_path / "ref", lambda: CountingStateful(3), 2)
    run, _ = train(tmp_path / "run", lambda: CountingStateful(3), 2, stop_at=3)
    assert (run.epoch, run.batch_index) == (0, 3)
    _, seen = train(tmp_path / "run", lambda: CountingStateful(3), 2)
    assert seen == reference and seen.count("end 0") == 1


def test_a_stop_in_the_end_code_saves_after_it_and_it_never_runs_again(tmp_path: Path) -> None:
    ends: list[int] = []
    for _ in range(2):
        with quiet_run(tmp_path) as run:
            run.track(ends=ends)
            for epoch in run.epochs(3):
                for _batch in run.batches([1, 2, 3]):
                    pass
                ends.append(epoch)
                if epoch == 1:
                    run.stop("in the end code")  # honoured at the epoch boundary
    assert ends == [0, 1, 2] and run.finished
    info = killsafe.CheckpointStore(tmp_path / "checkpoints").list()
    assert [(i.step, i.reason) for i in info][-2:] == [(6, "in the end code"), (9, "finished")]


def test_save_every_epochs_saves_after_the_end_code_of_every_nth_epoch(tmp_path: Path) -> None:
    with quiet_run(tmp_path, save_every_epochs=2, keep_last=None, async_save=False) as run:
        assert run.save_policy_description == "every 2 epochs and on exit"
        for _ in run.epochs(5):
            for _batch in run.batches([1, 2]):
                pass
    store = killsafe.CheckpointStore(tmp_path / "checkpoints")
    saved = [(i.step, i.reason) for i in store.list()]
    assert saved == [(4, "periodic"), (8, "periodic"), (10, "finished")]
    loop = store.load(store.list()[0])["__run__"]["loop"]
    assert (loop["epoch"], loop["batch_index"]) == (2, 0)


def test_torchdata_stateful_dataloader_resumes_mid_epoch(tmp_path: Path) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader() -> Any:
        return stateful.StatefulDataLoader(list(range(18)), batch_size=4, shuffle=True)

    _, reference = train(tmp_path / "ref", loader, 2)
    train(tmp_path / "run", loader, 2, stop_at=2)
    _, seen = train(tmp_path / "run", loader, 2)
    assert seen == reference
