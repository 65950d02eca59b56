"""``Run``: any loop that can be stopped at any moment and continued exactly.

::

    with Run("runs/exp1", total_steps=10_000, save_every_steps=500) as run:
        run.track(model=model, optimizer=optimizer, data=loader)
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

See docs/run.md for the guide.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from killsafe import runfiles
from killsafe.environment import getenv
from killsafe.errors import (
    CheckpointExists,
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    SaveFailed,
    StateMismatch,
)
from killsafe.history import History, require_tensorboard
from killsafe.interrupt import KeyboardMonitor, StopRequests
from killsafe.policy import (
    AnyOf,
    Boundary,
    EveryNSeconds,
    EveryNSteps,
    OnExit,
    OnImprovement,
    OnRequest,
    SavePolicy,
    StopPolicy,
    TimeLimit,
    is_better,
    parse_duration,
)
from killsafe.progress import Progress, format_duration, metric_direction
from killsafe.saver import PendingSave

if TYPE_CHECKING:
    import argparse

    from killsafe.format import CheckpointInfo
    from killsafe.preflight import Preflight
    from killsafe.store import CheckpointStore

__all__ = ["RESUME_ENV", "Run"]

logger = logging.getLogger("killsafe")

RESUME_ENV = "KILLSAFE_RESUME"
"""Environment variable that overrides ``resume`` (``killsafe run`` sets it to ``auto``)."""

CHECKPOINTS_DIR = "checkpoints"
RUN_KEY = "__run__"
RNG_KEY = "__rng__"
CONTROL_POLL_SECONDS = 0.25

Callback = Callable[..., Any]


class Run:
    """A loop whose state is checkpointed, stopped gracefully and resumed exactly.

    Args:
        directory: the run directory (created if missing): ``checkpoints/``,
            ``run.json``, ``status.json``, ``history.jsonl``, ``events.jsonl``.
        total_steps: the number of steps to reach; ``None`` loops until stopped.
        save_every_steps: save when the step count is a multiple of this.
        save_every_seconds: save when this many seconds passed since the last save.
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
    ) -> None:
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 0):
            raise ConfigError(f"total_steps={total_steps!r}: use a whole number >= 0 or None")
        self.directory = Path(directory)
        self.total_steps = total_steps
        self._best_spec = _best_spec(best)
        self._keep_last = keep_last
        self._keep_best = keep_best if keep_best is not None or best is None else 1
        self._resume = getenv("RESUME") or resume
        self._clear = clear
        self._save_policy = _build_save_policy(
            save, save_every_steps, save_every_seconds, save_on_exit
        )
        self._stop_policies = _build_stop_policies(stop_policy, stop_after)
        self._interrupts = StopRequests(signals)
        self._keyboard_option = keyboard
        self._progress_option = progress
        self._progress_every = progress_every
        self._serve_option = _checked_serve(serve)
        if serve_limits is not None:  # checked now, not when the run starts serving
            importlib.import_module("killsafe.server.launcher").check_limits(serve_limits)
        self._serve_limits = serve_limits
        self._compression = compression
        if if_busy not in ("wait", "skip"):
            raise ConfigError(f"if_busy={if_busy!r}: use 'wait' or 'skip'")
        self._async_save = async_save
        self._if_busy = if_busy
        self._snapshot = snapshot
        self._user_config = dict(config or {})
        if tensorboard:
            require_tensorboard()
        self._save_metrics = save_metrics
        self._tensorboard = tensorboard
        self._report = report
        self._callbacks = {
            "on_save": on_save,
            "on_stop": on_stop,
            "on_finish": on_finish,
            "on_error": on_error,
        }
        self._watched = _watched_metrics(self._save_policy, self._best_spec)
        self._undirected: set[str] = set()  # logged metrics whose names tell no direction

        self.state: dict[str, Any] = {}
        """The tracked objects by name; assign here to update a tracked plain value."""
        self._step = 0
        self._session_start_step = 0
        self._entered = False
        self._exited = False
        self._loop_started = False
        self._in_step = False
        self._exit_reason: str | None = None
        self._stop_reason: str | None = None
        self._stop_seen = False
        self._resumed_from: CheckpointInfo | None = None
        self._saved_tree: Mapping[str, Any] | None = None
        self._last_info: CheckpointInfo | None = None
        self._last_save_step: int | None = None
        self._last_save_clock: float | None = None
        self._pending_save: PendingSave | None = None
        self._save_requests: list[tuple[str | None, str | None]] = []  # (request_id, name)
        self._request_notes: dict[str, str] = {}  # request id -> the note given with it
        # Requests answered by the background save in flight, not by a later one.
        self._inflight_requests: list[tuple[str | None, str | None]] = []
        self._stop_request_ids: list[str] = []
        self._seen_requests: set[str] = set()
        self._session_id = uuid.uuid4().hex[:12]  # tags the control requests it accepts
        self._step_metrics: dict[str, Any] = {}
        self._latest_metrics: dict[str, Any] = {}
        self._best: dict[str, dict[str, Any]] = {}
        self._best_values: dict[str, float] = {}
        self._best_before_step: dict[str, float] | None = None
        self._store: CheckpointStore | None = None
        self._history: History | None = None
        self._progress: Progress | None = None
        self._keyboard: KeyboardMonitor | None = None
        self._server: Any = None
        self._rng: Any = None
        self._run_id = ""
        self._session_index = -1
        self._started_wall = 0.0
        self._started_clock = 0.0
        self._loop_clock = 0.0
        self._next_status = 0.0
        self._status_lock = threading.Lock()
        self._status_written = 0.0  # monotonic time of the last status.json
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._next_control = 0.0
        self._error: str | None = None
        self._already_finished = False  # found finished at the start: records stay as they are

    # -- construction from flags ------------------------------------------

    @classmethod
    def from_args(cls, args: argparse.Namespace, **options: Any) -> Run:
        """A Run from the flags of ``killsafe.add_arguments``; ``options`` are the defaults.

        A flag given on the command line wins over the same option given here.
        """
        from killsafe.arguments import options_from_args

        merged = options_from_args(args, **options)
        directory = merged.pop("directory")
        return cls(directory, **merged)

    # -- the with-block ---------------------------------------------------

    def __enter__(self) -> Run:
        if self._entered:
            raise ConfigError(f"Run({self.directory}) was already entered; create a new Run")
        self._entered = True
        from killsafe.state import RNGState
        from killsafe.store import CheckpointStore, io_error

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise io_error("creating the run directory", self.directory, exc) from exc
        self._rng = RNGState()
        self._store = CheckpointStore(
            self.directory / CHECKPOINTS_DIR,
            keep_last=self._keep_last,
            keep_best=self._keep_best,
            best=self._best_spec,
            compression=self._compression,
            snapshot=self._snapshot,
        )
        try:
            self._open_session()
        except BaseException as exc:
            if self._keyboard is not None:
                self._keyboard.stop()
            self._interrupts.restore()
            self._stop_heartbeat()
            self._store.close()
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
    ) -> None:
        if self._exited:
            return
        self._exited = True
        try:
            if exc is None:
                self._exit_normally()
            else:
                self._exit_on_exception(exc)
        finally:
            self._close(exc)

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
        self._require_open("track")
        from killsafe import state as state_module

        for name in objects:
            if name.startswith("__"):
                raise ConfigError(f"track({name}=...): names starting with '__' are reserved")
        # A dry capture now, so an unsaveable value fails here and not hours later.
        state_module.capture(dict(objects))
        restored: dict[str, Any] = dict(objects)
        if self._saved_tree is not None:
            missing = [name for name in objects if name not in self._saved_tree]
            if missing:
                where = self._resumed_from.path if self._resumed_from else "the checkpoint"
                raise StateMismatch(
                    f"{where} has no saved state for {', '.join(missing)}; it holds "
                    f"{', '.join(sorted(k for k in self._saved_tree if not k.startswith('__')))}"
                    "; track the same names as the run that saved it, or resume='never'"
                )
            saved = {name: self._saved_tree[name] for name in objects}
            _check_shapes(objects, saved, self._resumed_from)
            values = state_module.restore(objects, saved)
            for name, value in values.items():
                restored[name] = _restore_in_place(objects[name], value)
        self.state.update(restored)
        return restored

    def steps(self) -> Iterator[int]:
        """Yield 0-based step numbers from the restored step up to ``total_steps``.

        Ends early once a stop was requested and its checkpoint is committed.
        Iterate it once per run.
        """
        self._require_open("steps")
        if self._loop_started:
            raise ConfigError("run.steps() was already iterated; a Run has one loop")
        self._loop_started = True
        self._restore_rng()
        self._loop_clock = time.monotonic()
        assert self._progress is not None
        self._progress.start()
        while self.total_steps is None or self._step < self.total_steps:
            if self._exit_reason is not None:
                return
            if self._pending_stop() is not None:
                self._end_boundary(exiting=True)
                return
            self._in_step = True
            yield self._step
            self._in_step = False
            self._step += 1
            self._end_boundary()
        if self._exit_reason is None:
            self._end_boundary(exiting=True)

    def log(self, **metrics: Any) -> None:
        """Record metrics for the current step: history, progress, best values, policies."""
        self._require_open("log")
        if self._already_finished:
            return  # the history of a finished run is not rewritten
        step = self._step + 1 if self._in_step else self._step
        assert self._history is not None and self._progress is not None
        self._history.append(step, metrics)
        if self._best_before_step is None:
            self._best_before_step = dict(self._best_values)
        self._step_metrics.update(metrics)
        self._latest_metrics.update(metrics)
        self._update_best(step, metrics)
        self._progress.log(step, metrics, best=self._best)

    def save(self, name: str | None = None) -> None:
        """Ask for a checkpoint: at the next step boundary inside the loop, at once outside it.

        Raises ``InvalidName`` here, at the call, when ``name`` is unusable.
        """
        self._require_open("save")
        if name is not None:
            from killsafe.store import sanitize_name

            sanitize_name(name)  # InvalidName now, not at the next boundary
        if self._already_finished:
            return  # its final checkpoint is the state: nothing new to keep
        self._save_requests.append((None, name))
        if not self._in_step:
            self._commit_requested()

    def stop(self, reason: str = "stop") -> None:
        """Ask the loop to stop at the next step boundary, with a checkpoint and ``reason``."""
        if self._stop_reason is None:
            self._stop_reason = reason

    @property
    def should_stop(self) -> bool:
        """Whether a stop was requested: check it in long inner loops (an evaluation)."""
        return self._stop_reason is not None or self._interrupts.reason is not None

    @property
    def step(self) -> int:
        """Steps completed so far (in all sessions)."""
        return self._step

    @property
    def resumed_from(self) -> CheckpointInfo | None:
        """The checkpoint this session resumed from, or ``None`` for a fresh start."""
        return self._resumed_from

    @property
    def exit_reason(self) -> str | None:
        """Why the run ended: ``finished``, a stop reason, ``error`` or ``keyboard:forced``."""
        return self._exit_reason

    @property
    def last_checkpoint(self) -> CheckpointInfo | None:
        """The newest checkpoint committed or resumed from in this session."""
        return self._last_info

    def summary(self, **fields: Any) -> None:
        """Store your own fields under ``run.json["summary"]`` (shown in the report).

        ``run.summary(parameters=n, win_rate=0.62)``. Also works after the
        ``with`` block (a final evaluation): the report is then written again.
        """
        if not self._entered:
            raise ConfigError("run.summary() needs a run that was entered: use `with Run(...)`")

        def update(data: dict[str, Any]) -> None:
            data.setdefault("summary", {}).update(fields)

        self._update_run_json(update)
        if self._exited:
            self._write_report()

    def set_phase(self, name: str | None) -> None:
        """Name what the loop is doing now ("training", "evaluation"); shown in progress."""
        if self._progress is not None:
            self._progress.set_phase(name)

    def count(self, name: str, value: float, total: float | None = None) -> None:
        """Set a counter of your own, shown in progress, ``status.json`` and the report.

        ``value`` is the current count, not an increment (``run.count("games",
        games, total=1000)``); ``total`` is kept until given again. The report
        gives its rate per second (games/s).
        """
        if self._progress is not None:
            self._progress.count(name, value, total)

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
            keep_last=self._keep_last,
            checks=checks,
            **options,
        )

    # -- starting ---------------------------------------------------------

    def _open_session(self) -> None:
        self._refuse_if_attached()
        info = self._resolve_resume()
        assert self._store is not None
        if info is not None:
            if self._saved_tree is None:
                self._saved_tree = self._store.load(info)
            self._warn_if_newer(info)
            self._resumed_from = info
            self._last_info = info
            self._step = int(info.step)
            self._last_save_step = self._step
            self._load_run_state(self._saved_tree.get(RUN_KEY))
        self._session_start_step = self._step
        self._started_wall = time.time()
        self._started_clock = time.monotonic()
        if info is not None and self.total_steps is not None and self._step >= self.total_steps:
            self._open_finished(info)
            return
        self._history = History(
            self.directory, csv=self._save_metrics, tensorboard=self._tensorboard
        )
        self._history.truncate_after(self._step if info is not None else -1)
        self._progress = Progress(
            total=self.total_steps,
            start_step=self._step,
            every=self._progress_every,
            enabled=self._progress_option,
        )
        if info is not None:
            self._progress.checkpoint_saved(info.step, info.path)
        self._write_session_start(info)
        self._interrupts.install()
        self._start_keyboard()
        self._start_server()
        self._write_status("running")
        self._next_status = self._started_clock + runfiles.STATUS_INTERVAL
        self._start_heartbeat()

    def _open_finished(self, info: CheckpointInfo) -> None:
        """A start that finds the run finished: nothing to run, nothing to record.

        The loop yields no step, and run.json, status.json, the history, the
        events and the report stay as the finishing session left them (a
        session of zero steps would wipe its figures). The tracked objects are
        still restored, for an evaluation after the loop.
        """
        self._already_finished = True
        self._exit_reason = "finished"
        self._history = History(self.directory)
        self._progress = Progress(total=self.total_steps, start_step=self._step, enabled=False)
        text = (
            f"killsafe: {self.directory} already finished at step {self._step} of "
            f"{self.total_steps} (checkpoint {info.path}); nothing to run, records kept; "
            "raise total_steps to continue it"
        )
        logger.info(text)
        if self._progress_option and not logger.hasHandlers():
            sys.stderr.write(text + "\n")  # nobody logs: the one line must still show

    def _start_heartbeat(self) -> None:
        # The loop rewrites status.json between steps; during one long step (an
        # evaluation) this thread does, so readers still see a live run.
        self._heartbeat = threading.Thread(target=self._beat, name="killsafe-status", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        # Only when the loop missed its own rewrite: a fast loop writes every interval.
        while not self._heartbeat_stop.wait(runfiles.STATUS_INTERVAL / 2):
            if time.monotonic() - self._status_written < 1.5 * runfiles.STATUS_INTERVAL:
                continue
            state = "stopping" if self._pending_stop() is not None else "running"
            try:
                self._write_status(state, heartbeat=True)
            except Exception:  # a figure that fails to read must not end the beat
                logger.debug("status heartbeat failed", exc_info=True)

    def _stop_heartbeat(self) -> None:
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10.0)
            self._heartbeat = None

    def _refuse_if_attached(self) -> None:
        try:
            status = runfiles.read_json(self.directory / runfiles.STATUS_FILE)
        except Exception:  # a torn status file belongs to no live run
            return
        if runfiles.is_attached(status) and status.get("pid") != os.getpid():
            raise ConfigError(
                f"{self.directory} is in use by a live run (pid {status.get('pid')} on "
                f"{status.get('host')}); stop it first or use another directory"
            )

    def _resolve_resume(self) -> CheckpointInfo | None:
        assert self._store is not None
        ref = self._resume
        if isinstance(ref, str) and ref.strip().isdigit():
            ref = int(ref)
        if ref == "auto":
            return self._load_newest_good()
        if ref == "never":
            self._refuse_or_clear()
            return None
        if ref == "ask":
            return self._ask()
        try:
            return self._store.get(ref)
        except CheckpointNotFound as exc:
            raise CheckpointNotFound(
                f"resume={ref!r}: no such checkpoint in {self._store_dir()} ({exc}); "
                "list them with `killsafe list`, or pass resume='auto' or 'never'"
            ) from exc

    def _warn_if_newer(self, info: CheckpointInfo) -> None:
        assert self._store is not None
        newer = [c.step for c in self._store.list() if c.step > info.step]
        if newer:
            logger.warning(
                "resuming from step %d although %s holds newer checkpoints (steps %s); "
                "valid ones are replaced as this run reaches their steps, damaged ones kept",
                info.step,
                self._store_dir(),
                ", ".join(map(str, newer)),
            )

    def _load_newest_good(self) -> CheckpointInfo | None:
        """The newest checkpoint that loads, loaded: one read that also verifies."""
        assert self._store is not None
        for info in reversed(self._store.list()):
            try:
                self._saved_tree = self._store.load(info)
            except CorruptCheckpoint as exc:
                logger.warning("skipping corrupt checkpoint %s: %s", info.path, exc)
                continue
            return info
        return None

    def _refuse_or_clear(self) -> None:
        assert self._store is not None
        existing = self._store.list()
        if not existing:
            return
        if not self._clear:
            raise ConfigError(
                f"resume='never' but {self._store_dir()} holds {len(existing)} checkpoint(s) "
                f"up to step {existing[-1].step}; pass clear=True (--clear) to delete them, "
                "resume='auto' to continue, or use another directory"
            )
        for info in existing:
            self._store.delete(info, force=True)
        logger.info("cleared %d checkpoint(s) from %s", len(existing), self._store_dir())

    def _ask(self) -> CheckpointInfo | None:
        assert self._store is not None
        found = self._store.list()
        latest = self._store.latest() if found else None
        if latest is None:
            return None
        if not (sys.stdin is not None and sys.stdin.isatty()):
            logger.info("resume='ask' without a terminal: resuming from step %d", latest.step)
            return latest
        sys.stderr.write(
            f"{self.directory}: {len(found)} checkpoint(s); newest: {_describe(latest)}\n"
            f"Resume from step {latest.step}? [Y]es / [n]ew run (deletes them) / a step number: "
        )
        sys.stderr.flush()
        answer = (sys.stdin.readline() or "").strip().lower()
        if answer in ("", "y", "yes"):
            return latest
        if answer.isdigit():
            return self._store.get(int(answer))
        if answer in ("n", "no", "new"):
            self._clear = True
            self._refuse_or_clear()
            return None
        raise ConfigError(f"resume='ask': answer {answer!r} not understood; use y, n or a step")

    def _restore_rng(self) -> None:
        # Last of all, just before the first step: restoring other objects and
        # building iterators in between must not shift the random streams.
        if self._saved_tree is not None and RNG_KEY in self._saved_tree:
            self._rng.load_state_dict(self._saved_tree[RNG_KEY])
        self._saved_tree = None

    def _start_keyboard(self) -> None:
        if self._keyboard_option is False:
            return
        monitor = KeyboardMonitor(lambda: self._interrupts.request("keyboard"))
        if monitor.start():
            self._keyboard = monitor
            if self._progress_option:
                assert self._progress is not None
                self._progress.message("press q then Enter (or Ctrl+C) to stop with a checkpoint")

    def _start_server(self) -> None:
        if self._serve_option is None or self._serve_option is False:
            return
        port = 0 if self._serve_option is True else int(self._serve_option)
        try:
            launcher = importlib.import_module("killsafe.server.launcher")
            self._server = launcher.start_child_server(
                self.directory, host="127.0.0.1", port=port, limits=self._serve_limits
            )
        except Exception as exc:  # the dashboard must never stop a run from starting
            logger.warning("dashboard not started: %s", exc)
            return
        # The server logs its address; show it on the display when nobody logs.
        if self._progress_option and self._progress is not None and not logger.hasHandlers():
            self._progress.message(f"dashboard at {self._server.url}")

    # -- the step boundary ------------------------------------------------

    def _end_boundary(self, *, exiting: bool = False) -> None:
        # Runs after every step: keep the common path to a few attribute reads.
        now = time.monotonic()
        if self._pending_save is not None:
            self._collect_save()
        assert self._progress is not None
        self._progress.update(self._step)
        if now >= self._next_control:
            self._next_control = now + CONTROL_POLL_SECONDS
            self._poll_control()
        finished = self.total_steps is not None and self._step >= self.total_steps
        stop_reason = self._pending_stop()
        boundary = self._boundary(now, exiting or finished or stop_reason is not None)
        self._best_before_step = None
        if self._step_metrics:
            self._step_metrics = {}
        for policy in self._stop_policies:
            reason = policy.should_stop(boundary)
            if reason is not None:
                self.stop(reason)
        if stop_reason is None and self._pending_stop() is not None:
            stop_reason = self._pending_stop()
            boundary = boundary._replace(exiting=True)
        if stop_reason is not None and not self._stop_seen:
            self._stop_seen = True
            request_id = self._stop_request_ids[0] if self._stop_request_ids else None
            runfiles.append_event(
                self.directory,
                "stop-requested",
                self._step,
                reason=stop_reason,
                request_id=request_id,
            )
            logger.info("stop requested (%s): finishing at step %d", stop_reason, self._step)
        if boundary.exiting:
            # Left early without a stop request (a `break`, no loop at all):
            # finished only when there was no step count to reach.
            complete = finished or self.total_steps is None
            self._exit_reason = stop_reason or ("finished" if complete else "exit")
        save_reason = self._save_policy.should_save(boundary)
        if boundary.exiting and not boundary.requested and self._step == self._session_start_step:
            save_reason = None  # no step ran in this session: nothing new to keep
        if save_reason:
            if save_reason == "exit":  # OnExit's: the checkpoint says why the run ends
                save_reason = self._exit_reason or save_reason
            self._commit_checkpoint(save_reason, self._requested_name())
        if now >= self._next_status:
            self._next_status = now + runfiles.STATUS_INTERVAL
            self._write_status("stopping" if stop_reason else "running")

    def _boundary(self, now: float, exiting: bool) -> Boundary:
        ran = self._step - self._session_start_step
        since = self._last_save_clock if self._last_save_clock is not None else self._loop_clock
        best = self._best_before_step
        return Boundary(
            self._step,
            now - self._started_clock,
            now - since,
            self._last_save_step,
            self._step_metrics,
            self._best_values if best is None else best,
            (now - self._loop_clock) / ran if ran > 0 else 0.0,
            exiting,
            bool(self._save_requests),
        )

    def _pending_stop(self) -> str | None:
        return self._stop_reason or self._interrupts.reason

    def _requested_name(self) -> str | None:
        return next((name for _, name in self._save_requests if name), None)

    def _requested_note(self) -> str | None:
        notes = self._request_notes
        return next((notes[rid] for rid, _ in self._save_requests if rid in notes), None)

    def _poll_control(self) -> None:
        for path, request in runfiles.pending_requests(self.directory):
            if request.id in self._seen_requests:
                continue
            if not self._accepted_by_this_session(request):
                self._discard_request(path, request, "made for an earlier session")
                continue
            self._seen_requests.add(request.id)
            with contextlib.suppress(OSError):
                path.unlink()
            if request.action == "save":
                self._save_requests.append((request.id, request.name))
                if request.note:
                    self._request_notes[request.id] = request.note
                runfiles.append_event(
                    self.directory, "save-requested", self._step, request_id=request.id
                )
            elif request.action == "stop":
                self._stop_request_ids.append(request.id)
                self.stop("request")

    def _accepted_by_this_session(self, request: runfiles.ControlRequest) -> bool:
        if request.session is not None:
            return request.session == self._session_id
        return request.created >= self._started_wall  # untagged: by its age

    def _discard_request(self, path: Path, request: runfiles.ControlRequest, why: str) -> None:
        """Remove a request this session will not act on, with an event that says so."""
        with contextlib.suppress(OSError):
            path.unlink()
        runfiles.append_event(
            self.directory,
            "request-discarded",
            self._step,
            request_id=request.id,
            action=request.action,
            session=request.session,
            reason=why,
        )
        logger.info("%s request %s discarded: %s", request.action, request.id, why)

    def _discard_unread_requests(self) -> None:
        """At the end: requests still in ``control/`` are answered, never left for later."""
        for path, request in runfiles.pending_requests(self.directory):
            if request.id not in self._seen_requests:
                self._discard_request(path, request, "the run ended before acting on it")

    # -- saving -----------------------------------------------------------

    def _commit_requested(self) -> None:
        """Answer pending save requests outside a regular boundary save."""
        if (
            self._last_save_step == self._step
            and self._pending_save is None
            and self._last_info is not None
        ):
            # Nothing changed since the checkpoint at this step: answer with it.
            self._answer_requests(self._last_info)
            return
        self._commit_checkpoint("request", self._requested_name())

    def _commit_checkpoint(self, reason: str, name: str | None = None) -> CheckpointInfo | None:
        """Checkpoint the tracked state at the current step.

        The one place that writes. With ``async_save`` the loop waits only
        for the snapshot, and ``_collect_save`` finishes the bookkeeping once
        the background write is committed. No duplicate at a step already
        saved (or being saved); pending requests are answered.
        """
        if self._last_save_step == self._step and self._pending_save is not None:
            # The save of this step in flight answers the requests.
            self._inflight_requests += self._save_requests
            self._save_requests = []
            return None
        if self._last_save_step == self._step and self._last_info is not None:
            self._answer_requests(self._last_info)
            return self._last_info
        if self._pending_save is not None:
            busy = self._pending_save
            if self._if_busy == "skip" and not self._exiting_now() and not busy.done():
                logger.info(
                    "skipping the save of step %d: step %d is still being written",
                    self._step,
                    busy.step,
                )
                runfiles.append_event(self.directory, "save-skipped", self._step, busy=busy.step)
                return None
            self._wait_for_busy_save(busy)
        if self._history is not None:
            self._history.flush()  # mirrors hold every step the checkpoint holds
        try:
            result = self._save_replacing_abandoned(reason, name)
        except CheckpointExists as exc:
            self._report_save_failure(exc, self._step)
            if name is None or (reason == "request" and not self._exiting_now()):
                return None
            # The requested name is taken, but this save is due anyway (a stop,
            # the policy): keep the state under no name rather than lose it.
            return self._commit_checkpoint(reason)
        except (SaveFailed, OSError) as exc:
            self._report_save_failure(exc, self._step)
            raise
        self._last_save_step = self._step
        self._last_save_clock = time.monotonic()
        if isinstance(result, PendingSave):
            self._pending_save = result
            # The requests travel with this save; one that arrives while it is
            # written asks for a later checkpoint (and must not re-save this one).
            self._inflight_requests, self._save_requests = self._save_requests, []
            return None
        return self._saved(result, reason)

    def _exiting_now(self) -> bool:
        return self._exit_reason is not None

    def _wait_for_busy_save(self, busy: PendingSave) -> None:
        """Wait for the save in flight before the next one, saying so when it took time."""
        started = time.monotonic()
        was_done = busy.done()
        self._collect_save(wait=True)
        if not was_done:
            waited = time.monotonic() - started
            logger.info("waited %.2f s for the save of step %d to finish", waited, busy.step)
            runfiles.append_event(
                self.directory, "save-waited", self._step, busy=busy.step, seconds=round(waited, 3)
            )

    def _collect_save(self, *, wait: bool = False) -> None:
        """Finish a background save that is done (or, with ``wait``, wait for it).

        Raises its failure here, in the loop, after recording it.
        """
        pending = self._pending_save
        if pending is None or (not wait and not pending.done()):
            return
        self._pending_save = None
        requests, self._inflight_requests = self._inflight_requests, []
        try:
            info = pending.wait()
        except Exception as exc:
            self._report_save_failure(exc, pending.step, requests)
            if self._last_save_step == pending.step:
                self._last_save_step = self._last_info.step if self._last_info else None
            raise
        self._saved(info, pending.reason or "", requests)

    def _saved(
        self,
        info: CheckpointInfo,
        reason: str,
        requests: list[tuple[str | None, str | None]] | None = None,
    ) -> CheckpointInfo:
        self._last_info = info
        assert self._progress is not None
        self._progress.checkpoint_saved(info.step, info.path)
        self._answer_requests(info, new=True, requests=requests)
        logger.debug("checkpoint %s (%s)", info.path, reason)
        self._call("on_save", info)
        return info

    def _report_save_failure(
        self,
        exc: BaseException,
        step: int,
        requests: list[tuple[str | None, str | None]] | None = None,
    ) -> None:
        """A ``save-failed`` event for each request (``requests``, else the pending ones)."""
        logger.error("checkpoint at step %d failed: %s", step, exc)
        if requests is None:
            requests, self._save_requests = self._save_requests, []
        request_ids = [rid for rid, _ in requests] or [None]
        for rid in request_ids:
            runfiles.append_event(
                self.directory, "save-failed", step, error=str(exc), request_id=rid
            )

    def _save_replacing_abandoned(
        self, reason: str, name: str | None
    ) -> CheckpointInfo | PendingSave:
        assert self._store is not None
        store = self._store

        metadata: dict[str, Any] = {"run_id": self._run_id, "session": self._session_index}
        note = self._requested_note()
        if note is not None:
            metadata["note"] = note  # given with a save request (the dashboard's note)
        request_id = next((rid for rid, n in self._save_requests if rid and n == name), None)
        if name is not None and request_id is not None:
            metadata["request_id"] = request_id  # the server caps request-named checkpoints

        def save() -> CheckpointInfo | PendingSave:
            options: dict[str, Any] = {
                "metrics": _plain_metrics(self._latest_metrics),
                "name": name,
                "reason": reason,
                "metadata": metadata,
            }
            if not self._async_save:
                return store.save(self._checkpoint_tree(), self._step, **options)
            pending = store.save_async(self._checkpoint_tree(), self._step, **options)
            assert pending is not None  # nothing is in flight: collected above
            return pending

        try:
            return save()
        except CheckpointExists as exc:
            if name is not None or self._step <= self._session_start_step or exc.path is None:
                raise
            existing = exc.path
        # Resumed from an older checkpoint: the one at this step belongs to the
        # abandoned continuation, and this session's state replaces it. (The
        # store raised this only because it verified: a damaged checkpoint is
        # never replaced, the new one goes beside it.)
        store.wait()
        old = store.delete(existing, force=True)
        logger.info("replacing %s from an abandoned continuation", old.path)
        return save()

    def _answer_requests(
        self,
        info: CheckpointInfo,
        *,
        new: bool = False,
        requests: list[tuple[str | None, str | None]] | None = None,
    ) -> None:
        """A ``saved`` event for each request (``requests``, else the pending ones);
        one plain event for a new checkpoint."""
        if requests is None:
            requests, self._save_requests = self._save_requests, []
        request_ids = [rid for rid, _ in requests if rid is not None]
        answers: list[str | None] = list(request_ids)
        if new and not answers:
            answers = [None]
        for rid in answers:
            runfiles.append_event(
                self.directory,
                "saved",
                info.step,
                path=str(info.path),
                name=info.name,
                reason=info.reason,
                request_id=rid,
            )

    def _checkpoint_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = dict(self.state)
        tree[RUN_KEY] = self._run_state()
        tree[RNG_KEY] = self._rng
        return tree

    def _run_state(self) -> dict[str, Any]:
        return {
            "best": {k: dict(v) for k, v in self._best.items()},
            "stop_policies": [
                policy.state_dict() if hasattr(policy, "state_dict") else None
                for policy in self._stop_policies
            ],
        }

    def _load_run_state(self, saved: Any) -> None:
        if not isinstance(saved, Mapping):
            return
        self._best = {k: dict(v) for k, v in (saved.get("best") or {}).items()}
        self._best_values = {k: v["value"] for k, v in self._best.items()}
        states = list(saved.get("stop_policies") or [])
        for policy, state in zip(self._stop_policies, states, strict=False):
            if state is not None and hasattr(policy, "load_state_dict"):
                policy.load_state_dict(state)

    def _update_best(self, step: int, metrics: Mapping[str, Any]) -> None:
        for name in metrics:
            # Beyond `best` and the policies' metrics, the best of any metric whose
            # name says which way is better (loss, acc...), as the report does.
            if name not in self._watched and name not in self._undirected:
                direction = metric_direction(name)
                if direction is None:
                    self._undirected.add(name)
                else:
                    self._watched[name] = direction
        for name, mode in self._watched.items():
            value = _as_float(metrics.get(name))
            if value is None:
                continue
            current = self._best.get(name)
            if current is None or is_better(value, current["value"], mode):
                self._best[name] = {"value": value, "step": step}
                self._best_values[name] = value

    # -- ending -----------------------------------------------------------

    def _exit_normally(self) -> None:
        if self._in_step:
            # Left the loop with `break`: the step's work is done, count it.
            self._in_step = False
            self._step += 1
        if self._exit_reason is None:
            self._end_boundary(exiting=True)
        if self._save_requests:
            self._commit_requested()
        self._collect_save(wait=True)
        stopped = self._exit_reason not in ("finished", None)
        if stopped:
            _release_accelerator_caches()

    def _exit_on_exception(self, exc: BaseException) -> None:
        try:  # a consistent snapshot already taken may still be committed
            self._collect_save(wait=True)
        except Exception as save_error:
            logger.error("the save in flight failed too: %s", save_error)
        if isinstance(exc, KeyboardInterrupt):
            self._exit_reason = "keyboard:forced"
            logger.warning(
                "stopped at once by a second Ctrl+C at step %d; no checkpoint written", self._step
            )
        elif isinstance(exc, Exception):
            self._exit_reason = "error"
            self._error = f"{type(exc).__name__}: {exc}"
            logger.error("run failed at step %d: %s", self._step, self._error)
        else:
            self._exit_reason = "exit"

    def _status_word(self) -> str:
        if self._exit_reason == "finished":
            return "finished"
        if self._exit_reason == "error":
            return "failed"
        return "stopped"

    def _close(self, exc: BaseException | None) -> None:
        if self._already_finished:
            self._close_finished(exc)
            return
        if self._keyboard is not None:
            self._keyboard.stop()
        self._interrupts.restore()
        status = self._status_word()
        try:
            if self._store is not None:
                self._store.close()  # waits for a save still being written
        except Exception as close_error:
            logger.error("closing the checkpoint store failed: %s", close_error)
        self._stop_heartbeat()
        try:
            self._write_session_end(status)
            self._write_status(status)
            with contextlib.suppress(OSError):  # a full disk must not hide the last event
                self._discard_unread_requests()
            kind = {"finished": "finished", "failed": "failed"}.get(status, "stopped")
            runfiles.append_event(
                self.directory,
                kind,
                self._step,
                reason=self._exit_reason,
                error=self._error,
                request_id=self._stop_request_ids[0] if self._stop_request_ids else None,
            )
        finally:
            self._announce(self._summary_line())
            if self._progress is not None:
                self._progress.close()
            if self._history is not None:
                self._history.close()
            self._write_report()
            if exc is None:
                self._call("on_finish" if status == "finished" else "on_stop")
            elif isinstance(exc, Exception):
                self._call("on_error", exc)
            if self._server is not None:
                with contextlib.suppress(Exception):
                    self._server.close()

    def _close_finished(self, exc: BaseException | None) -> None:
        """Close a run that was finished at its start, writing none of its records."""
        assert self._store is not None and self._history is not None
        try:
            self._store.close()
        finally:
            self._history.close()
            if exc is None:
                self._call("on_finish")
            elif isinstance(exc, Exception):
                self._call("on_error", exc)

    def _summary_line(self) -> str:
        total = f" of {self.total_steps}" if self.total_steps is not None else ""
        parts = [
            f"{self._status_word()} at step {self._step}{total} ({self._exit_reason})",
            f"{self._step - self._session_start_step} steps this session, {self._step} in all",
            f"elapsed {format_duration(time.monotonic() - self._started_clock)}",
        ]
        if self._best_spec is not None and self._best_spec[0] in self._best:
            name = self._best_spec[0]
            best = self._best[name]
            parts.append(f"best {name}={best['value']:.6g} at step {best['step']}")
        if self._last_info is not None:
            parts.append(f"checkpoint {self._last_info.path} (step {self._last_info.step})")
        else:
            parts.append("no checkpoint")
        line = "killsafe: " + "; ".join(parts)
        if self._status_word() != "finished" and self._last_info is not None:
            line += "; run again to resume"
        return line

    def _announce(self, text: str) -> None:
        logger.info(text)
        if self._progress_option and self._progress is not None and not logger.hasHandlers():
            # Nobody configured logging: show it once through the progress display.
            self._progress.message(text)

    def _write_report(self) -> None:
        if not self._report:
            return
        try:  # the report room is optional here
            report = importlib.import_module("killsafe.report")
        except ImportError:
            return
        try:
            report.write_report(self.directory)
        except Exception as exc:  # a report must never turn a good exit into a crash
            logger.warning("report for %s not written: %s", self.directory, exc)

    def _call(self, which: str, *args: Any) -> None:
        callback = self._callbacks.get(which)
        if callback is None:
            return
        try:
            callback(self, *args)
        except Exception:
            logger.exception("%s callback failed; the run goes on", which)

    # -- run.json and status.json -----------------------------------------

    def _write_session_start(self, info: CheckpointInfo | None) -> None:
        session = {
            "pid": os.getpid(),
            "host": runfiles.this_host(),
            "started": self._started_wall,
            "ended": None,
            "start_step": self._step,
            "end_step": None,
            "resumed_from": str(info.path) if info is not None else None,
            "exit_reason": None,
            "status": "running",
            "id": self._session_id,
        }

        def update(data: dict[str, Any]) -> None:
            data.setdefault("run_id", uuid.uuid4().hex[:12])
            data["directory"] = str(self.directory.resolve())
            data["config"] = self._config_record()
            data.setdefault("sessions", []).append(session)
            data["status"] = "running"
            data["exit_reason"] = None
            data.setdefault("restarts", [])
            self._run_id = data["run_id"]
            self._session_index = len(data["sessions"]) - 1

        self._update_run_json(update)
        if info is not None:
            runfiles.append_event(
                self.directory, "resumed", self._step, path=str(info.path), reason=info.reason
            )
            logger.info("resumed from %s at step %d", info.path, info.step)
        else:
            runfiles.append_event(self.directory, "started", self._step)

    def _write_session_end(self, status: str) -> None:
        resources: dict[str, Any] = {}
        if self._progress is not None:
            with contextlib.suppress(Exception):  # figures only; never spoil the exit
                resources = self._progress.resources.sample()

        def update(data: dict[str, Any]) -> None:
            sessions = data.setdefault("sessions", [])
            if 0 <= self._session_index < len(sessions):
                session = sessions[self._session_index]
                session.update(
                    ended=time.time(),
                    end_step=self._step,
                    exit_reason=self._exit_reason,
                    status=status,
                    peak_rss_bytes=resources.get("peak_rss_bytes"),
                    cpu_seconds=resources.get("cpu_seconds"),
                )
                if self._error is not None:
                    session["error"] = self._error
            data["status"] = status
            data["exit_reason"] = self._exit_reason
            if self._error is not None:
                data["error"] = self._error

        self._update_run_json(update)

    def _update_run_json(self, update: Callable[[dict[str, Any]], None]) -> None:
        path = self.directory / runfiles.RUN_FILE
        # Re-read every time: `killsafe run` appends restarts to the same file.
        try:
            data = runfiles.read_json(path) or {}
        except Exception:
            data = {}
        update(data)
        runfiles.write_json_atomic(path, data)

    def _config_record(self) -> dict[str, Any]:
        return {
            "total_steps": self.total_steps,
            "save": repr(self._save_policy),
            "stop": [repr(p) for p in self._stop_policies],
            "keep_last": self._keep_last,
            "keep_best": self._keep_best,
            "best": list(self._best_spec) if self._best_spec else None,
            "resume": str(self._resume),
            "signals": [s.name for s in self._interrupts.signals],
            "user": self._user_config,
        }

    def _write_status(self, state: str, *, heartbeat: bool = False) -> None:
        with self._status_lock:
            if heartbeat and self._heartbeat_stop.is_set():
                return  # the run is closing: its final status must stay the last
            self._write_status_locked(state)

    def _write_status_locked(self, state: str) -> None:
        assert self._progress is not None
        self._status_written = time.monotonic()
        snapshot = self._progress.snapshot()
        snapshot.update(
            pid=os.getpid(),
            host=runfiles.this_host(),
            updated=time.time(),
            state=state,
            step=self._step,
            run_id=self._run_id,
            session=self._session_id,
            exit_reason=self._exit_reason,
            control=state in ("running", "stopping"),
        )
        try:
            runfiles.write_json_atomic(self.directory / runfiles.STATUS_FILE, snapshot)
        except OSError as exc:
            logger.warning("status.json not written: %s", exc)

    # -- helpers ----------------------------------------------------------

    def _require_open(self, what: str) -> None:
        if not self._entered or self._exited:
            raise ConfigError(
                f"run.{what}() needs an open run: use it inside `with Run(...) as run:`"
            )

    def _store_dir(self) -> Path:
        return self.directory / CHECKPOINTS_DIR


