"""The step boundary: observe, decide one ``Decision``, agree on it, then act.

After the body of a step returns, the boundary

1. observes: a background save that finished, the progress display,
   control requests;
2. decides one value, ``Decision``, from the stop requests (signals, the
   keyboard, ``run.stop``, requests), the stop policies, the time limit and
   the save policy: does the loop stop here and why, is a checkpoint due
   and why, under which name;
3. hands it to the coordinator as a ``Vote`` and receives the ``Agreement``
   (one process: the identity; many: every rank acts alike);
4. acts on the agreed decision: announces a stop, records the exit reason,
   commits the checkpoint, rewrites ``status.json`` when due.

It runs after every step, so the common case (nothing to do) costs a few
attribute reads and no allocation beyond the policies' ``Boundary``.

In a job of many processes a full agreement at every boundary would cost a
round trip between the ranks per step. The ranks agree in full only where
they must (see ``StepBoundary._agree_in_job``):

- at a *scheduled* boundary, one every rank recognises alone from the loop
  position: the loop ends here, or the save policy asks for a save when
  shown the position only (no clocks, no metrics, no requests): a step or
  epoch count. These act at their own step;
- at the boundary after one where some rank raised its flag: a stop asked
  on that rank (a signal, ``run.stop``, a stop policy, on rank 0 a request
  or the time limit), or on rank 0 a save its clock, metrics or a request
  asked for. The flags travel in one asynchronous ``all_reduce`` started at
  a boundary and read at the next, during the step between. Even that
  exchange is not made at every boundary when steps are short: rank 0
  sends with its flags how many boundaries to wait before the next
  exchange, enough steps to fill ``flag_period`` seconds by its own mean
  step time (one when steps are longer). So such a stop or save happens
  at most about ``flag_period`` plus one step after it was asked, on every
  rank at the same step; the stop stays asked and rank 0 keeps the save it
  asked for until then.
"""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

from killsafe.distributed.coordinator import CONTINUE, Agreement, Coordinator, Pending, Vote
from killsafe.policy import AnyOf, Boundary, StopPolicy
from killsafe.progress import Progress
from killsafe.run.best import BestTracker
from killsafe.run.control import ControlInbox
from killsafe.run.ending import Ending
from killsafe.run.ledger import Ledger
from killsafe.run.metrics import LoggedMetrics
from killsafe.run.position import Position
from killsafe.run.session import EventLog, SessionRecord
from killsafe.run.stops import Stops

__all__ = ["NOTHING", "Decision", "StepBoundary", "settle", "vote_for"]

logger = logging.getLogger("killsafe")


class Decision(NamedTuple):
    """What the loop does at one step boundary, decided before anything is done.

    ``stop``: the loop ends here; ``stop_reason``: why (a stop's reason such
    as ``signal:SIGTERM``, ``request``, ``time-limit``, or ``finished``, or
    ``exit`` when the loop was left early); ``asked``: the stop was asked for
    (a signal, a request, a policy), so it is announced. ``save``: a
    checkpoint is due, for ``save_reason``, named ``name`` (a request's),
    with ``note`` (a request's note).
    """

    stop: bool = False
    stop_reason: str | None = None
    asked: bool = False
    save: bool = False
    save_reason: str | None = None
    name: str | None = None
    note: str | None = None


NOTHING = Decision()
_IDLE_VOTE = Vote()
_MOST_BOUNDARIES_BETWEEN_FLAGS = 10_000


def vote_for(decision: Decision) -> Vote:
    """The vote this process casts for ``decision``."""
    if decision is NOTHING:
        return _IDLE_VOTE
    return Vote(
        stop=decision.stop_reason if decision.stop else None,
        save=decision.save_reason if decision.save else None,
        name=decision.name if decision.save else None,
    )


def settle(decision: Decision, agreement: Agreement) -> Decision:
    """The decision every process acts on: ``agreement``, with this process's note.

    A stop another process asked for is announced here too.
    """
    if agreement.stop is None and agreement.save is None:
        return NOTHING
    stop = agreement.stop is not None
    return Decision(
        stop=stop,
        stop_reason=agreement.stop,
        asked=stop and (decision.asked or not decision.stop),
        save=agreement.save is not None,
        save_reason=agreement.save,
        name=agreement.name,
        note=decision.note if agreement.save is not None else None,
    )


