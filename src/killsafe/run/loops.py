"""Nested loops: ``run.epochs(n)`` around ``run.batches(data)``, resumed exactly.

::

    for epoch in run.epochs(10):              # starts at the restored epoch
        for x, y in run.batches(loader):      # resumes mid-epoch; a batch is a step
            train_step(x, y)
        evaluate(); scheduler.step()          # the epoch's end code: once per epoch

The position is ``(epoch, batch_index)``: the epoch whose end code has not
run yet, and the batches of it done. Every checkpoint holds it, with the
data's position (``data.DataSource``), under ``__run__["loop"]``.

When what is saved:

- After a batch (a step boundary): ``(e, k)``, ``k`` batches of epoch ``e``
  done. A resume continues with batch ``k`` of epoch ``e``; the code before
  ``run.batches()`` in the epoch's body runs again, the end code has not run.
- After the last batch of an epoch whose length is known (``len(data)``):
  no boundary there; that step's boundary is the epoch boundary below, so
  policies and stops are answered after the end code. (For data of unknown
  length the last batch has its own boundary, like any other; a checkpoint
  there is ``(e, n)`` and resumes into the end code.)
- At the epoch boundary, when ``epochs()`` advances after the end code:
  ``(e + 1, 0)``. Save policies see ``epoch_end`` here (``save_every_epochs``,
  the default "every epoch"), and a stop asked for during the end code is
  honoured here. A resume starts epoch ``e + 1``: the end code of ``e`` ran once.

A stop decided inside ``run.batches()`` (a signal, a request, a time limit)
commits its checkpoint ``(e, k)`` and raises ``EpochStopped`` out of the
loops, so the end code does not run on a partial epoch; ``Run``'s with-block
absorbs it and the code after the with-block runs as after any stop. An
exception or a kill leaves the last checkpoint as it was. So whatever moment
a stop, a kill or an exception comes, the end code of every epoch runs once
in the run's history: its effects are either in the next checkpoint, or the
run resumes from before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from killsafe.errors import ConfigError
from killsafe.run.data import DataSource, source_for
from killsafe.run.ending import Ending
from killsafe.run.position import Position

if TYPE_CHECKING:
    from killsafe.run.boundary import StepBoundary

__all__ = ["EpochLoop", "EpochStopped"]

_BEFORE, _BATCHES, _AFTER = "before-batches", "batches", "after-batches"
_WAITING, _DONE = "waiting", "done"  # before epochs() is iterated; after it ended


class EpochStopped(BaseException):
    """Raised out of ``run.batches()`` after a stop's checkpoint, so the epoch's end code
    does not run on a partial epoch. ``Run``'s with-block absorbs it.

    A ``BaseException``, as ``KeyboardInterrupt`` is: an ``except Exception`` around
    the batches (to log a bad batch and go on) must not turn a stop into an end code
    run on a partial epoch.
    """


class EpochLoop:
    """Drives ``epochs()`` and ``batches()`` over the run's position and step boundary.

    ``saved`` is the ``__run__["loop"]`` of the checkpoint resumed from;
    ``stop_before_epoch`` says whether a stop asked for ends the loop before
    the next epoch starts (in a job only a step boundary decides).
    """

    def __init__(
        self,
        position: Position,
        boundary: StepBoundary,
        ending: Ending,
        stop_before_epoch: Callable[[], bool],
        saved: Mapping[str, Any] | None,
    ) -> None:
        self._position = position
        self._boundary = boundary
        self._ending = ending
        self._stop_before_epoch = stop_before_epoch
        self._saved_data = saved.get("data") if saved else None
        position.epoch = int(saved["epoch"]) if saved else 0
        position.batch_index = int(saved["batch_index"]) if saved else 0
        self._phase = _WAITING
        self._source: DataSource | None = None

    def state_dict(self) -> dict[str, Any]:
        """The loop position and the data's, as the checkpoint keeps them."""
        data = self._saved_data if self._source is None else self._source.state()
        return {
            "epoch": self._position.epoch,
            "batch_index": self._position.batch_index,
            "epochs": self._position.epochs,
            "data": data,
        }

    @property
    def between_batches(self) -> bool:
        """In an epoch's body outside a batch: a save asked here waits for the next boundary."""
        return self._phase in (_BEFORE, _AFTER)

    def epochs(self, count: int) -> Iterator[int]:
        """Yield epoch numbers from the restored one up to ``count``; see the module doc."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"run.epochs({count!r}): use a whole number >= 0")
        self._position.epochs = count
        return self._epochs(count)

    def _epochs(self, count: int) -> Iterator[int]:
        position, boundary = self._position, self._boundary
        try:
            while (epoch := position.epoch or 0) < count:
                if self._ending.reason is not None:
                    return
                if self._stop_before_epoch():
                    boundary.end(exiting=True)
                    return
                self._phase = _BEFORE
                yield epoch
                self._close_epoch()
                boundary.end(exiting=epoch + 1 >= count, epoch_end=True)
                if self._ending.reason is not None:
                    return
            if self._ending.reason is None:
                boundary.end(exiting=True)
        finally:
            self._phase = _DONE

    def batches(self, data: Any) -> Batches:
        """``data``'s batches of the current epoch, from the restored position."""
        if self._position.epochs is None:
            raise ConfigError(
                "run.batches() runs inside `for epoch in run.epochs(n):`; "
                "for a flat loop use run.steps()"
            )
        return Batches(self, source_for(data))

    def iterate(self, source: DataSource) -> Iterator[Any]:
        """The batches of one epoch, each one step, with its step boundary."""
        if self._phase != _BEFORE:
            raise ConfigError(
                "run.batches() was already iterated in this epoch; iterate it once per epoch"
            )
        self._phase = _BATCHES
        position, boundary = self._position, self._boundary
        skip = position.batch_index or 0
        saved, self._saved_data = self._saved_data, None
        self._source = source
        length = source.length()
        for item in source.begin(position.epoch or 0, skip, saved):
            position.in_step = True
            yield item
            position.in_step = False
            position.step += 1
            position.batch_index = (position.batch_index or 0) + 1
            if length is not None and position.batch_index >= length:
                continue  # the epoch boundary, after the end code, is this step's boundary
            boundary.end()
            if self._ending.reason is not None:
                raise EpochStopped(self._ending.reason)
        self._phase = _AFTER

    def _close_epoch(self) -> None:
        position = self._position
        position.close_open_step()  # a batch left with `break`
        position.epoch = (position.epoch or 0) + 1
        position.batch_index = 0
        self._phase = _AFTER
        if self._source is not None:
            self._source.end_epoch()


class Batches:
    """What ``run.batches()`` returns: iterate it once per epoch; ``len()`` is a whole epoch."""

    def __init__(self, loop: EpochLoop, source: DataSource) -> None:
        self._loop = loop
        self._source = source

    def __iter__(self) -> Iterator[Any]:
        return self._loop.iterate(self._source)

    def __len__(self) -> int:
        length = self._source.length()
        if length is None:
            raise TypeError("run.batches(): the data has no len()")
        return length
