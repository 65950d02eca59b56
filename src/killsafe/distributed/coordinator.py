"""Collective decisions at a step boundary: the ``Coordinator`` seam.

Every process of a run casts a ``Vote`` at each step boundary and all of
them receive the same ``Agreement``:

- stop if any rank asks to, with the reason of the lowest rank that asked;
- save when rank 0 says so (its policies run on its clock), with rank 0's
  reason and checkpoint name.

``agree`` waits for every rank. ``agree_async`` only starts the exchange and
returns a ``PendingAgreement``: a loop that waits for it at the next step
boundary pays nothing for the exchange, which ran during the step, and acts
on each decision one step late, on every rank at the same step.
``max_async`` is the cheapest exchange of all, a few small integers per
rank (flags such as "I have something to decide" or "my background save is
still being written", and rank 0's numbers), started at one boundary and
read at a later one: a ``Run`` agrees in full only at the boundaries after
one where some rank raised a flag.

``LocalCoordinator`` is the one-process case, where agreeing is the
identity. ``TorchCoordinator`` (``killsafe.distributed.torch``) agrees over
``torch.distributed``. Both keep values to plain JSON (str, int, float, bool,
None, lists and str-keyed dicts), so nothing is pickled between processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

__all__ = [
    "Agreement",
    "Coordinator",
    "LocalCoordinator",
    "Pending",
    "PendingAgreement",
    "Vote",
    "decide",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Vote:
    """What one rank would do at this step boundary.

    ``stop`` is the reason this rank wants to stop (a signal, a request, a
    time limit), or None. ``save`` is the reason to save now and ``name``
    the checkpoint's name; only rank 0's ``save`` and ``name`` count.
    """

    stop: str | None = None
    save: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Agreement:
    """What every rank does at this step boundary.

    ``stop`` is the reason to stop (None: go on) and ``stopped_by`` the
    lowest rank that asked; ``save`` and ``name`` come from rank 0.
    """

    stop: str | None = None
    stopped_by: int | None = None
    save: str | None = None
    name: str | None = None


CONTINUE = Agreement()


def decide(votes: list[Vote]) -> Agreement:
    """Combine the votes of ranks 0..n-1 the way every coordinator does."""
    stopper = next((rank for rank, vote in enumerate(votes) if vote.stop is not None), None)
    first = votes[0]
    return Agreement(
        stop=None if stopper is None else votes[stopper].stop,
        stopped_by=stopper,
        save=first.save,
        name=first.name,
    )


class Pending(Generic[T]):
    """A collective being exchanged; ``wait()`` returns its result (or raises its error).

    Waiting twice returns the same result. A coordinator settles a pending
    exchange itself before its next collective, so none is ever lost.
    """

    def __init__(self, finish: Callable[[], T]) -> None:
        self._finish: Callable[[], T] | None = finish
        self._result: T | None = None
        self._error: BaseException | None = None

    @classmethod
    def settled(cls, result: T) -> Pending[T]:
        pending = cls(lambda: result)
        pending.wait()
        return pending

    def done(self) -> bool:
        """Whether ``wait()`` returns at once."""
        return self._finish is None

    def wait(self) -> T:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            try:
                self._result = finish()
            except BaseException as exc:  # kept for every later wait, then raised
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]  # set by finish() above


class PendingAgreement(Pending[Agreement]):
    """An agreement being exchanged (``Coordinator.agree_async``)."""


@runtime_checkable
class Coordinator(Protocol):
    """The processes of one run, deciding together.

    Every method is collective: all ranks call it in the same order. A rank
    that does not answer within the coordinator's timeout makes the call
    raise ``RankUnresponsive`` on the ranks that did, naming it.
    """

    @property
    def rank(self) -> int:
        """This process's rank, 0 to ``world_size - 1``."""
        ...

    @property
    def world_size(self) -> int:
        """How many processes take part."""
        ...

    def agree(self, vote: Vote) -> Agreement:
        """Combine every rank's vote into one decision (see ``decide``)."""
        ...

    def agree_async(self, vote: Vote) -> PendingAgreement:
        """Start ``agree``; the decision is ``wait()`` on the result."""
        ...

    def max_async(self, values: tuple[int, ...]) -> Pending[tuple[int, ...]]:
        """Start taking the largest of each of ``values`` over the ranks; ``wait()`` gives them.

        Every rank passes as many values, each from 0 to 2**62. A flag is 0
        or 1 (did any rank raise it); a number only rank 0 sends (the
        others send 0) reaches every rank.
        """
        ...

    def barrier(self, what: str) -> None:
        """Wait until every rank got here; ``what`` names the place in errors."""
        ...

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s JSON value, on every rank."""
        ...

    def gather(self, value: Any) -> list[Any]:
        """Every rank's JSON value, in rank order, on every rank."""
        ...


class LocalCoordinator:
    """A run of one process: every collective is the identity."""

    rank = 0
    world_size = 1

    def agree(self, vote: Vote) -> Agreement:
        if vote.stop is None and vote.save is None and vote.name is None:
            return CONTINUE
        return decide([vote])

    def agree_async(self, vote: Vote) -> PendingAgreement:
        pending = PendingAgreement(lambda: self.agree(vote))
        pending.wait()
        return pending

    def max_async(self, values: tuple[int, ...]) -> Pending[tuple[int, ...]]:
        return Pending.settled(values)

    def barrier(self, what: str) -> None:
        return None

    def broadcast(self, value: Any, src: int = 0) -> Any:
        return value

    def gather(self, value: Any) -> list[Any]:
        return [value]
