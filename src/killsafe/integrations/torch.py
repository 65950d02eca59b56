"""PyTorch helpers: a data position that resumes mid-epoch, and accelerator caches.

``ResumableLoader`` is a ``torch.utils.data.DataLoader`` whose position in the
data (epoch and batches consumed) is ``Stateful``: track it with a ``Run`` and
a resumed run continues with the very next batch, mid-epoch, without reading
the batches it skips (the shuffled order of an epoch is recomputed from the
seed and sliced, O(dataset length) index work, no data loading) and without
skipping samples, with any number of worker processes::

    loader = ResumableLoader(dataset, batch_size=64, shuffle=True, seed=0)
    run.track(model=model, optimizer=optimizer, data=loader)
    batches = loader.forever()            # epoch after epoch, from the saved position
    for step in run.steps():
        inputs, labels = next(batches)

The position counts the batches handed to your loop, not the indices the
workers have prefetched, so prefetching never makes a resume skip samples.
The shuffle of each epoch comes from its own ``torch.Generator`` seeded with
``seed + epoch``, never from the global RNG.

torchdata's ``StatefulDataLoader`` needs nothing from here: it has
``state_dict``/``load_state_dict`` and is tracked like any Stateful object.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

try:
    import torch
    from torch.utils.data import DataLoader, Sampler
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("killsafe.integrations.torch needs PyTorch; run: pip install torch") from exc

__all__ = ["EpochSampler", "ResumableLoader", "release_caches"]


class EpochSampler(Sampler[int]):
    """The indices of one epoch (shuffled by ``seed + epoch`` or in order), from ``start``.

    ``set_position(epoch, start)`` chooses the epoch and the first index
    position to yield; the order itself never depends on the global RNG.
    """

    def __init__(self, length: int, *, shuffle: bool = True, seed: int = 0) -> None:
        if length < 0:
            raise ValueError(f"EpochSampler(length={length}): use a length >= 0")
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int) -> torch.Tensor:
        """Every index of ``epoch`` in the order it is visited."""
        if not self.shuffle:
            return torch.arange(self.length)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.length, generator=generator)

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)[self.start :].tolist()

    def __len__(self) -> int:
        return max(0, self.length - self.start)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a sized dataset whose position is saved and restored.

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``).
        batch_size: samples per batch.
        shuffle: visit each epoch in a fresh order drawn from ``seed + epoch``.
        seed: the seed of the shuffles (and of the workers' seeds).
        drop_last: drop the last incomplete batch of each epoch.
        **kwargs: any other ``DataLoader`` argument (``num_workers``,
            ``collate_fn``, ``pin_memory``, ...) except a sampler.

    ``state_dict()`` is ``{"epoch", "batches", "seed", "length", "batch_size"}``:
    the epoch in progress and the batches of it already handed out. ``len()``
    is the number of batches of a whole epoch, also while a resumed epoch
    yields only its rest, so ``100 * batch / len(loader)`` stays a percentage.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        for forbidden in ("sampler", "batch_sampler", "generator"):
            if forbidden in kwargs:
                raise ValueError(
                    f"ResumableLoader sets its own {forbidden}; pass shuffle= and seed= instead"
                )
        self.epoch_sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
        self._generator = torch.Generator()
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=self.epoch_sampler,
            drop_last=drop_last,
            generator=self._generator,
            **kwargs,
        )
        self.seed = seed
        self.epoch = 0
        self.batches = 0

    def batches_per_epoch(self) -> int:
        length = self.epoch_sampler.length
        size = int(self.batch_size or 1)
        return length // size if self.drop_last else -(-length // size)

    def __len__(self) -> int:
        """Batches in a whole epoch, also inside a resumed one (whose iteration yields the rest)."""
        return self.batches_per_epoch()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        """The rest of the current epoch, from the saved position; then the next epoch starts."""
        size = int(self.batch_size or 1)
        self.epoch_sampler.set_position(self.epoch, self.batches * size)
        # Worker seeds come from this generator, not from the global RNG, so
        # starting an iterator mid-run (a resume) leaves the global streams alone.
        self._generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        for batch in super().__iter__():
            self.batches += 1
            yield batch
        self.epoch += 1
        self.batches = 0

    def forever(self) -> Iterator[Any]:
        """Batches epoch after epoch, without end, continuing from the current position."""
        while True:
            empty = True
            for batch in self:
                empty = False
                yield batch
            if empty and self.batches_per_epoch() == 0:
                raise ValueError("ResumableLoader.forever(): the dataset yields no batch")

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "seed": self.seed,
            "length": self.epoch_sampler.length,
            "batch_size": int(self.batch_size or 1),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from killsafe.errors import StateMismatch

        expected = {
            "seed": self.seed,
            "length": self.epoch_sampler.length,
            "batch_size": int(self.batch_size or 1),
        }
        differ = [
            f"{k}: saved {state.get(k)!r}, now {v!r}"
            for k, v in expected.items()
            if state.get(k) != v
        ]
        if differ:
            raise StateMismatch(
                "data position does not fit this loader ("
                + "; ".join(differ)
                + "); use the same dataset, batch size and seed as the saved run"
            )
        self.epoch = int(state["epoch"])
        self.batches = int(state["batches"])


def release_caches() -> None:
    """Return cached accelerator memory (CUDA, MPS) to the driver, when in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    backends_mps = getattr(torch.backends, "mps", None)
    if mps is not None and backends_mps is not None and backends_mps.is_available():
        mps.empty_cache()
