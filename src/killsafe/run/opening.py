"""Opening a session: choose what to resume from, wire the parts, start records and services."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from killsafe.distributed.coordinator import Coordinator
from killsafe.interrupt import stdin_is_terminal
from killsafe.progress import Progress
from killsafe.run.best import BestTracker
from killsafe.run.boundary import StepBoundary
from killsafe.run.callbacks import Callbacks
from killsafe.run.closing import Closer
from killsafe.run.config import RunConfig
from killsafe.run.control import ControlInbox
from killsafe.run.ending import Ending
from killsafe.run.ledger import Ledger, SaveHooks
from killsafe.run.metrics import LoggedMetrics
from killsafe.run.position import Position
from killsafe.run.resume import Resume
from killsafe.run.services import Services
from killsafe.run.session import SessionRecord, refuse_if_attached
from killsafe.run.start_lines import start_lines
from killsafe.run.stops import Stops
from killsafe.run.tree import completed_epochs, load_run_state, saved_loop

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo
    from killsafe.store import CheckpointStore

__all__ = ["Deferred", "Opened", "Parts", "open_session"]


@dataclass(frozen=True)
class Parts:
    """The parts a ``Run`` holds from its making: none of them touches the disk."""

    config: RunConfig
    position: Position
    stops: Stops
    ending: Ending
    metrics: LoggedMetrics
    best: BestTracker
    services: Services
    callbacks: Callbacks
    coordinator: Coordinator
    session_id: str
    group: Any = None  # a RunGroup (killsafe.run.group) when the run has many processes


@dataclass(frozen=True)
class Opened:
    """The parts of an open session, made when the with-block is entered.

    ``finished``: the run was found finished at its start; nothing runs and
    its records stay as they are.
    """

    store: CheckpointStore
    rng: Any
    resume: Resume
    session: SessionRecord
    ledger: Ledger
    boundary: StepBoundary
    closer: Closer
    finished: bool
    say_start: Callable[[bool], None] | None
    """Says the run's start lines, when its loop starts (``True``: ``run.epochs()``);
    None while ``deferred``."""
    deferred: Deferred | None = None


@dataclass(frozen=True)
class Deferred:
    """A resume from a ``run.epochs()`` loop that had run to its end.

    Whether the run is finished is known only when its loop starts: ``run.epochs(n)``
    with ``n`` at most ``completed`` finds it finished, as a run at ``total_steps``
    is found at its start (nothing runs, its records stay as they are); a larger
    ``n``, or another loop, continues it. Until then the session writes nothing.
    """

    completed: int
    start: Callable[[], Callable[[bool], None]]
    """Starts the session's records and services; returns what says its start lines."""
    found_finished: Callable[[int], None]

    def begin(self, epochs: int | None) -> Callable[[bool], None] | None:
        """Start the session for a loop of ``epochs`` (None: not ``run.epochs()``);
        None when the run is found finished."""
        if epochs is not None and epochs <= self.completed:
            self.found_finished(self.completed)
            return None
        return self.start()


@dataclass(frozen=True)
class _Start:
    """When this session started, and from which checkpoint."""

    info: CheckpointInfo | None
    wall: float
    clock: float


def open_session(
    parts: Parts,
    store: CheckpointStore,
    rng: Any,
    session: SessionRecord,
    hooks: SaveHooks,
) -> Opened:
    """Resume (or start fresh), then start this session's records and services."""
    config, position = parts.config, parts.position
    group = parts.group
    if group is None or group.leader:
        refuse_if_attached(config.directory)
    resume = _resume_type(group)(
        store, config.directory, config.store_dir, config.resume, clear=config.clear
    )
    info = resume.choose()
    ledger = Ledger(
        store,
        position,
        session.events,
        parts.ending,
        hooks,
        async_save=config.async_save,
        if_busy=config.if_busy,
    )
    if info is not None:
        ledger.resumed(info)
        position.step = int(info.step)
        load_run_state(resume.run_state, parts.best, config.stop_policies)
    position.session_start = position.step
    start = _Start(info, time.time(), time.monotonic())
    finished = info is not None and position.reached_total
    if finished:
        progress = parts.services.open_quiet(position.step, position.total)
    else:
        progress = parts.services.open_display(position.step, position.total)
    boundary, closer = _wire(parts, store, session, ledger, progress, start)
    opened = functools.partial(
        Opened, store, rng, resume, session, ledger, boundary, closer, finished
    )
    if finished:
        _found_finished(parts, info)
        return opened(_say_nothing)
    loop = saved_loop(resume.run_state) if info is not None else None
    start_session = functools.partial(_start, parts, session, progress, start, loop)
    completed = completed_epochs(loop)
    if completed is None:
        return opened(start_session())
    found = functools.partial(_found_finished, parts, info)
    return opened(None, Deferred(completed, start_session, found))


