"""How a run is doing: counters, rate, ETA, resources, and how they are shown.

``Progress`` keeps the figures (step and total, smoothed rate, elapsed, ETA,
phase, user counters, latest and best metrics, checkpoint age, CPU, memory,
GPU memory) and hands them to a ``Renderer``:

- on a terminal, ``RichRenderer`` draws a live display that the user's own
  prints and logging cannot garble (they are routed above it);
- off a terminal (nohup, SLURM, CI, a pipe), ``PlainRenderer`` writes one
  greppable line every ``every`` seconds::

    progress step=1200/10000 12.0% rate=35.2/s elapsed=34s eta=4m10s phase=training
    loss=0.4123 best_val_loss=0.3901@1100 ckpt_age=12s cpu=98% rss=1.2GiB

  (one line in the output; wrapped here).

``Progress.update(step)`` is called on every step of a loop, so it only stores
the step and compares a monotonic clock reading with the next sampling time;
the rate, resources and rendering happen at most once a ``sample_interval``.
``snapshot()`` gives the progress fields of ``status.json``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol, runtime_checkable

from killsafe.errors import ConfigError
from killsafe.units import format_size

__all__ = [
    "PlainRenderer",
    "Progress",
    "Renderer",
    "ResourceMonitor",
    "RichRenderer",
    "format_duration",
    "format_line",
    "format_number",
    "format_rate",
    "format_size",
    "metric_direction",
]

Snapshot = dict[str, Any]


@runtime_checkable
class Renderer(Protocol):
    """Shows progress somewhere. ``Progress`` calls these from the loop's thread.

    ``interval`` is the number of seconds between two ``render`` calls driven by
    ``Progress.update`` (a live display may redraw more often on its own).
    """

    interval: float

    def start(self, snapshot: Callable[[], Snapshot]) -> None:
        """Begin showing; ``snapshot()`` returns fresh figures at any time."""

    def render(self, snapshot: Snapshot) -> None:
        """Show these figures now."""

    def message(self, text: str) -> None:
        """Show one line of text without garbling the display."""

    def close(self, snapshot: Snapshot) -> None:
        """Show the final figures and stop; called once."""


class Progress:
    """The figures of a running loop and their display.

    Args:
        total: the number of steps the run will reach, or ``None`` (no percent, no ETA).
        start_step: the step the session starts at (the restored step when resuming).
        every: seconds between two plain lines off a terminal (default 30).
        enabled: ``False`` shows nothing; the figures and ``snapshot()`` still work.
        stream: where to draw (default ``sys.stderr``); a live display is used when
            it is a terminal, plain lines otherwise.
        renderer: a ``Renderer`` to use instead of choosing one from ``stream``.
        clock: a monotonic clock in seconds (tests inject a fake one).
        wall: the wall clock in epoch seconds (for checkpoint times).
        sample_interval: seconds between two rate samples.
        rate_window: time constant, in seconds, of the exponential moving
            average that smooths the rate.

    Not thread-safe for writers: one loop thread calls ``update``, ``log`` and the
    others; a live display may read the figures from its refresh thread.

    Example::

        progress = Progress(total=100, stream=io.StringIO(), every=0)
        progress.start()
        for step in range(1, 101):
            progress.update(step)
        progress.close()
    """

    def __init__(
        self,
        *,
        total: int | None = None,
        start_step: int = 0,
        every: float = 30.0,
        enabled: bool = True,
        stream: IO[str] | None = None,
        renderer: Renderer | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sample_interval: float = 1.0,
        rate_window: float = 20.0,
    ) -> None:
        if every < 0 or sample_interval < 0 or rate_window <= 0:
            raise ConfigError(
                f"progress every={every}, sample_interval={sample_interval}, "
                f"rate_window={rate_window}: use every >= 0, sample_interval >= 0, rate_window > 0"
            )
        self.total = total
        self.start_step = start_step
        self.enabled = enabled
        self._clock = clock
        self._wall = wall
        self._sample_interval = min(sample_interval, every) if every > 0 else sample_interval
        self._rate_window = rate_window
        self._step = start_step
        self._phase: str | None = None
        self._counters: dict[str, dict[str, Any]] = {}
        self._metrics: dict[str, Any] = {}
        self._best: dict[str, dict[str, Any]] = {}
        self._last_checkpoint: dict[str, Any] | None = None
        self._checkpoint_clock: float | None = None
        self._rate: float | None = None
        self._started: float | None = None
        self._sample_time = 0.0
        self._sample_step = start_step
        self._next_sample = -math.inf
        self._next_render = math.inf
        self._closed = False
        self.resources = ResourceMonitor()
        self._renderer: Renderer | None = None
        if enabled:
            self._renderer = renderer or _default_renderer(stream, every)

    # -- the loop's calls -------------------------------------------------

    def start(self) -> None:
        """Start the clock and the display. Called once; ``update`` calls it if needed."""
        if self._started is not None:
            return
        now = self._clock()
        self._started = now
        self._sample_time = now
        self._next_sample = now + self._sample_interval
        self.resources.sample()
        if self._renderer is not None:
            self._next_render = now + self._renderer.interval
            self._renderer.start(self.snapshot)

    def update(self, step: int) -> None:
        """Record that ``step`` steps are done. Cheap: no I/O unless a sample is due."""
        self._step = step
        if self._clock() >= self._next_sample:
            self._sample()

    def log(
        self, step: int, metrics: Mapping[str, Any], best: Mapping[str, Any] | None = None
    ) -> None:
        """Record the latest ``metrics`` logged at ``step``.

        ``best`` maps a metric name to its best value so far, either a number
        (reached at ``step``) or ``{"value": v, "step": s}``.
        """
        self._step = max(self._step, step)
        self._metrics.update({name: _plain(value) for name, value in metrics.items()})
        for name, value in (best or {}).items():
            if isinstance(value, Mapping):
                self._best[name] = {
                    "value": _plain(value.get("value")),
                    "step": value.get("step", step),
                }
            else:
                self._best[name] = {"value": _plain(value), "step": step}

    def set_phase(self, name: str | None) -> None:
        """Name what the loop is doing now ("self-play", "training", "evaluation")."""
        self._phase = name

    def count(self, name: str, value: float, total: float | None = None) -> None:
        """Set the user counter ``name`` to its current ``value`` (not an increment).

        ``total`` is the value it will reach, when known; it is kept until changed.
        A counter may start again from zero (evaluations in this generation); its
        rate (per second, since its first ``count`` in this session) counts the
        progress made across such restarts.
        """
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = {
                "value": value,
                "total": total,
                "done": 0.0,
                "since": self._clock(),
            }
        else:
            # The rate counts progress made: a counter that starts again from zero
            # (evaluations in this generation) adds its new value, not a drop.
            counter["done"] += value - counter["value"] if value >= counter["value"] else value
        counter["value"] = value
        if total is not None:
            counter["total"] = total

    def checkpoint_saved(self, step: int, path: str | os.PathLike[str]) -> None:
        """Record a committed checkpoint (its age is shown as ``ckpt_age``)."""
        self._checkpoint_clock = self._clock()
        self._last_checkpoint = {"step": step, "path": str(path), "time": self._wall()}

    def message(self, text: str) -> None:
        """Show one line of text (above a live display, or as a plain line)."""
        if self._renderer is not None:
            self._renderer.message(text)

    def close(self) -> None:
        """Show the final figures and stop the display. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._started is None:
            self.start()
        self._update_rate(self._clock())
        if self._renderer is not None:
            self._renderer.close(self.snapshot())

    # -- the figures ------------------------------------------------------

    @property
    def step(self) -> int:
        return self._step

    @property
    def rate(self) -> float | None:
        """Smoothed steps per second, or ``None`` before the first sample."""
        return self._rate

    def snapshot(self) -> Snapshot:
        """The progress fields of ``status.json`` (see docs/architecture.md)."""
        now = self._clock()
        started = self._started if self._started is not None else now
        elapsed = max(0.0, now - started)
        total = self.total
        percent = None
        eta = None
        if total:
            percent = min(100.0, 100.0 * self._step / total)
            remaining = max(0, total - self._step)
            if remaining == 0:
                eta = 0.0
            elif self._rate:
                eta = remaining / self._rate
        checkpoint = None
        if self._last_checkpoint is not None:
            checkpoint = dict(self._last_checkpoint)
            assert self._checkpoint_clock is not None
            checkpoint["age"] = max(0.0, now - self._checkpoint_clock)
        return {
            "step": self._step,
            "start_step": self.start_step,
            "total_steps": total,
            "percent": percent,
            "phase": self._phase,
            "rate": self._rate,
            "elapsed": elapsed,
            "eta": eta,
            # dict() copies are atomic under the GIL: a live display's refresh
            # thread may call this while the loop adds a metric or a counter.
            "metrics": dict(self._metrics),
            "best": {name: dict(b) for name, b in dict(self._best).items()},
            "counters": {n: self._counter_view(c, now) for n, c in dict(self._counters).items()},
            "last_checkpoint": checkpoint,
            "resources": self.resources.sample(),
        }

    def _counter_view(self, counter: dict[str, Any], now: float) -> dict[str, Any]:
        since = now - counter["since"]
        rate = counter["done"] / since if since > 0 else None
        return {"value": counter["value"], "total": counter["total"], "rate": rate}

    def _sample(self) -> None:
        if self._started is None:
            self.start()
        now = self._clock()
        self._update_rate(now)
        self._next_sample = _next_tick(self._next_sample, self._sample_interval, now)
        if self._renderer is not None and now >= self._next_render:
            self._next_render = _next_tick(self._next_render, self._renderer.interval, now)
            self._renderer.render(self.snapshot())

    def _update_rate(self, now: float) -> None:
        dt = now - self._sample_time
        if dt <= 0:
            return
        instant = (self._step - self._sample_step) / dt
        if self._rate is None:
            self._rate = instant
        else:
            alpha = 1.0 - math.exp(-dt / self._rate_window)
            self._rate += alpha * (instant - self._rate)
        self._sample_time = now
        self._sample_step = self._step