class StepBoundary:
    """Decides and acts at each step boundary of one session."""

    def __init__(
        self,
        *,
        save_policy: AnyOf,
        stop_policies: tuple[StopPolicy, ...],
        position: Position,
        stops: Stops,
        ending: Ending,
        metrics: LoggedMetrics,
        best: BestTracker,
        ledger: Ledger,
        inbox: ControlInbox,
        session: SessionRecord,
        progress: Progress,
        events: EventLog,
        coordinator: Coordinator,
        started_clock: float,
        flag_period: float = 0.0,
    ) -> None:
        self._save_policy = save_policy
        self._stop_policies = stop_policies
        self._position = position
        self._stops = stops
        self._ending = ending
        self._metrics = metrics
        self._best = best
        self._ledger = ledger
        self._inbox = inbox
        self._session = session
        self._progress = progress
        self._events = events
        self._agree = coordinator.agree
        self._max_async = coordinator.max_async
        self._together = coordinator.world_size > 1
        self._leader = coordinator.rank == 0
        self._flag_period = flag_period
        self._flags: Pending[tuple[int, ...]] | None = None  # sent at the last boundary
        # Boundaries of this session in a job, counted alike on every rank,
        # and the one that sends the next flags.
        self._boundaries = 0
        self._next_flags = 0
        self._kept: Decision | None = None  # rank 0's save, raised, for the next agreement
        self._writing: object | None = None  # the background save the flags asked about
        self._started_clock = started_clock
        self.loop_clock = 0.0  # when steps() started the loop
        self._announced = False

    def end(self, *, exiting: bool = False, epoch_end: bool = False) -> None:
        """The boundary after a step (``exiting``: the loop ends here whatever is decided;
        ``epoch_end``: ``run.epochs()`` advanced, after the epoch's end code)."""
        # Runs after every step: the common path is a few attribute reads and calls.
        now = time.monotonic()
        ledger = self._ledger
        if ledger.pending is not None:
            ledger.collect()  # a background save that finished (its failure is raised here)
        step = self._position.step
        self._progress.update(step)
        inbox = self._inbox
        if now >= inbox.next_poll:
            inbox.poll_at(now, step)
        decision = self.decide(now, exiting, epoch_end)
        if self._together:
            decision, agreement = self._agree_in_job(now, decision, exiting, epoch_end)
            if agreement.stop is not None and agreement.save is None:
                decision, agreement = self._agree_exit(now, agreement.stop, epoch_end)
        else:
            agreement = self._agree(_IDLE_VOTE if decision is NOTHING else vote_for(decision))
        if agreement.stop is None and agreement.save is None:
            if now >= self._session.next_status:
                self._session.write_status_at(now, "running")
            return
        self._act(now, settle(decision, agreement))

    def settle_flags(self) -> None:
        """Wait for the flags still travelling, as a job's loop fails between boundaries.

        A rank that died during the step never sent its flag: here that
        shows as ``RankUnresponsive`` naming it, where the training's own
        collective only said that a connection broke.
        """
        flags, self._flags = self._flags, None
        if flags is not None:
            flags.wait()

    def decide(self, now: float, exiting: bool, epoch_end: bool = False) -> Decision:
        """Ask the stop and save policies; changes nothing but the policies' own counters."""
        position = self._position
        step = position.step
        finished = position.reached_end
        stop_reason = self._stops.pending()
        boundary = self._policy_view(now, exiting or finished or stop_reason is not None, epoch_end)
        if self._metrics.step:  # the policies keep this step's; the next step starts afresh
            self._metrics.next_step()
            self._best.next_step()
        for policy in self._stop_policies:
            reason = policy.should_stop(boundary)
            if reason is not None:
                self._stops.request(reason)
        if stop_reason is None and self._stops.pending() is not None:
            stop_reason = self._stops.pending()
            boundary = boundary._replace(exiting=True)
        save_reason = self._save_policy.should_save(boundary)
        if not (save_reason or boundary.exiting):
            return NOTHING
        if boundary.exiting and not boundary.requested and step == position.session_start:
            save_reason = None  # no step ran in this session: nothing new to keep
        return self._decision(boundary.exiting, finished, stop_reason, save_reason)

    def _agree_in_job(
        self, now: float, decision: Decision, exiting: bool, epoch_end: bool
    ) -> tuple[Decision, Agreement]:
        """This boundary's agreement in a job: in full when scheduled or flagged, else none.

        Every rank takes the same branch: the flags are the same everywhere,
        and a scheduled boundary depends on the loop position alone.
        """
        boundary = self._boundaries
        self._boundaries += 1
        raised_before = False
        if self._flags is not None:
            flags, self._flags = self._flags, None
            raised, still_writing, wait = flags.wait()
            raised_before = bool(raised)
            self._next_flags = boundary - 1 + max(1, wait)  # counted from the sending boundary
            if not still_writing:
                self._collect_written()
        if self._leader and decision.save and self._kept is None:
            self._kept = decision  # only rank 0's saves count
        if raised_before or self._scheduled(exiting, epoch_end):
            kept, self._kept = self._kept, None
            if kept is not None and not decision.save:
                decision = decision._replace(
                    save=True, save_reason=kept.save_reason, name=kept.name, note=kept.note
                )
            return decision, self._agree(vote_for(decision))
        if boundary >= self._next_flags:
            self._send_flags(now, decision.stop or self._kept is not None)
        return decision, CONTINUE

    def _send_flags(self, now: float, raised: bool) -> None:
        """Start telling the other ranks whether this one has something to decide."""
        self._writing = self._ledger.pending
        written_here = getattr(self._writing, "written_here", None)  # a JobSave (run/group.py)
        writing = written_here is not None and not written_here()
        wait = self._boundaries_between_flags(now) if self._leader else 0
        self._flags = self._max_async((int(raised), int(writing), wait))

    def _boundaries_between_flags(self, now: float) -> int:
        """Rank 0's say: boundaries from these flags to the next, to fill ``flag_period``."""
        position = self._position
        ran = position.step - position.session_start
        if ran <= 0 or self._flag_period <= 0:
            return 1
        mean_step = (now - self.loop_clock) / ran
        if mean_step <= 0:
            return _MOST_BOUNDARIES_BETWEEN_FLAGS
        return max(1, min(_MOST_BOUNDARIES_BETWEEN_FLAGS, math.ceil(self._flag_period / mean_step)))

    def _collect_written(self) -> None:
        """No rank was still writing the background save flagged last: every rank
        collects it here, at the same boundary (its failure is raised here)."""
        writing, self._writing = self._writing, None
        agree_written = getattr(writing, "agree_written", None)  # a JobSave's
        if agree_written is not None and writing is self._ledger.pending:
            agree_written()
            self._ledger.collect()

    def _scheduled(self, exiting: bool, epoch_end: bool) -> bool:
        """Whether every rank knows, from the loop position alone, that something is due."""
        position = self._position
        if exiting or position.reached_end:
            return True
        shown = Boundary(
            position.step,
            last_save_step=self._ledger.last_save_step,
            epoch=position.epoch,
            epoch_end=epoch_end,
        )
        return bool(self._save_policy.should_save(shown))

    def _agree_exit(self, now: float, reason: str, epoch_end: bool) -> tuple[Decision, Agreement]:
        """Another rank stops the run, and rank 0 had no save due: decide again, as a
        run that exits for ``reason``, so the exit checkpoint is rank 0's to call.

        Every rank gets here at the same boundary (the condition is the agreement's).
        """
        position = self._position
        finished = position.reached_end
        boundary = self._policy_view(now, True, epoch_end)
        save_reason = self._save_policy.should_save(boundary)
        if not boundary.requested and position.step == position.session_start:
            save_reason = None  # no step ran in this session: nothing new to keep
        decision = self._decision(True, finished, reason, save_reason)
        return decision, self._agree(vote_for(decision))

    def _decision(
        self, exiting: bool, finished: bool, stop_reason: str | None, save_reason: str | None
    ) -> Decision:
        exit_reason = None
        if exiting:
            # Left early without a stop request (a `break`, no loop at all):
            # finished only when there was no step count to reach.
            complete = finished or self._position.open_ended
            exit_reason = stop_reason or ("finished" if complete else "exit")
        if save_reason == "exit":  # OnExit's: the checkpoint says why the run ends
            save_reason = exit_reason or save_reason
        ledger = self._ledger
        return Decision(
            stop=exiting,
            stop_reason=exit_reason,
            asked=stop_reason is not None,
            save=bool(save_reason),
            save_reason=save_reason or None,
            name=ledger.requested_name() if save_reason else None,
            note=ledger.requested_note() if save_reason else None,
        )

    def _policy_view(self, now: float, exiting: bool, epoch_end: bool) -> Boundary:
        position = self._position
        ledger = self._ledger
        ran = position.step - position.session_start
        last_save = ledger.last_save_clock
        since = last_save if last_save is not None else self.loop_clock
        return Boundary(
            position.step,
            now - self._started_clock,
            now - since,
            ledger.last_save_step,
            self._metrics.step,
            self._best.for_policies,
            (now - self.loop_clock) / ran if ran > 0 else 0.0,
            exiting,
            bool(ledger.requests),
            position.epoch,
            epoch_end,
        )

    def _act(self, now: float, decision: Decision) -> None:
        if decision.stop:
            if decision.asked:
                self._announce_stop(decision.stop_reason)
            self._ending.reason = decision.stop_reason
        if decision.save:
            assert decision.save_reason is not None
            self._ledger.commit(decision.save_reason, decision.name, decision.note)
        if now >= self._session.next_status:
            self._session.write_status_at(now, "stopping" if decision.asked else "running")

    def _announce_stop(self, reason: str | None) -> None:
        if self._announced:
            return
        self._announced = True
        step = self._position.step
        self._events.append(
            "stop-requested", step, reason=reason, request_id=self._inbox.first_stop_request
        )
        logger.info("stop requested (%s): finishing at step %d", reason, step)
