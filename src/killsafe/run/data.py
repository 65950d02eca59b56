"""Data sources for ``run.batches()``: where an epoch's iteration stands, saved and resumed.

A source hands out the batches of one epoch from a given position and says
what to save so that the position can be found again:

- ``StatefulSource``: any object with ``state_dict()``/``load_state_dict()``
  (torchdata's ``StatefulDataLoader``, ``killsafe.integrations.torch.
  ResumableLoader``, your own): its own state is the position.
- ``LoaderSource``: a ``torch.utils.data.DataLoader`` over a map-style
  dataset, with any sampler (random, sequential, ``DistributedSampler``,
  your own). Each epoch is iterated exactly as torch does (a fresh shuffle
  drawn from the global RNG or the loader's generator; ``set_epoch`` called
  on samplers that have it). What it saves is the random state the epoch
  started from; a resume mid-epoch replays the epoch's *index* order from
  it and skips the indices already used, so no skipped sample is loaded.
  With a ``DistributedSampler`` it also keeps the number of ranks: resumed
  by another number, the epoch's samples not used yet by any rank are
  dealt out again over the new ranks (see ``LoaderSource``).
- ``SequenceSource``: a list, tuple or range of batches, skipped by index.

torch is never imported here unless a DataLoader was handed in (torch is
then loaded already).
"""

from __future__ import annotations

import collections
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from killsafe.errors import StateMismatch, UnsupportedState
from killsafe.state import Stateful

__all__ = ["DataSource", "LoaderSource", "SequenceSource", "StatefulSource", "source_for"]

logger = logging.getLogger("killsafe")

WHAT_WORKS = (
    "run.batches() takes a torch DataLoader (map-style dataset, any sampler), torchdata's "
    "StatefulDataLoader, a list of batches, or any object with state_dict()/load_state_dict() "
    "(the Stateful protocol)"
)


class DataSource(Protocol):
    """Batches of one epoch from a position, and the state that finds it again."""

    def begin(self, epoch: int, skip: int, saved: Any) -> Iterator[Any]:
        """The batches of ``epoch`` after the first ``skip`` (``saved``: ``state()`` then)."""
        ...

    def state(self) -> Any:
        """What a checkpoint keeps to call ``begin`` again at the current position."""
        ...

    def end_epoch(self) -> None:
        """The epoch's batches are done."""
        ...

    def length(self) -> int | None:
        """Batches in a whole epoch, when known."""
        ...


def source_for(data: Any) -> DataSource:
    """The source for what was handed to ``run.batches()``; ``UnsupportedState`` otherwise."""
    if isinstance(data, Stateful) and not isinstance(data, type):
        return StatefulSource(data)
    if _is_torch_loader(data):
        return LoaderSource(data)
    if isinstance(data, (list, tuple, range)):
        return SequenceSource(data)
    kind = f"{type(data).__module__}.{type(data).__qualname__}"
    raise UnsupportedState(
        f"run.batches() got a {kind}, whose position cannot be saved or found again; {WHAT_WORKS}"
    )


def _sized_length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


class StatefulSource:
    """An object that saves its own position (``state_dict``/``load_state_dict``)."""

    def __init__(self, data: Any) -> None:
        self._data = data

    def begin(self, epoch: int, skip: int, saved: Any) -> Iterator[Any]:
        if saved is not None:
            self._data.load_state_dict(saved)
        return iter(self._data)

    def state(self) -> Any:
        return self._data  # a Stateful: its state_dict() is taken with the checkpoint

    def end_epoch(self) -> None:
        pass

    def length(self) -> int | None:
        return _sized_length(self._data)


class SequenceSource:
    """A list, tuple or range of batches: the position is the index."""

    def __init__(self, data: Sequence[Any]) -> None:
        self._data = data

    def begin(self, epoch: int, skip: int, saved: Any) -> Iterator[Any]:
        return itertools.islice(self._data, skip, None)

    def state(self) -> Any:
        return None

    def end_epoch(self) -> None:
        pass

    def length(self) -> int | None:
        return len(self._data)


def _is_torch_loader(value: Any) -> bool:
    import sys

    data = sys.modules.get("torch.utils.data")
    loader = getattr(data, "DataLoader", None)
    return loader is not None and isinstance(value, loader)