def _build_save_policy(
    save: SavePolicy | None,
    every_steps: int | None,
    every_seconds: float | str | None,
    on_exit: bool,
) -> AnyOf:
    # The first reason given wins: the exit's, then the regular policies', then a request's.
    policies: list[SavePolicy] = [OnExit()] if on_exit else []
    if every_steps is not None:
        policies.append(EveryNSteps(every_steps))
    if every_seconds is not None:
        policies.append(EveryNSeconds(parse_duration(every_seconds)))
    if save is not None:
        if not isinstance(save, SavePolicy):
            raise ConfigError(f"save={save!r}: pass a save policy such as policy.EveryNSteps(500)")
        policies.append(save)
    policies.append(OnRequest())
    return AnyOf(*policies)


def _build_stop_policies(
    stop_policy: StopPolicy | list[StopPolicy] | tuple[StopPolicy, ...] | None,
    stop_after: float | str | None,
) -> list[StopPolicy]:
    if stop_policy is None:
        policies: list[StopPolicy] = []
    elif isinstance(stop_policy, (list, tuple)):
        policies = list(stop_policy)
    else:
        policies = [stop_policy]
    for policy in policies:
        if not isinstance(policy, StopPolicy):
            raise ConfigError(
                f"stop_policy={policy!r}: pass a stop policy such as policy.EarlyStopping(...)"
            )
    if stop_after is not None:
        policies.append(TimeLimit(parse_duration(stop_after)))
    return policies