def _plain(value: Any) -> Any:
    """numpy and torch scalars as Python numbers, so lines and JSON read the same."""
    if isinstance(value, (str, bytes, int, float)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError, TypeError):  # not a one-element array
            return value
    return value


def _next_tick(due: float, interval: float, now: float) -> float:
    """The next due time on a fixed cadence, so that late samples do not drift it."""
    due += interval
    return due if due > now else now + interval


class ResourceMonitor:
    """CPU utilisation, resident and peak memory of this process, and GPU memory.

    Samples are cached for ``max_age`` seconds of real time so that several
    readers (the display, ``status.json``) cost one set of system calls. The CPU
    figure is the process's CPU time over the wall time since the previous
    reading (at least ``cpu_window`` seconds apart; 100% is one busy core). GPU
    memory is read only when torch is already imported and has initialised CUDA.
    Thread-safe.
    """

    def __init__(self, *, max_age: float = 1.0, cpu_window: float = 0.5) -> None:
        self._max_age = max_age
        self._cpu_window = cpu_window
        self._process: Any = None
        self._cached: dict[str, Any] | None = None
        self._cached_at = -math.inf
        self._cpu_base: tuple[float, float] | None = None
        self._cpu_percent: float | None = None
        self._lock = threading.Lock()

    def sample(self) -> dict[str, Any]:
        """``{"cpu_percent", "rss_bytes", "peak_rss_bytes", "cpu_seconds", "gpu_memory_bytes"}``."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached_at >= self._max_age:
                self._cached = self._read(now)
                self._cached_at = now
            return dict(self._cached)

    def _read(self, now: float) -> dict[str, Any]:
        import psutil

        if self._process is None:
            self._process = psutil.Process()
        process = self._process
        with process.oneshot():
            rss = process.memory_info().rss
            times = process.cpu_times()
            cpu_seconds = times.user + times.system
            if self._cpu_base is None:
                # Until a second reading, the average since the process started.
                lifetime = time.time() - process.create_time()
                if lifetime > 0:
                    self._cpu_percent = 100.0 * cpu_seconds / lifetime
                self._cpu_base = (now, cpu_seconds)
        base_time, base_cpu = self._cpu_base
        if now > base_time and now - base_time >= self._cpu_window:
            self._cpu_percent = 100.0 * (cpu_seconds - base_cpu) / (now - base_time)
            self._cpu_base = (now, cpu_seconds)
        return {
            "cpu_percent": self._cpu_percent,
            "rss_bytes": rss,
            "peak_rss_bytes": max(rss, _peak_rss()),
            "cpu_seconds": cpu_seconds,
            "gpu_memory_bytes": _gpu_memory(),
        }


def _peak_rss() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _gpu_memory() -> int | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        if not (cuda.is_available() and cuda.is_initialized()):
            return None
        return int(sum(cuda.memory_reserved(i) for i in range(cuda.device_count())))
    except Exception:  # a broken driver must not break progress reporting
        return None


# -- metric names -------------------------------------------------------------

_MIN_WORDS = ("loss", "error", "err", "perplexity", "ppl", "mse", "mae", "rmse", "regret", "cost")
_MAX_WORDS = (
    "acc",
    "accuracy",
    "reward",
    "return",
    "score",
    "win",
    "f1",
    "auc",
    "precision",
    "recall",
    "sharpe",
    "profit",
    "elo",
)


def metric_direction(name: str) -> str | None:
    """``"min"``, ``"max"`` or ``None``: which way a metric improves, by its name.

    A word of the name (split at ``_`` and ``-``) decides: ``loss``, ``error``,
    ``mse``... are minimised; ``acc``, ``reward``, ``score``, ``win``... maximised.
    """
    words = name.lower().replace("-", "_").split("_")
    if any(w in _MIN_WORDS for w in words):
        return "min"
    if any(w in _MAX_WORDS for w in words):
        return "max"
    return None


# -- formatting -------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``34s``, ``4m10s``, ``2h05m``, ``3d04h``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size_token(nbytes: float | None) -> str:
    """``format_size`` without its space, a token of the one-line progress."""
    return format_size(nbytes).replace(" ", "")


def format_number(value: Any) -> str:
    """A metric value as a short token without spaces."""
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        # Four significant digits: 0.08333, 0.001234, 12.35; plain tenths from 1000.
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return "_".join(str(value).split()) or '""'


def format_rate(rate: float | None) -> str:
    """``35.2/s``, ``0.25/s``; ``?`` when unknown."""
    if rate is None:
        return "?"
    if rate >= 100:
        return f"{rate:.0f}/s"
    if rate >= 1:
        return f"{rate:.1f}/s"
    if rate > 0:
        return f"{rate:.3g}/s"
    return "0/s"


def format_line(snapshot: Snapshot) -> str:
    """One greppable line: ``progress step=1200/10000 12.0% rate=35.2/s ...``."""
    return " ".join(["progress", *_head_tokens(snapshot), *_detail_tokens(snapshot)])


def _head_tokens(snapshot: Snapshot) -> list[str]:
    total = snapshot.get("total_steps")
    step = snapshot.get("step")
    if total:
        tokens = [f"step={step}/{total}", f"{snapshot.get('percent') or 0.0:.1f}%"]
    else:
        tokens = [f"step={step}"]
    tokens.append(f"rate={format_rate(snapshot.get('rate'))}")
    tokens.append(f"elapsed={format_duration(snapshot.get('elapsed'))}")
    if total:
        tokens.append(f"eta={format_duration(snapshot.get('eta'))}")
    return tokens


def _detail_tokens(snapshot: Snapshot) -> list[str]:
    return [token for group in _detail_groups(snapshot) for token in group]


def _detail_groups(snapshot: Snapshot) -> list[list[str]]:
    """Tokens in groups: phase and counters; metrics; best; checkpoint and resources."""
    doing = []
    if snapshot.get("phase"):
        doing.append(f"phase={format_number(snapshot['phase'])}")
    for name, counter in (snapshot.get("counters") or {}).items():
        value = format_number(counter.get("value"))
        if counter.get("total") is not None:
            value += f"/{format_number(counter['total'])}"
        doing.append(f"{_token(name)}={value}")
    metrics = [
        f"{_token(name)}={format_number(value)}"
        for name, value in (snapshot.get("metrics") or {}).items()
    ]
    best = [
        f"best_{_token(name)}={format_number(b.get('value'))}@{b.get('step')}"
        for name, b in (snapshot.get("best") or {}).items()
    ]
    machine = []
    checkpoint = snapshot.get("last_checkpoint")
    if checkpoint is not None:
        machine.append(f"ckpt_age={format_duration(checkpoint.get('age'))}")
    resources = snapshot.get("resources") or {}
    if resources.get("cpu_percent") is not None:
        machine.append(f"cpu={resources['cpu_percent']:.0f}%")
    if resources.get("rss_bytes") is not None:
        machine.append(f"rss={_size_token(resources['rss_bytes'])}")
    if resources.get("gpu_memory_bytes") is not None:
        machine.append(f"gpu_mem={_size_token(resources['gpu_memory_bytes'])}")
    return [group for group in (doing, metrics, best, machine) if group]


def _token(name: str) -> str:
    return "_".join(str(name).split())


# -- renderers --------------------------------------------------------------


class PlainRenderer:
    """One line every ``interval`` seconds, for logs that are not a terminal.

    While steps go by, ``Progress.update`` asks for the lines. Inside one long
    step (an evaluation) the loop is silent, so a daemon thread writes the line
    instead when no line came for ``interval`` seconds and the loop's own
    sampling delay (up to a second): the phase and counters set inside the step
    still reach the log. ``watch=False`` leaves the thread out.
    """

    def __init__(
        self, stream: IO[str] | None = None, interval: float = 30.0, *, watch: bool = True
    ) -> None:
        self.stream = stream
        self.interval = interval
        self._watch = watch
        self._lock = threading.Lock()
        self._last_line = time.monotonic()
        self._last_watch_line = -math.inf
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, text: str, *, line: bool = False) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        with self._lock:
            if line:
                self._last_line = time.monotonic()
            try:
                stream.write(text + "\n")
                stream.flush()
            except (OSError, ValueError):  # a closed pipe must not kill the run
                pass

    def start(self, snapshot: Callable[[], Snapshot]) -> None:
        self._last_line = time.monotonic()
        if self._watch and self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(
                target=self._watch_long_steps,
                args=(snapshot,),
                name="killsafe-progress",
                daemon=True,
            )
            self._thread.start()

    def _watch_long_steps(self, snapshot: Callable[[], Snapshot]) -> None:
        # The loop samples at most once a second, so its line may be that late.
        silence = self.interval + min(self.interval, 1.0) + 0.25
        while True:
            due = self._last_line + silence - time.monotonic()
            if self._stopped.wait(max(due, 0.01)):
                return
            if time.monotonic() - self._last_line >= silence:
                try:
                    self._write(format_line(snapshot()), line=True)
                except Exception:  # a figure that fails to read must not end the watch
                    logging.getLogger(__name__).debug("progress line failed", exc_info=True)
                self._last_line = self._last_watch_line = time.monotonic()

    def render(self, snapshot: Snapshot) -> None:
        if time.monotonic() - self._last_watch_line < self.interval / 2:
            return  # the long step that just ended had its line already
        self._write(format_line(snapshot), line=True)

    def message(self, text: str) -> None:
        self._write(text)

    def close(self, snapshot: Snapshot) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._write(format_line(snapshot), line=True)


class RichRenderer:
    """A live display on a terminal (rich).

    While it runs, ``sys.stdout``/``sys.stderr`` and the stream handlers of the
    ``logging`` module that write to them are routed above the display, so the
    user's prints and log records never garble it. Everything is restored at
    ``close``.
    """

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        console: Any = None,
        refresh_per_second: float = 4.0,
    ) -> None:
        self.interval = 1.0 / refresh_per_second
        self._stream = stream
        self._console = console
        self._refresh_per_second = refresh_per_second
        self._live: Any = None
        self._snapshot: Callable[[], Snapshot] | None = None
        self._rerouted: list[tuple[logging.StreamHandler[Any], Any]] = []

    def start(self, snapshot: Callable[[], Snapshot]) -> None:
        from rich.live import Live

        self._make_console()
        self._snapshot = snapshot
        originals = (sys.stdout, sys.stderr)
        self._live = Live(
            console=self._console,
            refresh_per_second=self._refresh_per_second,
            get_renderable=self._renderable,
            redirect_stdout=True,
            redirect_stderr=True,
            transient=False,
        )
        self._live.start()
        self._reroute_logging(originals)

    def _renderable(self) -> Any:
        assert self._snapshot is not None
        return build_rich_display(self._snapshot())

    def render(self, snapshot: Snapshot) -> None:
        if self._live is not None:
            self._live.refresh()

    def message(self, text: str) -> None:
        # Before start (a line said while the run opens) it is printed as is.
        # soft_wrap: one long line stays one line (the terminal wraps it), so
        # it can be copied or grepped whole; it is printed above the display.
        self._make_console().print(text, markup=False, highlight=False, soft_wrap=True)

    def _make_console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self._stream if self._stream is not None else sys.stderr)
        return self._console

    def close(self, snapshot: Snapshot) -> None:
        if self._live is None:
            return
        self._live.update(build_rich_display(snapshot), refresh=True)
        self._restore_logging()
        self._live.stop()
        self._live = None

    def _reroute_logging(self, originals: tuple[Any, Any]) -> None:
        # Handlers made by logging.basicConfig() hold the real sys.stderr, not the
        # proxy Live installed; point them at the proxy while the display runs.
        proxies = {id(originals[0]): sys.stdout, id(originals[1]): sys.stderr}
        loggers: list[Any] = [logging.getLogger()]
        known = logging.Logger.manager.loggerDict.values()
        loggers += [lg for lg in known if isinstance(lg, logging.Logger)]
        for logger in loggers:
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler and id(handler.stream) in proxies:
                    proxy = proxies[id(handler.stream)]
                    if proxy is not handler.stream:
                        self._rerouted.append((handler, handler.setStream(proxy)))

    def _restore_logging(self) -> None:
        for handler, stream in reversed(self._rerouted):
            handler.setStream(stream)
        self._rerouted.clear()


def build_rich_display(snapshot: Snapshot) -> Any:
    """The renderable of the live display: a bar, then one line for each group of
    figures (phase and counters; metrics; best values; checkpoint age and resources).
    """
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    total = snapshot.get("total_steps")
    step = snapshot.get("step") or 0
    head = Table.grid(padding=(0, 1))
    head.add_row(
        ProgressBar(total=float(total) if total else None, completed=float(step), width=40),
        Text(f"{step}/{total}" if total else f"{step}", style="bold"),
        Text(f"{snapshot.get('percent') or 0.0:.1f}%" if total else ""),
        Text(f"{format_rate(snapshot.get('rate'))}"),
        Text(f"elapsed {format_duration(snapshot.get('elapsed'))}"),
        Text(f"eta {format_duration(snapshot.get('eta'))}" if total else ""),
    )
    lines: list[Any] = [head]
    for group in _detail_groups(snapshot):
        lines.append(Text("  " + " ".join(group), style="dim"))
    return Group(*lines)


def _is_terminal(stream: IO[str]) -> bool:
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _default_renderer(stream: IO[str] | None, every: float) -> Renderer:
    target = stream if stream is not None else sys.stderr
    if _is_terminal(target):
        return RichRenderer(stream)
    return PlainRenderer(stream, interval=every)
