"""``TorchCoordinator``: the ranks of a ``torch.distributed`` job decide together.

Its collectives run on a side process group of its own, on the CPU (gloo),
created from the default group (which may well be NCCL on GPUs), so they
never wait behind the training's GPU work and never reorder its
collectives. The group has a timeout: a rank that died or hangs makes the
call raise ``RankUnresponsive`` on every rank that is still there, naming
the missing ranks and their hosts, instead of hanging the job.

Agreeing costs one ``all_reduce`` of two integers: the lowest rank that
wants to stop with the length of its reason, and the length of rank 0's
save request. Only when one is set do the strings follow, in a broadcast
from the rank that has them. Cheaper still, ``max_async`` starts an
``all_reduce(MAX)`` of a few integers and returns: it runs on gloo's threads
during the next step and is read at a later boundary.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from killsafe.distributed.coordinator import CONTINUE, Agreement, Pending, PendingAgreement, Vote
from killsafe.errors import ConfigError, RankUnresponsive

__all__ = ["TorchCoordinator"]

log = logging.getLogger("killsafe.distributed")

_NO_STOP = 1 << 62  # larger than any packed (rank, length) pair
_MAX_REASON_BYTES = 4096
_ROLL_CALL_POLL = 0.05
_LONGEST_TIMEOUT = 1e12  # seconds; far longer ones overflow gloo's timeout

T = TypeVar("T")


class TorchCoordinator:
    """The ranks of the default ``torch.distributed`` process group (or of ``group``).

    Build it on every rank after ``init_process_group`` (building it is
    itself collective, on every rank of the default group). ``timeout``
    (seconds) bounds every collective: a
    rank missing for longer is reported as ``RankUnresponsive``. After such
    a failure the coordinator stays failed: the job should save nothing
    more and exit, to be restarted.

    Not thread-safe: call it from the loop's thread, on every rank in the
    same order.
    """

    def __init__(self, *, timeout: float = 300.0, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "TorchCoordinator needs torch.distributed initialised; "
                "call torch.distributed.init_process_group() first"
            )
        self._timeout = _checked_timeout(timeout)
        ranks = None if group is None else dist.get_process_group_ranks(group)
        self._group = dist.new_group(
            ranks=ranks, backend="gloo", timeout=timedelta(seconds=self._timeout)
        )
        self._rank = dist.get_rank(self._group)
        self._world_size = dist.get_world_size(self._group)
        self._store = _default_store()
        self._prefix = f"killsafe/{dist.get_backend(self._group)}-{_group_name(self._group)}/"
        self._calls = 0
        self._failure: RankUnresponsive | None = None
        self._pending: Pending[Any] | None = None
        self._hosts = ["unknown host"] * self._world_size
        here = {"host": socket.gethostname(), "pid": os.getpid()}
        self._hosts = [f"{h['host']} pid {h['pid']}" for h in self.gather(here)]

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def group(self) -> Any:
        """The side gloo process group (for ``torch.distributed.checkpoint`` calls)."""
        return self._group

    @property
    def timeout(self) -> float:
        return self._timeout

    def host(self, rank: int) -> str:
        """Host name and process id of ``rank``, as gathered at construction."""
        return self._hosts[rank]

    # ------------------------------------------------------------ collectives

    def agree(self, vote: Vote) -> Agreement:
        """Every rank's vote combined: stop if any asks, save as rank 0 says."""
        return self._collective("agree", lambda: self._agree(vote))

    def agree_async(self, vote: Vote) -> PendingAgreement:
        """Start ``agree`` in the background; ``wait()`` on the result gives the decision.

        The exchange runs on gloo's threads while the loop works; waiting for
        it at the next step boundary usually costs nothing.
        """
        packed, reason, request = self._pack(vote)
        work = self._collective(
            "agree",
            lambda: dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=self._group, async_op=True),
        )
        pending: PendingAgreement

        def finish() -> Agreement:
            if self._pending is pending:
                self._pending = None
            return self._collective(
                "agree", lambda: self._wait_and_unpack(work, packed, reason, request)
            )

        pending = PendingAgreement(finish)
        self._pending = pending
        return pending

    def max_async(self, values: tuple[int, ...]) -> Pending[tuple[int, ...]]:
        """Start taking the largest of each of ``values`` over the ranks; ``wait()`` gives them.

        One ``all_reduce(MAX)`` of a few integers, started here and left to
        gloo's threads: waited at a later step boundary, it usually costs
        only its start.
        """
        packed = torch.tensor(values, dtype=torch.int64)
        work = self._collective(
            "the step boundary's flags",
            lambda: dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self._group, async_op=True),
        )
        pending: Pending[tuple[int, ...]]

        def finish() -> tuple[int, ...]:
            if self._pending is pending:
                self._pending = None
            return self._collective("the step boundary's flags", lambda: _largest(work, packed))

        pending = Pending(finish)
        self._pending = pending
        return pending

    def barrier(self, what: str) -> None:
        """Wait until every rank reached ``what``."""
        self._collective(what, lambda: self._all_reduce_min([0]))

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s JSON value, on every rank."""
        return self._collective("broadcast", lambda: self._broadcast(value, src))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's JSON value, in rank order, on every rank."""
        return self._collective("gather", lambda: self._gather(value))

    def guard(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call``, which runs collectives on ``group`` (a DCP save, say), as one of ours.

        A rank that does not answer makes it raise ``RankUnresponsive``.
        """
        return self._collective(what, call)

    # ------------------------------------------------------------ inside

    def _agree(self, vote: Vote) -> Agreement:
        packed, reason, request = self._pack(vote)
        dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=self._group)
        return self._unpack(packed, reason, request)

    def _pack(self, vote: Vote) -> tuple[torch.Tensor, bytes | None, bytes]:
        """The vote as two integers for a MIN all_reduce, and the strings it may send.

        The first is the lowest stopping rank with its reason's length (or
        _NO_STOP), the second minus the length of rank 0's save request.
        """
        reason = _clip(vote.stop) if vote.stop is not None else None
        request = b""
        if self._rank == 0 and (vote.save is not None or vote.name is not None):
            request = json.dumps([vote.save, vote.name]).encode()
        stopper = _NO_STOP if reason is None else (self._rank << 32) | len(reason)
        return torch.tensor([stopper, -len(request)], dtype=torch.int64), reason, request

    def _wait_and_unpack(
        self, work: Any, packed: torch.Tensor, reason: bytes | None, request: bytes
    ) -> Agreement:
        work.wait()
        return self._unpack(packed, reason, request)

    def _unpack(self, packed: torch.Tensor, reason: bytes | None, request: bytes) -> Agreement:
        packed_stop, packed_request = (int(v) for v in packed.tolist())
        if packed_stop == _NO_STOP and packed_request == 0:
            return CONTINUE
        stop: str | None = None
        stopped_by: int | None = None
        if packed_stop != _NO_STOP:
            stopped_by, length = packed_stop >> 32, packed_stop & 0xFFFFFFFF
            stop = self._broadcast_bytes(reason or b"", length, stopped_by).decode()
        save: str | None = None
        name: str | None = None
        if packed_request:
            save, name = json.loads(self._broadcast_bytes(request, -packed_request, 0))
        return Agreement(stop=stop, stopped_by=stopped_by, save=save, name=name)

    def _all_reduce_min(self, values: list[int]) -> list[int]:
        packed = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=self._group)
        return [int(v) for v in packed.tolist()]

    def _broadcast_bytes(self, data: bytes, length: int, src: int) -> bytes:
        if length == 0:
            return b""
        if self._rank == src:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            buffer = torch.empty(length, dtype=torch.uint8)
        dist.broadcast(buffer, group=self._group, group_src=src)
        return buffer.numpy().tobytes()

    def _broadcast(self, value: Any, src: int) -> Any:
        data, refused = _to_json(value) if self._rank == src else (b"", None)
        # A value that is not JSON still takes part (as length -1), so every rank
        # raises together instead of the others waiting out the timeout.
        size = torch.tensor([len(data) if refused is None else -1], dtype=torch.int64)
        dist.broadcast(size, group=self._group, group_src=src)
        if int(size.item()) < 0:
            raise refused or _not_sent([src])
        return json.loads(self._broadcast_bytes(data, int(size.item()), src))

    def _gather(self, value: Any) -> list[Any]:
        data, refused = _to_json(value)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self._world_size)]
        mine = torch.tensor([len(data) if refused is None else -1], dtype=torch.int64)
        dist.all_gather(sizes, mine, group=self._group)
        lengths = [int(s.item()) for s in sizes]
        if min(lengths) < 0:
            raise refused or _not_sent([r for r, n in enumerate(lengths) if n < 0])
        longest = max(lengths)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buffers = [torch.empty(longest, dtype=torch.uint8) for _ in range(self._world_size)]
        dist.all_gather(buffers, mine, group=self._group)
        return [json.loads(b[:n].numpy().tobytes()) for b, n in zip(buffers, lengths, strict=True)]

    def _collective(self, what: str, call: Callable[[], T]) -> T:
        if self._failure is not None:
            raise RankUnresponsive(
                str(self._failure), self._failure.ranks, self._failure.hosts
            ) from self._failure
        if self._pending is not None:  # its strings must come before anything else
            self._pending.wait()
        self._calls += 1
        try:
            return call()
        except RuntimeError as exc:  # DistBackendError and gloo's plain RuntimeError
            self._failure = self._unresponsive(what, exc)
            raise self._failure from exc

    # ------------------------------------------------------------ diagnosis

    def _unresponsive(self, what: str, exc: BaseException) -> RankUnresponsive:
        missing = self._roll_call()
        if not missing:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return RankUnresponsive(
                f"{what} failed on rank {self._rank} although every rank is alive "
                f"({first_line[:200]}); check the ranks' logs and restart the job"
            )
        hosts = tuple(self._hosts[r] for r in missing)
        who = ", ".join(f"rank {r} ({h})" for r, h in zip(missing, hosts, strict=True))
        message = (
            f"{who} did not answer {what} within {self._timeout:g} s (seen from rank "
            f"{self._rank}): died or hung; check its log, then restart the job, "
            "which resumes from the last checkpoint"
        )
        log.error("%s", message)
        return RankUnresponsive(message, tuple(missing), hosts)

    def _roll_call(self) -> list[int]:
        """The ranks that do not reach this failed call within the timeout.

        Every rank that sees the call fail checks in under a key named after
        the call's sequence number; ranks that died or hang never do.
        """
        others = [r for r in range(self._world_size) if r != self._rank]
        if self._store is None:
            return others
        keys = [f"{self._prefix}failed/{self._calls}/{r}" for r in range(self._world_size)]
        deadline = time.monotonic() + self._timeout
        try:
            self._store.set(keys[self._rank], b"1")
            while True:
                missing = [r for r in others if not self._store.check([keys[r]])]
                if not missing or time.monotonic() >= deadline:
                    return missing
                time.sleep(_ROLL_CALL_POLL)
        except RuntimeError:  # the store went with the process that served it
            return others


def _checked_timeout(timeout: Any) -> float:
    """``timeout`` as seconds, refused unless a positive finite number gloo can take."""
    number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    if not (number and 0 < timeout <= _LONGEST_TIMEOUT):
        raise ConfigError(
            f"the collective timeout must be a positive number of seconds (at most "
            f"{_LONGEST_TIMEOUT:g}), got {timeout!r}; every collective needs one (a day is 86400)"
        )
    return float(timeout)


def _largest(work: Any, packed: torch.Tensor) -> tuple[int, ...]:
    work.wait()
    return tuple(packed.tolist())


def _default_store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


def _group_name(group: Any) -> str:
    return str(getattr(group, "group_name", "") or "side")


def _to_json(value: Any) -> tuple[bytes, ConfigError | None]:
    """``value`` as JSON, or the error to raise when it is not plain JSON."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":")).encode(), None
    except (TypeError, ValueError) as exc:
        return b"", ConfigError(
            f"cannot send {type(value).__name__} between ranks: {exc}; "
            "send plain JSON (str, int, float, bool, None, lists, str-keyed dicts)"
        )


def _not_sent(ranks: list[int]) -> ConfigError:
    """The error of the ranks whose value was fine, when another rank's was not JSON."""
    who = ", ".join(map(str, ranks))
    return ConfigError(
        f"nothing was sent: the value of rank(s) {who} is not plain JSON "
        "(see that rank's error); send plain JSON from every rank"
    )


def _clip(text: str) -> bytes:
    """``text`` as UTF-8, cut to at most _MAX_REASON_BYTES on a character boundary."""
    data = text.encode()
    if len(data) <= _MAX_REASON_BYTES:
        return data
    return data[:_MAX_REASON_BYTES].decode(errors="ignore").encode()
