"""Stop requests from outside the loop: signals, and ``q`` + Enter on a terminal.

The handlers only record that a stop was asked for; the loop sees it at its
next step boundary, finishes the step and commits a checkpoint there. Saving
inside a signal handler would write whatever half-updated state the
interrupted line left behind.

- SIGINT (Ctrl+C) asks for a stop with reason ``keyboard``; a second SIGINT
  while that stop is pending raises ``KeyboardInterrupt`` at once, the way
  Python's default handler does, so a stuck step can still be left.
- SIGTERM and the preemption signals you list (SLURM's ``--signal``, for
  example SIGUSR1) ask for a stop with reason ``signal:SIGTERM`` and so on.
- Handlers are installed only from the main thread, call the Python handler
  that was installed before them (chaining), and are put back on ``restore()``.
- ``KeyboardMonitor`` reads lines from an interactive stdin in a thread and
  asks for a stop on ``q``. It never reads a stdin that is not a terminal or
  belongs to a background job, leaves the terminal's settings as it found
  them, and its thread ends with ``stop()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from killsafe.errors import ConfigError

__all__ = ["KeyboardMonitor", "StopRequests", "parse_signal", "signal_reason", "stdin_is_terminal"]

logger = logging.getLogger("killsafe")

_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}

Handler = Callable[[int, FrameType | None], Any] | int | None


def parse_signal(value: str | int | signal.Signals) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"``, ``10`` or ``signal.SIGUSR1`` as a ``signal.Signals``."""
    if isinstance(value, signal.Signals):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value)
        except ValueError:
            raise ConfigError(f"signal number {value} does not exist on this system") from None
    name = str(value).strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ConfigError(
            f"unknown signal {value!r}; use a name such as SIGUSR1 or SIGTERM"
        ) from None


def signal_reason(signum: int) -> str:
    """The stop reason a signal gives: ``keyboard`` for SIGINT, else ``signal:NAME``."""
    sig = signal.Signals(signum)
    return "keyboard" if sig == signal.SIGINT else f"signal:{sig.name}"


class StopRequests:
    """Collects stop requests; installs the signal handlers that feed it.

    ``reason`` is the first reason asked for (``None`` until then) and is
    safe to read from any thread. ``request(reason)`` may be called from any
    thread (the keyboard monitor does).
    """

    def __init__(self, signals: Iterable[str | int | signal.Signals] = ()) -> None:
        if isinstance(signals, (str, int)):
            signals = (signals,)
        extra = [parse_signal(s) for s in signals]
        for sig in extra:
            if sig in _UNCATCHABLE:
                raise ConfigError(
                    f"signals: {sig.name} cannot be caught by any process, so it cannot ask "
                    "for a graceful stop; use a catchable one such as SIGUSR1 or SIGTERM"
                )
        wanted = [signal.SIGINT, signal.SIGTERM, *extra]
        self.signals: tuple[signal.Signals, ...] = tuple(dict.fromkeys(wanted))
        self.reason: str | None = None
        self.count = 0
        self._previous: dict[signal.Signals, Handler] = {}
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> bool:
        """Record a stop request; returns ``True`` if it is the first one."""
        with self._lock:
            self.count += 1
            if self.reason is None:
                self.reason = reason
                return True
            return False

    def install(self) -> bool:
        """Install the handlers; returns ``False`` (and installs none) off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not on the main thread: signals will not stop the run")
            return False
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError) as exc:  # a signal this platform refuses
                logger.debug("cannot handle %s: %s", sig.name, exc)
        return True

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``. Safe to call twice."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        reason = signal_reason(signum)
        # A second Ctrl+C while the first is pending: leave now, like Python's default.
        force = signum == signal.SIGINT and self.reason == "keyboard"
        self.request(reason)
        self._chain(signum, frame)
        if force:
            raise KeyboardInterrupt

    def _chain(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signal.Signals(signum))
        # Python's own SIGINT handler raises KeyboardInterrupt and SIG_DFL ends
        # the process: chaining those would defeat the graceful stop.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)


class KeyboardMonitor:
    """Asks for a stop with reason ``keyboard`` when ``q`` + Enter is typed on the terminal.

    ``start()`` does nothing unless ``stream`` (default ``sys.stdin``) is an
    interactive terminal. Lines other than ``q`` are ignored. ``stop()`` ends the
    thread (it waits on the terminal and a wake-up pipe, never blocking in
    ``read``) and restores the terminal settings it found.
    """

    def __init__(
        self, on_quit: Callable[[], Any], stream: Any = None, *, poll: float = 0.5
    ) -> None:
        self._on_quit = on_quit
        self._stream = stream
        self._poll = poll
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self._fd: int | None = None
        self._saved_tty: Any = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> bool:
        """Start watching; returns whether it did (only on an interactive terminal)."""
        fd = _terminal_fd(self._stream if self._stream is not None else sys.stdin)
        if fd is None or self._thread is not None:
            return False
        self._fd = fd
        self._saved_tty = _get_tty_settings(fd)
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="killsafe-keyboard", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """End the thread and restore the terminal settings. Safe to call twice."""
        thread, self._thread = self._thread, None
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")
        if thread is not None:
            thread.join(timeout=5.0)
        if self._wake is not None:
            for end in self._wake:
                with contextlib.suppress(OSError):
                    os.close(end)
            self._wake = None
        if self._fd is not None and self._saved_tty is not None:
            _set_tty_settings(self._fd, self._saved_tty)
        self._fd = None

    def _watch(self) -> None:
        import select

        assert self._wake is not None and self._fd is not None
        fd, wake = self._fd, self._wake[0]
        pending = b""
        while True:
            try:
                ready, _, _ = select.select([fd, wake], [], [], self._poll)
            except (OSError, ValueError):
                return
            if wake in ready:
                return
            if fd not in ready or not _in_foreground(fd):
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                return
            if not chunk:  # end of input: nothing more to watch
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if any(line.strip().lower() == b"q" for line in lines):
                self._on_quit()


def stdin_is_terminal() -> bool:
    """Whether a person at a terminal types into this process (Ctrl+C reaches it)."""
    return _terminal_fd(sys.stdin) is not None


def _terminal_fd(stream: Any) -> int | None:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    try:
        return fd if os.isatty(fd) and _in_foreground(fd) else None
    except OSError:
        return None


def _in_foreground(fd: int) -> bool:
    """Whether reading ``fd`` would not stop this process with SIGTTIN (a background job)."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:  # not our controlling terminal: reading it cannot stop us
        return True


def _get_tty_settings(fd: int) -> Any:
    try:
        import termios

        return termios.tcgetattr(fd)
    except Exception:  # termios.error is not an OSError; no terminal settings to keep
        return None


def _set_tty_settings(fd: int, settings: Any) -> None:
    try:
        import termios

        termios.tcsetattr(fd, termios.TCSADRAIN, settings)
    except Exception:  # termios.error: the terminal went away; nothing to restore
        pass
