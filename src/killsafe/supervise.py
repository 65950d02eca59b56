"""``killsafe run``: run a command and start it again when it crashes.

The supervisor starts the command as a child in its own session and process group and
passes SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 on to that group, so a
Ctrl+C or a scheduler's SIGTERM reaches the job exactly once. When the child
ends, the supervisor decides:

- exit code 0: the job is done; the supervisor exits 0;
- a requested stop (the child ended after the supervisor forwarded a stop
  signal, it was killed by SIGINT, SIGTERM or SIGHUP sent to it directly, or
  the run's ``run.json`` says it stopped on request): not restarted, the
  child's exit code passes through;
- anything else is a crash (a non-zero exit, or a death by a signal nobody
  asked for, such as the OOM killer's SIGKILL): the child is started again
  with ``KILLSAFE_RESUME=auto`` after an exponential backoff, at most
  ``max_restarts`` times, after which the supervisor gives up and says why.

The exit code is the child's last one, ``128 + N`` for a death by signal N as
shells report it. When the child is a killsafe run (its run directory holds
``run.json``), each restart is appended to ``run.json["restarts"]``; the
child is dead at that moment, so nothing else writes the file.

The child gets ``KILLSAFE_SUPERVISOR=1`` and ``KILLSAFE_RESTARTS=<n>`` in
its environment. It runs in a session of its own, without a controlling
terminal: a terminal on standard input is not handed to it (it reads from
``/dev/null`` instead), while its output goes where the supervisor's goes.
The supervisor's notices start on a line of their own even when the child
left one open (a live progress display killed mid-draw).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from killsafe.errors import ConfigError
from killsafe.rundir import RUN_FILE, read_json, write_json_atomic

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that ask the job to stop: a child that ends after one is not restarted."""
FORWARDED_SIGNALS = (*STOP_SIGNALS, signal.SIGUSR1, signal.SIGUSR2)
"""Signals the supervisor passes on to the child's process group."""
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ChildExit:
    """How one child process ended; ``returncode`` as ``subprocess`` reports it."""

    returncode: int

    @property
    def signal(self) -> signal.Signals | None:
        """The signal that killed the child, or ``None`` when it exited."""
        return signal.Signals(-self.returncode) if self.returncode < 0 else None

    @property
    def exit_code(self) -> int:
        """The code a shell reports: the exit status, or 128 + the signal number."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    def describe(self) -> str:
        if self.signal is not None:
            return f"was killed by {self.signal.name} (exit code {self.exit_code})"
        return f"exited with code {self.exit_code}"


def classify(child: ChildExit, *, stop_forwarded: bool, run_stopped: bool) -> str:
    """``"finished"``, ``"stopped"`` (on request) or ``"crashed"``: what a child's end means."""
    if child.returncode == 0:
        return "finished"
    if stop_forwarded or run_stopped or child.signal in STOP_SIGNALS:
        return "stopped"
    return "crashed"


def backoff_delay(restart: int, base: float, cap: float) -> float:
    """Seconds to wait before restart number ``restart`` (1-based): ``base * 2**(n-1)``, capped."""
    return min(cap, base * 2.0 ** (restart - 1))


def run_dir_from_command(command: Sequence[str]) -> Path | None:
    """The run directory ``command`` will use, if it can be told: the value of a
    ``--dir DIR`` or ``--dir=DIR`` flag, or the ``DIR`` of ``killsafe demo [DIR]``."""
    for i, arg in enumerate(command):
        if arg == "--dir" and i + 1 < len(command):
            return Path(command[i + 1])
        if arg.startswith("--dir="):
            return Path(arg.split("=", 1)[1])
    return _demo_directory(command)


DEMO_FLAGS_WITH_VALUE = ("--steps",)
DEMO_DEFAULT_DIRECTORY = Path("runs/demo")  # as in ``killsafe demo --help``


def _demo_directory(command: Sequence[str]) -> Path | None:
    """``DIR`` of ``killsafe demo [DIR] ...`` or ``python -m killsafe demo [DIR] ...``."""
    for i in range(len(command) - 1):
        if Path(command[i]).name == "killsafe" and command[i + 1] == "demo":
            rest = iter(command[i + 2 :])
            for arg in rest:
                if arg in DEMO_FLAGS_WITH_VALUE:
                    next(rest, None)
                elif not arg.startswith("-"):
                    return Path(arg)
            return DEMO_DEFAULT_DIRECTORY
    return None