class LoaderSource:
    """A ``torch.utils.data.DataLoader``, iterated as torch does and resumed by index.

    ``state()`` is, within an epoch, ``{"rng": ..., "generators": [...]}``:
    the global torch RNG state and the states of the loader's and samplers'
    own generators just before the epoch's iterator was made; between epochs,
    ``{"generators": [...]}``: where those generators stand (the next epoch's
    shuffle is drawn from them; the global RNG is the run's to restore). A
    resume mid-epoch sets them on copies, draws what torch draws when it
    starts an epoch (the workers' base seed, then the shuffle), skips the
    indices of the batches already done, and loads only the rest; the
    global RNG and the tracked state are left as restored. The loader's own
    generator ends where the interrupted epoch had left it.

    With a ``DistributedSampler`` the state also holds ``replicas``, the
    number of ranks. Rank ``r`` of ``n`` takes positions ``r, r + n, ...``
    of the epoch's order, so after ``k`` samples per rank the ranks together
    used exactly its first ``k * n``. Resumed by another number of ranks,
    the rest of the order (what no rank used) is dealt out over the new
    ranks the same way, padded or cut to an even split as the sampler's
    ``drop_last`` says; the state then also holds ``offset`` (the order's
    positions used before this deal) and ``at_batch`` (the batch it starts
    at), so a later resume, on any number of ranks, finds the rest again.
    This needs a plain ``BatchSampler`` (a ``batch_size`` on the loader).
    """

    def __init__(self, loader: Any) -> None:
        from torch.utils.data import IterableDataset

        if isinstance(loader.dataset, IterableDataset):
            raise UnsupportedState(
                "run.batches() got a DataLoader over an IterableDataset, which has no index "
                "to resume from; use a map-style dataset, torchdata's StatefulDataLoader "
                "or give the dataset state_dict()/load_state_dict() (the Stateful protocol)"
            )
        self._loader = loader
        self._start: dict[str, Any] | None = None

    def begin(self, epoch: int, skip: int, saved: Any) -> Iterator[Any]:
        import torch

        for sampler in self._samplers():
            if hasattr(sampler, "set_epoch"):  # DistributedSampler's reshuffle
                sampler.set_epoch(epoch)
        spread = self._distributed()
        if skip == 0 or saved is None:
            if saved is not None:  # an epoch's start: the generators as the last epoch left them
                self._set_generators(saved)
            self._start = {
                "rng": torch.get_rng_state(),
                "generators": [g.get_state() for g in self._generators()],
            }
            if spread is not None:
                self._start["replicas"] = spread.num_replicas
            return iter(self._loader)
        self._start = dict(saved)
        if spread is not None and _dealt_anew(saved, spread):
            return self._resume(skip, saved, lambda: self._dealt_indices(epoch, skip, spread))
        return self._resume(skip, saved, lambda: self._indices_after(skip))

    def state(self) -> Any:
        if self._start is None:  # between epochs: where the own generators stand
            return {"generators": [g.get_state() for g in self._generators()]}
        return self._start

    def end_epoch(self) -> None:
        self._start = None

    def _set_generators(self, saved: Mapping[str, Any]) -> None:
        generators = self._generators()
        states = list(saved.get("generators") or [])
        if len(states) != len(generators):
            raise StateMismatch(
                f"the data position was saved with {len(states)} torch generator(s) on the "
                f"DataLoader and its samplers, now there are {len(generators)}; build the "
                "DataLoader as the run that saved it did"
            )
        for generator, state in zip(generators, states, strict=True):
            generator.set_state(state)

    def length(self) -> int | None:
        return _sized_length(self._loader)

    # -- resuming mid-epoch ---------------------------------------------------

    def _resume(
        self, skip: int, saved: Mapping[str, Any], indices: Callable[[], Iterator[Any]]
    ) -> Iterator[Any]:
        import torch
        from torch.utils.data import DataLoader

        loader = self._loader
        generators = self._generators()
        states = list(saved.get("generators") or [])
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(saved["rng"])
            self._set_generators(saved)
            # What iter(DataLoader) draws first: the base seed of its workers.
            base = torch.Generator()
            base.set_state(_state_before_base_seed(loader, generators, states, saved["rng"]))
            torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
            rest = indices()
        options = {
            "num_workers": loader.num_workers,
            "collate_fn": loader.collate_fn,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "generator": base,  # draws the interrupted epoch's base seed again
            "prefetch_factor": loader.prefetch_factor,
            "in_order": getattr(loader, "in_order", True),
        }
        if loader.batch_sampler is not None:
            rest_loader = DataLoader(loader.dataset, batch_sampler=_Once(rest), **options)
        else:
            rest_loader = DataLoader(
                loader.dataset, sampler=_Once(rest), batch_size=None, **options
            )
        return iter(rest_loader)

    def _indices_after(self, skip: int) -> Iterator[Any]:
        """The index batches of the epoch after the first ``skip``: index work, no loading."""
        from torch.utils.data import BatchSampler

        batch_sampler = self._loader.batch_sampler
        if type(batch_sampler) is BatchSampler:
            # Skip sampler indices, not batches of them: a million batches is one islice.
            indices = iter(batch_sampler.sampler)
            _consume(indices, skip * batch_sampler.batch_size)
            return iter(
                BatchSampler(_Once(indices), batch_sampler.batch_size, batch_sampler.drop_last)
            )
        index_sampler = batch_sampler if batch_sampler is not None else self._loader.sampler
        items = iter(index_sampler)
        _consume(items, skip)
        return items

    def _dealt_indices(self, epoch: int, skip: int, spread: Any) -> Iterator[Any]:
        """This rank's index batches of what the epoch's order has left, dealt anew."""
        from torch.utils.data import BatchSampler
        from torch.utils.data.distributed import DistributedSampler

        batch_sampler = self._loader.batch_sampler
        if type(batch_sampler) is not BatchSampler or id(batch_sampler.sampler) != id(spread):
            raise StateMismatch(
                "the data position was saved by another number of ranks and only a "
                "DataLoader with batch_size= over a DistributedSampler is dealt anew; "
                "resume on the same number of ranks"
            )
        start = self._start or {}
        size = batch_sampler.batch_size
        used = int(start.get("offset", 0))
        used += (skip - int(start.get("at_batch", 0))) * size * int(start["replicas"])
        whole: Any = DistributedSampler(
            spread.dataset, num_replicas=1, rank=0, shuffle=spread.shuffle, seed=spread.seed
        )
        whole.set_epoch(epoch)
        order = list(whole)
        rest = order[used:]
        ranks = spread.num_replicas
        if spread.drop_last:
            rest = rest[: len(rest) - len(rest) % ranks]
        elif rest:
            rest += (rest * ranks)[: -len(rest) % ranks]
        if spread.rank == 0:
            logger.warning(
                "epoch %d resumed on %d rank(s), saved on %s: %d sample(s) were used, "
                "the %d left are dealt over the new rank(s)",
                epoch,
                ranks,
                start["replicas"],
                used,
                max(0, len(order) - used),
            )
        self._start = {**start, "replicas": ranks, "offset": used, "at_batch": skip}
        mine = iter(rest[spread.rank :: ranks])
        return iter(BatchSampler(_Once(mine), size, batch_sampler.drop_last))

    def _distributed(self) -> Any | None:
        """The loader's ``DistributedSampler``, if it has one."""
        from torch.utils.data.distributed import DistributedSampler

        return next((s for s in self._samplers() if isinstance(s, DistributedSampler)), None)

    def _samplers(self) -> list[Any]:
        loader = self._loader
        found = [loader.sampler, loader.batch_sampler]
        found.append(getattr(loader.batch_sampler, "sampler", None))
        return _unique(s for s in found if s is not None)

    def _generators(self) -> list[Any]:
        """The loader's and its samplers' own torch generators, each once, in a fixed order."""
        import torch

        found = [self._loader.generator] + [getattr(s, "generator", None) for s in self._samplers()]
        return _unique(g for g in found if isinstance(g, torch.Generator))


def _dealt_anew(saved: Mapping[str, Any], spread: Any) -> bool:
    """Whether the epoch's rest must be dealt over the ranks again (not replayed)."""
    replicas = saved.get("replicas")
    if replicas is None:  # saved before ranks were kept: replayed as before
        return False
    return int(replicas) != spread.num_replicas or "offset" in saved


def _state_before_base_seed(loader: Any, generators: list[Any], states: list[Any], rng: Any) -> Any:
    """The state the epoch's base seed was drawn from: the loader's generator, or the global RNG."""
    for generator, state in zip(generators, states, strict=True):
        if generator is loader.generator:
            return state
    return rng


class _Once:
    """An iterator as a sampler: iterated once, by the loader that replays an epoch's rest."""

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items

    def __iter__(self) -> Iterator[Any]:
        return self._items


def _consume(items: Iterator[Any], count: int) -> None:
    collections.deque(itertools.islice(items, count), maxlen=0)


def _unique(items: Iterable[Any]) -> list[Any]:
    seen: set[int] = set()
    out = []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out