def _checked_serve(serve: Any) -> bool | int | None:
    """``serve=``: ``None``/``False`` (no dashboard), ``True`` (a free port) or a port."""
    if serve is None or isinstance(serve, bool):
        return serve
    if isinstance(serve, int) and 0 <= serve <= 65535:
        return serve
    raise ConfigError(
        f"serve={serve!r}: use True (a free port), a port number from 0 to 65535, "
        "or None for no dashboard"
    )


def _best_spec(best: tuple[str, str] | str | None) -> tuple[str, str] | None:
    if best is None:
        return None
    if isinstance(best, str):
        return (best, "min")
    if (
        isinstance(best, (tuple, list))
        and len(best) == 2
        and isinstance(best[0], str)
        and best[1] in ("min", "max")
    ):
        return (best[0], best[1])
    raise ConfigError(f"best={best!r}: use ('metric', 'min') or ('metric', 'max')")


def _watched_metrics(policy: AnyOf, best: tuple[str, str] | None) -> dict[str, str]:
    watched: dict[str, str] = {}
    if best is not None:
        watched[best[0]] = best[1]
    for item in policy.policies:
        if isinstance(item, OnImprovement):
            watched.setdefault(item.metric, item.mode)
    return watched


def _check_shapes(
    targets: Mapping[str, Any], saved: Mapping[str, Any], info: CheckpointInfo | None
) -> None:
    """Raise ``StateMismatch`` listing the keys and shapes that differ, module by module.

    Only flat name -> tensor mappings (a module's ``state_dict()``) are
    compared; a framework's own message names one mismatch in a traceback.
    """
    problems: list[str] = []
    for name, target in targets.items():
        if not hasattr(target, "state_dict") or not isinstance(saved[name], Mapping):
            continue
        current = target.state_dict()
        if not (_tensor_table(current) and _tensor_table(saved[name])):
            continue
        problems.extend(_table_differences(name, current, saved[name]))
    if problems:
        shown = "; ".join(problems[:12])
        more = f"; and {len(problems) - 12} more" if len(problems) > 12 else ""
        where = info.path if info is not None else "the checkpoint"
        raise StateMismatch(
            f"{where} does not fit: {shown}{more}; build the objects as the run that saved "
            "it did, or start fresh with resume='never'"
        )