def _wire(
    parts: Parts,
    store: CheckpointStore,
    session: SessionRecord,
    ledger: Ledger,
    progress: Progress,
    start: _Start,
) -> tuple[StepBoundary, Closer]:
    inbox = _inbox_type(parts.group)(
        parts.config.directory,
        parts.session_id,
        start.wall,
        session.events,
        ask_save=ledger.ask,
        ask_stop=parts.stops.request,
    )
    boundary = StepBoundary(
        save_policy=parts.config.save_policy,
        stop_policies=parts.config.stop_policies,
        position=parts.position,
        stops=parts.stops,
        ending=parts.ending,
        metrics=parts.metrics,
        best=parts.best,
        ledger=ledger,
        inbox=inbox,
        session=session,
        progress=progress,
        events=session.events,
        coordinator=parts.coordinator,
        started_clock=start.clock,
        flag_period=_flag_period(parts.coordinator.world_size),
    )
    closer = Closer(
        config=parts.config,
        position=parts.position,
        ending=parts.ending,
        stops=parts.stops,
        services=parts.services,
        store=store,
        session=session,
        inbox=inbox,
        ledger=ledger,
        best=parts.best,
        events=session.events,
        callbacks=parts.callbacks,
        started_clock=start.clock,
    )
    return boundary, closer


def _flag_period(world_size: int) -> float:
    if world_size == 1:
        return 0.0
    from killsafe.run.group import flag_period

    return flag_period()


def _resume_type(group: Any) -> type[Resume]:
    if group is None:
        return Resume
    from killsafe.run.group import GroupResume

    return GroupResume


def _inbox_type(group: Any) -> type[ControlInbox]:
    if group is None or group.leader:
        return ControlInbox
    from killsafe.run.group import QuietInbox

    return QuietInbox


def _start(
    parts: Parts,
    session: SessionRecord,
    progress: Progress,
    start: _Start,
    loop: Mapping[str, Any] | None,
) -> Callable[[bool], None]:
    """Start the session's records and services; return what says its start lines."""
    info = start.info
    parts.services.cut_history(None if info is None else parts.position.step)
    if info is not None:
        progress.checkpoint_saved(info.step, info.path)
    record = parts.config.record(total_steps=parts.position.total)
    session.write_start(info, parts.position.step, start.wall, record)
    signals_watched = parts.stops.interrupts.install()
    keyboard = parts.services.start_keyboard(parts.stops.interrupts)
    parts.services.start_server()
    session.write_status("running")
    session.start_heartbeat(start.clock)
    if parts.coordinator.rank != 0:  # one voice for the whole run
        return _say_nothing
    return functools.partial(
        _say_start, parts, info, loop, keyboard=keyboard, signals_watched=signals_watched
    )


def _say_nothing(epochs: bool) -> None:
    pass


def _say_start(
    parts: Parts,
    info: CheckpointInfo | None,
    loop: Mapping[str, Any] | None,
    epochs: bool,
    *,
    keyboard: bool,
    signals_watched: bool,
) -> None:
    """Where the run starts from, where and when it saves, and (on a terminal) how to stop.

    ``loop``: the ``run.epochs()`` position of the checkpoint resumed from, if
    any; ``epochs``: the loop that starts is ``run.epochs()``.
    """
    config = parts.config
    lines = start_lines(
        info,
        step=parts.position.step,
        epoch=loop.get("epoch") if loop is not None else parts.position.epoch,
        store_dir=config.store_dir,
        save_policy=config.save_policy,
        epochs=epochs,
        mirror=config.mirror,
        straight_to_mirror=getattr(parts.group, "saves_to_mirror", False),
        keyboard=keyboard and signals_watched,
        terminal=signals_watched and stdin_is_terminal(),
    )
    for line in lines:
        parts.services.say(line)


def _found_finished(
    parts: Parts, info: CheckpointInfo | None, epochs_done: int | None = None
) -> None:
    """A start that finds the run finished: nothing to run, nothing to record.

    The loop yields no step, and run.json, status.json, the history, the
    events and the report stay as the finishing session left them (a
    session of zero steps would wipe its figures). The tracked objects are
    still restored, for an evaluation after the loop. ``epochs_done``: the
    epochs of a ``run.epochs()`` loop found run to its end.
    """
    assert info is not None
    position = parts.position
    parts.ending.reason = "finished"
    if epochs_done is None:
        where = f"at step {position.step} of {position.total}"
        how = "raise total_steps to continue it"
    else:
        where = f"{epochs_done} epochs at step {position.step}"
        how = f"raise the count of run.epochs() above {epochs_done} to continue it"
    parts.services.say(
        f"killsafe: {parts.config.directory} already finished {where} "
        f"(checkpoint {info.path}); nothing to run, records kept; {how}"
    )
