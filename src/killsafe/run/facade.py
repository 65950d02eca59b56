"""``Run``: any loop that can be stopped at any moment and continued exactly.

::

    with Run("runs/exp1") as run:
        run.track(model=model, optimizer=optimizer, scheduler=scheduler)
        for epoch in run.epochs(10):              # starts at the restored epoch
            for x, y in run.batches(loader):      # resumes mid-epoch; a batch is a step
                run.log(loss=train_step(x, y))
            evaluate(); scheduler.step()          # once per epoch, also across resumes

    with Run("runs/exp2", total_steps=10_000, save_every_steps=500) as run:
        run.track(model=model, optimizer=optimizer)
        for step in run.steps():          # starts after the restored checkpoint
            loss = train_step(step)
            run.log(loss=loss)

``run.step`` counts the steps completed. ``steps()`` yields 0-based step
numbers; after the body of step ``k`` returns, ``k + 1`` steps are complete and
that is the *step boundary* where everything happens: save policies are asked,
stop requests (signals, ``q``, a time limit, ``control/`` requests) are
honoured, ``status.json`` is rewritten every few seconds. A checkpoint taken
at step ``n`` holds the state after ``n`` steps, so a resumed run's first step
is ``n``: no step is repeated or skipped.

A requested stop finishes the current step, commits an emergency checkpoint
whose reason says why (``signal:SIGTERM``, ``keyboard``, ``time-limit``,
``request``, ``early-stop``), releases accelerator caches, logs a short summary
and leaves the with-block normally. An exception propagates: no checkpoint of
a possibly half-updated state is written, ``run.json`` records the failure, and
the last good checkpoint stays the one to resume from.

The nested loop is ``killsafe.run.loops``: what it saves when, and why an
epoch's end code runs exactly once, is written there.

``Run`` is a facade: it holds its configuration and the parts that do the
work (``killsafe.run.boundary``, ``ledger``, ``resume``, ``session``,
``closing``...). See docs/run.md for the guide.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from killsafe.distributed.coordinator import LocalCoordinator
from killsafe.errors import ConfigError, KillsafeError, RankUnresponsive
from killsafe.policy import SavePolicy, StopPolicy, describe_save_policy
from killsafe.run.best import BestTracker
from killsafe.run.callbacks import Callbacks
from killsafe.run.closing import write_report
from killsafe.run.config import DEFAULT_MIRROR_GRACE, Callback, RunConfig, keywords_from_args
from killsafe.run.ending import EXIT_STOPPED, Ending
from killsafe.run.ledger import SaveHooks
from killsafe.run.loops import Batches, EpochLoop, EpochStopped
from killsafe.run.metrics import LoggedMetrics
from killsafe.run.mirror import DirectMirror, Mirror
from killsafe.run.opening import Opened, Parts, open_session
from killsafe.run.position import Position
from killsafe.run.requeue import requeue_slurm_job, should_requeue
from killsafe.run.services import Services
from killsafe.run.session import EventLog, SessionRecord, StatusFigures, update_run_json
from killsafe.run.stops import Stops
from killsafe.run.tree import checkpoint_tree, saved_loop

if TYPE_CHECKING:
    import argparse

    from killsafe.format import CheckpointInfo
    from killsafe.preflight import Preflight
    from killsafe.saver import PendingSave
    from killsafe.store import CheckpointStore

__all__ = ["RESUME_ENV", "Run"]

RESUME_ENV = "KILLSAFE_RESUME"
"""Environment variable that overrides ``resume`` (``killsafe run`` sets it to ``auto``)."""


class Run:
    """A loop whose state is checkpointed, stopped gracefully and resumed exactly.

    Args:
        directory: the run directory (created if missing): ``checkpoints/``,
            ``run.json``, ``status.json``, ``history.jsonl``, ``events.jsonl``.
        total_steps: the number of steps to reach; ``None`` loops until stopped.
        save_every_steps: save when the step count is a multiple of this.
        save_every_seconds: save when this many seconds passed since the last save.
        save_every_epochs: save at the end of every N-th epoch of ``run.epochs()``,
            after the epoch's end code. With no save policy given at all, a run
            saves every epoch with ``run.epochs()``, else every 10 minutes, and
            on exit (``save_policy_description`` says which).
        keep_last: keep the newest N checkpoints (``None`` keeps all).
        keep_best: also keep the best K by ``best`` (default 1 when ``best`` is given).
        best: ``(metric, "min"|"max")`` or a metric name (min): the metric that
            ranks checkpoints, is shown as best in progress and summaries.
        resume: ``"auto"`` (newest verified checkpoint, fresh when none),
            ``"never"`` (fresh; refuses existing checkpoints unless ``clear``),
            ``"ask"`` (on a terminal), ``"latest"``, a step, a name or a path
            (missing is an error). ``KILLSAFE_RESUME`` overrides it.
        clear: with ``resume="never"``, delete existing checkpoints and history.
        save: your own save policy (``policy.SavePolicy``), combined with the shortcuts.
        stop_policy: a stop policy or a list of them, e.g. ``EarlyStopping(...)``.
        stop_after: stop with a checkpoint before this wall time ("3h50m", seconds).
        save_on_exit: commit a checkpoint when the loop ends (finish or stop).
        signals: extra signals that request a graceful stop (SIGINT and SIGTERM
            always do), e.g. ``("SIGUSR1",)`` for SLURM's ``--signal``; SIGKILL
            and SIGSTOP cannot be caught (``ConfigError``).
        keyboard: watch for ``q`` + Enter; ``None`` watches on an interactive terminal.
        progress: show progress (live on a terminal, plain lines off one).
        progress_every: seconds between two plain progress lines.
        serve: ``True`` (a free port) or a port from 0 to 65535: serve the
            dashboard and API on 127.0.0.1 from a child process that ends with
            the run (docs/dashboard.md); anything else is a ``ConfigError``.
        serve_limits: caps on the checkpoints that save requests over HTTP can
            create (``killsafe.server.ServeLimits``; default: 10 a minute, 20 named).
        compression: passed to the store (e.g. ``"zstd"``).
        async_save: write checkpoints in the background: the loop waits only
            for a snapshot of the state (see ``killsafe.saver``). A failed
            background save is raised at the next step boundary or at exit.
        if_busy: when a save is due while the previous one is still being
            written: ``"wait"`` for it, or ``"skip"`` (retried at the next
            step). Saves at exit always wait.
        snapshot: ``"auto"``, ``"fork"`` or ``"copy"``: how background saves
            snapshot the state.
        config: your own settings, recorded in ``run.json`` under ``config.user``.
        save_metrics: also keep ``metrics.csv`` (the history as CSV) up to date.
        tensorboard: also mirror the logged numbers to TensorBoard event files
            under ``tensorboard/`` (needs the ``tensorboard`` package).
        report: write ``report.txt``/``report.json``/``report.png`` at every exit.
        on_save, on_stop, on_finish, on_error: callbacks, called as
            ``on_save(run, info)``, ``on_stop(run)``, ``on_finish(run)``,
            ``on_error(run, exc)``; a failing callback is logged, never raised.
        process_group: the ``torch.distributed`` group whose ranks are this
            run; by default the initialised default group, if any. Every rank
            builds the same ``Run``; they stop and save together, rank 0 keeps
            the records (docs/distributed.md).
        collective_timeout: seconds any rank may be missing from a decision
            or a save before the others raise ``RankUnresponsive`` naming it.
        mirror: a second store the checkpoints are uploaded to in the
            background after each local commit (``s3://bucket/prefix``,
            ``gs://``, ``az://``, ``memory://`` or a directory), with the run's
            files; an empty run directory resumes from it (docs/storage.md).
        mirror_keep_last: the mirror keeps this many newest checkpoints
            (``None`` keeps all), besides the best ones when ``best`` is given.
        mirror_grace: seconds a stopping run waits for its uploads (default 25).
        incremental: checkpoints share the bytes that did not change since the
            last one (``CheckpointStore(incremental=True)``; docs/format.md).
        requeue: in a SLURM job, after the checkpoint of a stop that a signal
            or ``stop_after`` caused, run ``scontrol requeue`` for the job
            (rank 0), so that it starts again and resumes (docs/distributed.md).

    Use it on one thread, as a context manager; signal handlers are installed
    only when it is entered on the main thread.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        total_steps: int | None = None,
        save_every_steps: int | None = None,
        save_every_seconds: float | str | None = None,
        save_every_epochs: int | None = None,
        keep_last: int | None = 3,
        keep_best: int | None = None,
        best: tuple[str, str] | str | None = None,
        resume: str | int | os.PathLike[str] = "auto",
        clear: bool = False,
        save: SavePolicy | None = None,
        stop_policy: StopPolicy | list[StopPolicy] | tuple[StopPolicy, ...] | None = None,
        stop_after: float | str | None = None,
        save_on_exit: bool = True,
        signals: tuple[str | int, ...] | list[str | int] = (),
        keyboard: bool | None = None,
        progress: bool = True,
        progress_every: float = 30.0,
        serve: bool | int | None = None,
        serve_limits: Any = None,
        compression: str | None = None,
        async_save: bool = True,
        if_busy: str = "wait",
        snapshot: str = "auto",
        config: Mapping[str, Any] | None = None,
        save_metrics: bool = False,
        tensorboard: bool = False,
        report: bool = True,
        on_save: Callback | None = None,
        on_stop: Callback | None = None,
        on_finish: Callback | None = None,
        on_error: Callback | None = None,
        process_group: Any = None,
        collective_timeout: float = 300.0,
        mirror: str | os.PathLike[str] | None = None,
        mirror_keep_last: int | None = 3,
        mirror_grace: float = DEFAULT_MIRROR_GRACE,
        incremental: bool = False,
        requeue: bool = False,
    ) -> None:
        self._config = RunConfig.build(
            directory,
            total_steps=total_steps,
            save_every_steps=save_every_steps,
            save_every_seconds=save_every_seconds,
            save_every_epochs=save_every_epochs,
            keep_last=keep_last,
            keep_best=keep_best,
            best=best,
            resume=resume,
            clear=clear,
            save=save,
            stop_policy=stop_policy,
            stop_after=stop_after,
            save_on_exit=save_on_exit,
            signals=signals,
            keyboard=keyboard,
            progress=progress,
            progress_every=progress_every,
            serve=serve,
            serve_limits=serve_limits,
            compression=compression,
            async_save=async_save,
            if_busy=if_busy,
            snapshot=snapshot,
            config=config,
            save_metrics=save_metrics,
            tensorboard=tensorboard,
            report=report,
            callbacks={
                "on_save": on_save,
                "on_stop": on_stop,
                "on_finish": on_finish,
                "on_error": on_error,
            },
            mirror=mirror,
            mirror_keep_last=mirror_keep_last,
            mirror_grace=mirror_grace,
            incremental=incremental,
            requeue=requeue,
        )
        group = self._join_group(process_group, collective_timeout)
        self.directory: Path = self._config.directory
        self.state: dict[str, Any] = {}
        """The tracked objects by name; assign here to update a tracked plain value."""
        self._parts = Parts(
            config=self._config,
            position=Position(self._config.total_steps),
            stops=Stops(self._config.signals),
            ending=Ending(),
            metrics=LoggedMetrics(),
            best=BestTracker(self._config.watched_metrics()),
            services=self._services(group),
            callbacks=Callbacks(self, self._config.callbacks),
            coordinator=LocalCoordinator() if group is None else group.coordinator,
            session_id=uuid.uuid4().hex[:12],  # tags the control requests it accepts
            group=group,
        )
        self._opened: Opened | None = None
        self._mirror: Mirror | None = None
        self._entered = False
        self._exited = False
        self._loop_started = False
        self._epochs: EpochLoop | None = None
        self._found_finished_late = False

    @classmethod
    def from_args(cls, args: argparse.Namespace, **options: Any) -> Run:
        """A Run from the flags of ``killsafe.add_arguments``; ``options`` are the defaults.

        A flag given on the command line wins over the same option given here.
        """
        keywords = keywords_from_args(args, **options)
        directory = keywords.pop("directory")
        return cls(directory, **keywords)

    # -- the with-block ---------------------------------------------------

    def __enter__(self) -> Run:
        if self._entered:
            raise ConfigError(f"Run({self.directory}) was already entered; create a new Run")
        self._entered = True
        from killsafe.state import RNGState
        from killsafe.store import CheckpointStore, io_error

        config = self._config
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error("creating the run directory", self.directory, exc) from exc
        rng = RNGState()
        direct = self._saves_to_mirror()
        if direct:
            store = self._mirror_store()
        else:
            store = CheckpointStore(
                config.store_dir,
                keep_last=config.keep_last,
                snapshot=config.snapshot,
                **config.store_options(),
            )
        try:
            self._mirror = self._open_mirror(store, direct=direct)
        except BaseException:
            store.close()
            raise
        session = self._session_record()
        try:
            self._opened = open_session(
                self._parts, self._run_store(store), rng, session, self._save_hooks(session)
            )
        except BaseException as exc:
            self._parts.services.stop_keyboard()
            self._parts.stops.interrupts.restore()
            session.stop_heartbeat()
            store.close()
            self._close_mirror(stopping=True)
            if isinstance(exc, OSError):  # the run files could not be written
                if exc.filename:
                    raise io_error("starting the run: writing", Path(exc.filename), exc) from exc
                raise io_error(
                    "starting the run: writing its files in", self.directory, exc
                ) from exc
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._exited or self._opened is None:
            return False
        self._exited = True
        opened = self._opened
        # A stop inside run.batches() left the loops by EpochStopped, after its
        # checkpoint: an ordinary stop, absorbed here.
        stopped = isinstance(exc, EpochStopped) and self._parts.ending.decided()
        if stopped:
            exc = None
        lost = self._lost_rank(opened, exc)
        if opened.deferred is not None and not self._loop_started:
            # No loop ran: finished as it was, unless a failure is to be recorded.
            epochs = opened.deferred.completed if exc is None else None
            self._found_finished_late = opened.deferred.begin(epochs) is None
        try:
            if exc is None:
                opened.closer.exit_normally(opened.boundary)
            else:
                opened.closer.exit_on_exception(lost or exc)
        finally:
            opened.closer.close(lost or exc, finished_at_start=self._finished_at_start)
            self._close_mirror(stopping=self._parts.ending.status() != "finished")
            self._requeue_if_preempted()
        if lost is not None:
            raise lost from exc
        return stopped

    # -- what the loop calls ----------------------------------------------

    def track(self, **objects: Any) -> dict[str, Any]:
        """Register state to checkpoint; when resuming, restore it right here.

        Stateful objects (``state_dict``/``load_state_dict``: modules, optimizers,
        schedulers, samplers) are restored in place. Plain values (numbers,
        strings, lists, dicts, arrays, tensors) are replaced by the saved value;
        a dict or list is updated in place, so your reference stays valid. Read
        and update plain values through ``run.state[name]``. Returns the tracked
        objects by name, restored. RNG states are tracked automatically and
        restored last, when ``steps()`` starts.

        Raises ``UnsupportedState`` at once when a value cannot be saved, and
        ``StateMismatch`` when the checkpoint does not fit (keys and shapes listed).
        """
        opened = self._require_open("track")
        from killsafe import state as state_module

        for name in objects:
            if name.startswith("__"):
                raise ConfigError(f"track({name}=...): names starting with '__' are reserved")
        # A dry capture now, so an unsaveable value fails here and not hours later.
        state_module.capture(dict(objects))
        restored = opened.resume.restore(objects)
        self.state.update(restored)
        return restored

    def steps(self) -> Iterator[int]:
        """Yield 0-based step numbers from the restored step up to ``total_steps``.

        Ends early once a stop was requested and its checkpoint is committed.
        Iterate it once per run.
        """
        opened = self._require_open("steps")
        self._start_loop(opened, "steps")
        boundary = opened.boundary
        position, ending = self._parts.position, self._parts.ending
        while position.total is None or position.step < position.total:
            if ending.reason is not None:
                return
            if self._stop_before_step():
                boundary.end(exiting=True)
                return
            position.in_step = True
            yield position.step
            position.in_step = False
            position.step += 1
            boundary.end()
        if ending.reason is None:
            boundary.end(exiting=True)

    def epochs(self, count: int) -> Iterator[int]:
        """Yield epoch numbers from the restored epoch up to ``count`` (0-based).

        Inside, iterate ``run.batches(data)`` once per epoch; the code after
        it (the epoch's end code: an evaluation, ``scheduler.step()``) runs
        exactly once per epoch, whatever moment a stop, a kill or an
        exception comes. What is saved when:

        - after each batch but an epoch's last: ``(epoch, batch_index)``; a
          resume continues with the next batch of that epoch;
        - after an epoch's last batch (known from ``len(data)``): nothing
          until ``epochs()`` advances past the end code: then ``(epoch + 1,
          0)``, where ``save_every_epochs`` and the default policy save and a
          stop asked during the end code is honoured; the run finishes after
          the end code of the last epoch;
        - a stop decided inside ``run.batches()`` commits its checkpoint and
          leaves both loops (the with-block absorbs ``EpochStopped``), so the
          end code never runs on a partial epoch.

        The code before ``run.batches()`` in an epoch runs again when a
        resume lands mid-epoch. Iterate it once per run (not with ``steps()``).
        """
        opened = self._require_open("epochs")
        saved = saved_loop(opened.resume.run_state)  # read before the tree is dropped
        self._start_loop(opened, "epochs", count if isinstance(count, int) else None)
        parts = self._parts
        self._epochs = EpochLoop(
            parts.position, opened.boundary, parts.ending, self._stop_before_step, saved
        )
        return self._epochs.epochs(count)

    def batches(self, data: Any) -> Batches:
        """The batches of the current epoch of ``data``, from the restored position.

        ``data`` is a ``torch.utils.data.DataLoader`` over a map-style dataset
        (any sampler; each epoch is shuffled as torch does, ``set_epoch`` is
        called on a ``DistributedSampler``), torchdata's ``StatefulDataLoader``,
        any object with ``state_dict()``/``load_state_dict()``, or a list of
        batches. Each batch is one step (policies, progress, history and
        ``run.step`` count batches). The data position is saved with every
        checkpoint; a resume mid-epoch skips indices, never loads a skipped
        batch. ``len()`` of the result is the length of the whole epoch.
        Raises ``UnsupportedState`` for a plain iterator or generator.
        """
        self._require_open("batches")
        if self._epochs is None:
            raise ConfigError(
                "run.batches() runs inside `for epoch in run.epochs(n):`; "
                "for a flat loop use run.steps()"
            )
        return self._epochs.batches(data)

    def log(self, **metrics: Any) -> None:
        """Record metrics for the current step: history, progress, best values, policies."""
        self._require_open("log")
        if self._finished_at_start:
            return  # the history of a finished run is not rewritten
        step = self._parts.position.logged_step()
        history, progress = self._parts.services.history, self._parts.services.progress
        assert history is not None and progress is not None
        history.append(step, metrics)
        self._parts.metrics.log(metrics)
        self._parts.best.log(step, metrics)
        progress.log(step, metrics, best=self._parts.best.records)

    def save(self, name: str | None = None) -> None:
        """Ask for a checkpoint: at the next step boundary inside the loop, at once outside it.

        Inside ``run.epochs()`` but outside a batch (the end code), it waits
        for the next boundary, so that it never saves a half-run end code.

        Raises ``InvalidName`` here, at the call, when ``name`` is unusable.
        """
        opened = self._require_open("save")
        if name is not None:
            from killsafe.store import sanitize_name

            sanitize_name(name)  # InvalidName now, not at the next boundary
        if self._finished_at_start:
            return  # its final checkpoint is the state: nothing new to keep
        opened.ledger.ask(None, name)
        between = self._epochs is not None and self._epochs.between_batches
        if not (self._parts.position.in_step or between):
            opened.ledger.commit_requested()

    def stop(self, reason: str = "stop") -> None:
        """Ask the loop to stop at the next step boundary, with a checkpoint and ``reason``."""
        self._parts.stops.request(reason)

    @property
    def should_stop(self) -> bool:
        """Whether a stop was requested: check it in long inner loops (an evaluation)."""
        return self._parts.stops.pending() is not None

    @property
    def total_steps(self) -> int | None:
        """The number of steps to reach (``None``: until stopped)."""
        return self._parts.position.total

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self._parts.position.total = value

    @property
    def step(self) -> int:
        """Steps completed so far (in all sessions)."""
        return self._parts.position.step

    @property
    def epoch(self) -> int | None:
        """With ``run.epochs()``: the current epoch (0-based); ``None`` in a flat loop."""
        return self._parts.position.epoch

    @property
    def batch_index(self) -> int | None:
        """With ``run.epochs()``: inside a batch its 0-based index in the epoch, after the
        batches the number of them done; ``None`` in a flat loop."""
        return self._parts.position.batch_index

    @property
    def save_policy_description(self) -> str:
        """When this run saves, in one line ("every epoch and on exit")."""
        epochs = None if not self._loop_started else self._epochs is not None
        return describe_save_policy(self._config.save_policy, epochs=epochs)

    @property
    def resumed_from(self) -> CheckpointInfo | None:
        """The checkpoint this session resumed from, or ``None`` for a fresh start."""
        return self._opened.resume.info if self._opened is not None else None

    @property
    def exit_reason(self) -> str | None:
        """Why the run ended: ``finished``, a stop reason, ``error`` or ``keyboard:forced``."""
        return self._parts.ending.reason

    @property
    def finished(self) -> bool:
        """Whether the run reached its end (``exit_reason == "finished"``), not a stop."""
        return self._parts.ending.reason == "finished"

    @property
    def exit_code(self) -> int | None:
        """The status for ``sys.exit`` after the run: 0 finished, 75 stopped, 1 failed.

        0 when the run finished (or early stopping ended it); 75 (EX_TEMPFAIL)
        when it stopped before its end (a signal, a request, a time limit):
        run the same command again to resume; 1 when it failed. ``None``
        while the run is still going.
        """
        return self._parts.ending.exit_code()

    @property
    def last_checkpoint(self) -> CheckpointInfo | None:
        """The newest checkpoint committed or resumed from in this session."""
        return self._opened.ledger.last_info if self._opened is not None else None

    def summary(self, **fields: Any) -> None:
        """Store your own fields under ``run.json["summary"]`` (shown in the report).

        ``run.summary(parameters=n, win_rate=0.62)``. Also works after the
        ``with`` block (a final evaluation): the report is then written again.
        """
        if not self._entered:
            raise ConfigError("run.summary() needs a run that was entered: use `with Run(...)`")

        def update(data: dict[str, Any]) -> None:
            data.setdefault("summary", {}).update(fields)

        update_run_json(self.directory, update)
        if self._exited and self._config.report:
            write_report(self.directory)

    def set_phase(self, name: str | None) -> None:
        """Name what the loop is doing now ("training", "evaluation"); shown in progress."""
        if self._parts.services.progress is not None:
            self._parts.services.progress.set_phase(name)

    def count(self, name: str, value: float, total: float | None = None) -> None:
        """Set a counter of your own, shown in progress, ``status.json`` and the report.

        ``value`` is the current count, not an increment (``run.count("games",
        games, total=1000)``); ``total`` is kept until given again. The report
        gives its rate per second (games/s).
        """
        if self._parts.services.progress is not None:
            self._parts.services.progress.count(name, value, total)

    def preflight(self, checks: Any = (), **options: Any) -> Preflight:
        """A ``preflight.Preflight`` for this run's directory, tracked state and ``keep_last``.

        ``options`` are the other ``Preflight`` arguments (``requires``, ``data``,
        ``jsonl``, ``state_size``, ``round_trip``). Call it after ``track``;
        ``run.preflight(requires=["torch>=2"]).run_or_exit()`` stops on a no-go.
        """
        from killsafe.preflight import Preflight

        return Preflight(
            self.directory,
            state=self._checkpoint_tree() if self.state else None,
            keep_last=self._config.keep_last,
            checks=checks,
            **options,
        )

    # -- one run of many processes (killsafe.run.group) -------------------

    def _join_group(self, process_group: Any, timeout: float) -> Any:
        """Join the job's process group, if any; this rank's configuration follows."""
        if process_group is None and "torch.distributed" not in sys.modules:
            return None
        from killsafe.run.group import join_group

        group = join_group(process_group, timeout)
        if group is not None:
            self._config = group.config(self._config)
        return group

    def _lost_rank(self, opened: Opened, exc: BaseException | None) -> RankUnresponsive | None:
        """In a job whose loop failed: the rank that died, when our flags say one did.

        A rank's death usually breaks the training's own collective first,
        with a bare connection error; the flags it never sent name it.
        """
        if self._parts.group is None or not isinstance(exc, Exception):
            return None
        if isinstance(exc, KillsafeError):
            return None
        try:
            opened.boundary.settle_flags()
        except RankUnresponsive as lost:
            return lost
        saving = opened.ledger.pending  # a rank lost mid-save fails the save's collectives
        if saving is not None:
            try:
                saving.wait()
            except RankUnresponsive as lost:
                return lost
            except Exception:  # the ledger reports it as the run closes
                return None
        return None

    def _services(self, group: Any) -> Services:
        if group is None or group.leader:
            return Services(self._config)
        from killsafe.run.group import QuietServices

        return QuietServices(self._config)

    def _session_record(self) -> SessionRecord:
        group = self._parts.group
        session_type, events_type = SessionRecord, EventLog
        if group is not None and not group.leader:
            from killsafe.run.group import QuietEvents, QuietSession

            session_type, events_type = QuietSession, QuietEvents
        return session_type(
            self.directory,
            self._parts.session_id,
            events_type(self.directory),
            self._status_figures,
            self._live_state,
        )

    def _saves_to_mirror(self) -> bool:
        """In a job whose ranks do not all see rank 0's run directory (nodes with their own
        disks): the checkpoints go straight to the mirror. Collective; ``ConfigError`` on
        every rank when there is no mirror."""
        group = self._parts.group
        if group is None:
            return False
        from killsafe.run.group import ranks_not_sharing

        unseen = ranks_not_sharing(group, self.directory)
        if not unseen:
            return False
        if self._config.mirror is None:
            ranks = ", ".join(map(str, unseen))
            raise ConfigError(
                f"rank(s) {ranks} of the job do not see rank 0's run directory "
                f"{self.directory} (the nodes share no disk); give every rank one shared "
                "directory, or pass mirror=URL to save the checkpoints straight to an object store"
            )
        group.saves_to_mirror = True
        return True

    def _mirror_store(self) -> CheckpointStore:
        """The store at the mirror URL (rank 0's holds its lease, as a run's writer)."""
        from killsafe.store import CheckpointStore

        config = self._config
        assert config.mirror is not None
        return CheckpointStore(
            config.mirror,
            keep_last=config.mirror_keep_last,
            lease_owner=str(self.directory.resolve()),
            **config.store_options(),
        )

    def _open_mirror(self, store: CheckpointStore, *, direct: bool = False) -> Mirror | None:
        """The remote tier (rank 0 only); brings its newest checkpoint down when newer.

        ``direct``: ``store`` is the mirror itself (a job without a shared
        disk saves there); only the run's files travel then.
        """
        config, group = self._config, self._parts.group
        if config.mirror is None or (group is not None and not group.leader):
            return None
        if direct:
            mirror: Mirror = DirectMirror(store, self.directory, grace=config.mirror_grace)
        else:
            mirror = Mirror(self._mirror_store(), store, self.directory, grace=config.mirror_grace)
        try:
            # One run per mirror: a live writer of another run directory
            # refuses this one now, rather than failing its uploads later.
            mirror.remote.acquire()
            if config.resume == "never":
                mirror.start_over(clear=config.clear)
            else:
                mirror.sync(restore=config.resume in ("auto", "latest", "ask"))
        except BaseException:
            mirror.close()
            raise
        return mirror

    def _close_mirror(self, *, stopping: bool) -> None:
        """Wait for the uploads (bounded by the grace time on a stop) and say what reached."""
        mirror, self._mirror = self._mirror, None
        if mirror is None:
            return
        try:
            self._parts.services.announce(mirror.drain(stopping=stopping))
        finally:
            mirror.close()

    def _requeue_if_preempted(self) -> None:
        """With ``requeue=True``: requeue the SLURM job once a preemption's checkpoint is safe."""
        group, ending = self._parts.group, self._parts.ending
        if not self._config.requeue or (group is not None and not group.leader):
            return
        if ending.exit_code() == EXIT_STOPPED and should_requeue(ending.reason):
            self._parts.services.announce(requeue_slurm_job())

    def _run_store(self, store: Any) -> Any:
        if self._parts.group is None:
            return store
        from killsafe.run.group import GroupStore

        return GroupStore(store, self._parts.group)

    def _stop_before_step(self) -> bool:
        """A stop asked for before the step starts; in a job only a boundary decides."""
        alone = self._parts.coordinator.world_size == 1
        return alone and self._parts.stops.pending() is not None

    # -- what the parts read of the run ----------------------------------

    def _start_loop(self, opened: Opened, kind: str, epochs: int | None = None) -> None:
        """The loop starts: RNG states restored last, the clocks and the progress started.

        A deferred session starts here, or finds the run finished (nothing runs).
        """
        if self._loop_started:
            raise ConfigError(f"run.{kind}(): the run's loop was already started; a Run has one")
        self._loop_started = True
        say_start = opened.say_start
        if opened.deferred is not None:
            say_start = opened.deferred.begin(epochs)
            self._found_finished_late = say_start is None
        if say_start is None:
            opened.resume.restore_rng(opened.rng)
            return
        say_start(kind == "epochs")
        opened.resume.restore_rng(opened.rng)
        opened.boundary.loop_clock = time.monotonic()
        assert self._parts.services.progress is not None
        self._parts.services.progress.start()

    def _save_hooks(self, session: SessionRecord) -> SaveHooks:
        return SaveHooks(
            tree=self._checkpoint_tree,
            metrics=self._parts.metrics.plain,
            metadata=session.metadata,
            before_write=self._before_write,
            snapshot_taken=self._snapshot_taken,
            committed=self._committed,
            saved=lambda info: self._parts.callbacks.call("on_save", info),
        )

    def _before_write(self) -> None:
        self._parts.services.flush_history()
        if self._mirror is not None:
            self._mirror.hold()  # the local save gets the cores and the disk an upload takes

    def _snapshot_taken(self, writing: PendingSave | None) -> None:
        if self._mirror is not None:
            self._mirror.release(after=writing)

    def _committed(self, info: CheckpointInfo) -> None:
        self._parts.services.checkpoint_shown(info)
        if self._mirror is not None:
            self._mirror.submit(info)

    def _checkpoint_tree(self) -> dict[str, Any]:
        rng = self._opened.rng if self._opened is not None else None
        loop = self._epochs.state_dict() if self._epochs is not None else None
        return checkpoint_tree(self.state, self._parts.best, self._config.stop_policies, rng, loop)

    def _status_figures(self) -> StatusFigures:
        progress = self._parts.services.progress
        assert progress is not None
        return StatusFigures(
            progress.snapshot(), self._parts.position.step, self._parts.ending.reason
        )

    def _live_state(self) -> str:
        return "stopping" if self._parts.stops.pending() is not None else "running"

    @property
    def _finished_at_start(self) -> bool:
        """Found finished when entered (or when its deferred loop started): nothing runs,
        its records stay as they are."""
        return self._opened is not None and (self._opened.finished or self._found_finished_late)

    def _require_open(self, what: str) -> Opened:
        if not self._entered or self._exited or self._opened is None:
            raise ConfigError(
                f"run.{what}() needs an open run: use it inside `with Run(...) as run:`"
            )
        return self._opened

    # -- for tests and tools that look inside -----------------------------

    @property
    def _server(self) -> Any:
        return self._parts.services.server

    @property
    def _progress(self) -> Any:
        return self._parts.services.progress

    @property
    def _heartbeat(self) -> Any:
        return self._opened.session.heartbeat if self._opened is not None else None

    @property
    def _serve_limits(self) -> Any:
        return self._config.serve_limits