def _tensor_table(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and hasattr(v, "shape") for k, v in value.items())
    )


def _table_differences(
    name: str, current: Mapping[str, Any], saved: Mapping[str, Any]
) -> list[str]:
    problems = [f"{name}.{k} missing from the checkpoint" for k in current if k not in saved]
    problems += [f"{name}.{k} unexpected in the checkpoint" for k in saved if k not in current]
    for key, value in current.items():
        if key in saved and tuple(value.shape) != tuple(saved[key].shape):
            problems.append(
                f"{name}.{key} shape {tuple(saved[key].shape)} in the checkpoint, "
                f"{tuple(value.shape)} now"
            )
    return problems


def _restore_in_place(original: Any, value: Any) -> Any:
    """Put a restored plain value into the user's own dict, list, array or tensor."""
    if original is value:
        return value
    if _same_shape_array(original, value):
        if hasattr(original, "copy_"):  # a torch tensor
            original.copy_(value)
        else:  # a numpy array
            original[...] = value
        return original
    if isinstance(original, dict) and isinstance(value, Mapping) and original is not value:
        original.clear()
        original.update(value)
        return original
    if isinstance(original, list) and isinstance(value, (list, tuple)) and original is not value:
        original[:] = value
        return original
    return value


def _same_shape_array(original: Any, value: Any) -> bool:
    shape = getattr(original, "shape", None)
    return (
        shape is not None
        and type(original) is type(value)
        and getattr(value, "shape", None) == shape
        and getattr(value, "dtype", None) == getattr(original, "dtype", None)
        and hasattr(original, "__setitem__")
    )


def _as_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    return float(value) if isinstance(value, (int, float)) else None


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    plain: dict[str, Any] = {}
    for name, value in metrics.items():
        number = _as_float(value)
        if number is not None:
            plain[name] = int(value) if isinstance(value, int) else number
        elif isinstance(value, str):
            plain[name] = value
    return plain


def _describe(info: CheckpointInfo) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.created))
    metrics = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in list(info.metrics.items())[:4]
    )
    text = f"step {info.step}, {when}, reason {info.reason}"
    return text + (f", {metrics}" if metrics else "")


def _release_accelerator_caches() -> None:
    if "torch" not in sys.modules:
        return
    try:
        from killsafe.integrations.torch import release_caches

        release_caches()
    except Exception as exc:  # a driver hiccup must not spoil a graceful exit
        logger.debug("accelerator caches not released: %s", exc)