@dataclass
class Supervisor:
    """Runs ``command`` until it finishes, stops on request, or crashes too often.

    ``run_dir`` is where the child's ``run.json`` lives (restarts are recorded
    there when it exists); ``None`` records nothing. ``stream`` receives the
    supervisor's one-line messages. ``run()`` must be called on the main thread
    (it installs signal handlers, and restores the previous ones on return).
    """

    command: Sequence[str]
    max_restarts: int = 3
    backoff: float = 1.0
    max_backoff: float = 60.0
    run_dir: Path | None = None
    stream: TextIO | None = None
    restarts: int = field(default=0, init=False)
    _child: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _stop_signal: int | None = field(default=None, init=False, repr=False)
    _pending: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("no command given; usage: killsafe run [OPTIONS] -- CMD...")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be 0 or more, got {self.max_restarts}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ConfigError("--backoff and --max-backoff must be 0 or more seconds")

    def run(self) -> int:
        """Supervise the command; returns the exit code to exit with."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED_SIGNALS}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        while True:
            if self._stop_signal is not None:  # a stop asked for before the child started
                return 128 + self._stop_signal
            sessions_before = self._session_count()
            child = self._run_child()
            outcome = classify(
                child,
                stop_forwarded=self._stop_signal is not None,
                run_stopped=self._run_stopped(sessions_before),
            )
            if outcome != "crashed":
                return child.exit_code
            if self.restarts >= self.max_restarts:
                self._say(
                    f"giving up after {self.restarts} restart(s): {self._name()} "
                    f"{child.describe()} again; raise --max-restarts or fix the crash"
                )
                return child.exit_code
            self.restarts += 1
            delay = backoff_delay(self.restarts, self.backoff, self.max_backoff)
            self._record_restart(child, delay)
            self._say(
                f"{self._name()} {child.describe()}; restarting in {delay:g}s "
                f"(restart {self.restarts} of {self.max_restarts})"
            )
            if not self._sleep(delay):
                return 128 + int(self._stop_signal or signal.SIGTERM)
            self._pending.clear()  # user signals that arrived between two children

    def _run_child(self) -> ChildExit:
        env = dict(os.environ)
        env["KILLSAFE_SUPERVISOR"] = "1"
        env["KILLSAFE_RESTARTS"] = str(self.restarts)
        if self.restarts:
            env["KILLSAFE_RESUME"] = "auto"
        stdin = subprocess.DEVNULL if _stdin_is_terminal() else None
        try:
            # A new session is a new process group (pgid == pid) with no
            # controlling terminal: terminal signals reach the supervisor only,
            # which forwards each exactly once.
            self._child = subprocess.Popen(
                list(self.command), env=env, stdin=stdin, start_new_session=True
            )
            self._forward_pending()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"command not found: {self.command[0]!r}; check the name or PATH"
            ) from exc
        except PermissionError as exc:
            raise ConfigError(f"cannot execute {self.command[0]!r}: permission denied") from exc
        try:
            return ChildExit(self._child.wait())
        finally:
            self._child = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in STOP_SIGNALS:
            self._stop_signal = signum
        child = self._child
        if child is None:
            self._pending.append(signum)  # the child is being started: forward it then
        elif child.returncode is None:
            # The child may end between the check and the kill.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signum)

    def _forward_pending(self) -> None:
        while self._pending and self._child is not None:
            signum = self._pending.pop(0)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._child.pid, signum)

    def _sleep(self, seconds: float) -> bool:
        """Wait before a restart; ``False`` when a stop signal arrived meanwhile."""
        deadline = time.monotonic() + seconds
        while self._stop_signal is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(POLL_SECONDS, left))
        return False

    def _run_json(self) -> dict[str, Any] | None:
        if self.run_dir is None:
            return None
        try:
            data = read_json(self.run_dir / RUN_FILE)
        except Exception:  # a torn or foreign run.json must not stop the supervision
            log.warning("killsafe run: cannot read %s", self.run_dir / RUN_FILE, exc_info=True)
            return None
        return data if isinstance(data, dict) else None

    def _session_count(self) -> int:
        data = self._run_json() or {}
        sessions = data.get("sessions")
        return len(sessions) if isinstance(sessions, list) else 0

    def _run_stopped(self, sessions_before: int) -> bool:
        # Trust run.json's status only if the child started a session of its own;
        # a child that crashed before that leaves the previous session's status there.
        data = self._run_json()
        if data is None or self._session_count() <= sessions_before:
            return False
        return data.get("status") == "stopped"

    def _record_restart(self, child: ChildExit, delay: float) -> None:
        data = self._run_json()
        if data is None or self.run_dir is None:
            return
        restarts = data.get("restarts")
        if not isinstance(restarts, list):
            restarts = []
        restarts.append(
            {
                "time": time.time(),
                "exit_code": child.exit_code,
                "signal": child.signal.name if child.signal is not None else None,
                "attempt": self.restarts,
                "delay": delay,
            }
        )
        data["restarts"] = restarts
        write_json_atomic(self.run_dir / RUN_FILE, data)

    def _name(self) -> str:
        text = shlex.join(self.command)
        return f"`{text if len(text) <= 60 else text[:57] + '...'}`"

    def _say(self, message: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        with contextlib.suppress(OSError, ValueError):
            stream.flush()  # our own earlier output is out before looking at where we are
        stream.write(f"{line_start(stream)}killsafe run: {message}\n")
        stream.flush()


TERMINAL_LINE_START = "\r\x1b[K\x1b[?25h"
"""After padding: back to column 0, clear the line, show the cursor (a live
display killed mid-draw leaves it hidden)."""


def line_start(stream: TextIO) -> str:
    """What to write so that the next text starts at the beginning of a line.

    The child writes to the same place and may have left a line open (a live
    progress display killed mid-draw). On a terminal, nothing can be read
    back, so the text is padded with one terminal width of spaces: from
    column 0 that stays on the line (the terminal waits to wrap), from any
    other column it wraps onto a fresh line; a carriage return and a clear
    then start the text there. For a regular file, its last byte is read.
    Anything else (a pipe) gets nothing: output there is whole lines.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return ""
    if os.isatty(fd):
        try:
            width = os.get_terminal_size(fd).columns
        except OSError:
            return "\n"
        return " " * width + TERMINAL_LINE_START
    return "" if _file_ends_a_line(fd) else "\n"


def _file_ends_a_line(fd: int) -> bool:
    """True when ``fd`` is not a regular file, is empty, or its last byte is a newline."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True
        # The descriptor may be write-only: read the same file through /proc.
        with open(f"/proc/self/fd/{fd}", "rb") as file:
            if file.seek(0, os.SEEK_END) == 0:
                return True
            file.seek(-1, os.SEEK_END)
            return file.read(1) == b"\n"
    except OSError:
        return True


def _stdin_is_terminal() -> bool:
    try:
        return os.isatty(0)
    except OSError:
        return False
