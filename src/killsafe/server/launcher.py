"""The dashboard of a live run, served by a child process (``Run(serve=...)``).

The training process binds the listening socket (so the printed address is the
real one, port 0 included), hands it to ``python -m killsafe.server.launcher``
and goes back to training: the child reads the run directory and drops control
requests into it, exactly like ``killsafe serve DIR``, so no request ever takes
the training process's CPU or its GIL. The child runs at a lower CPU priority.

The child ends with the run, never after it:
- ``close()`` closes the child's stdin (its lifeline): the server shuts down
  gracefully; after ``STOP_TIMEOUT`` it is killed;
- if the training process dies, even by SIGKILL, the kernel sends the child
  SIGKILL (``PR_SET_PDEATHSIG`` on Linux), and the child also notices its
  parent is gone (its parent pid changes) within a second, on any POSIX system.
Ctrl+C and SIGTERM are meant for the training loop: the child ignores them and
keeps serving while the run saves its last checkpoint.

This module imports neither FastAPI nor uvicorn in the training process.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from killsafe.errors import ConfigError
from killsafe.server import (
    DEFAULT_HOST,
    START_TIMEOUT,
    STOP_TIMEOUT,
    _bind,
    _make_server,
    _resolve_token,
    _url,
)
from killsafe.server.limits import ServeLimits

__all__ = ["ChildServer", "check_limits", "start_child_server"]

log = logging.getLogger("killsafe.server")

CHILD_NICE = 10
REUSE_ANSWERS_FOR = 1.0
"""Seconds the child reuses a whole-history or report answer: polling clients cost
one build a second, which keeps the child's CPU small beside the training."""
PARENT_POLL_SECONDS = 0.5
_PR_SET_PDEATHSIG = 1


@dataclass
class ChildServer:
    """The dashboard's child process; ``close()`` ends it and waits for it."""

    url: str
    port: int
    token: str | None = field(repr=False)
    host: str
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def page_url(self) -> str:
        """The dashboard's address; it carries the token in the fragment, never sent."""
        return f"{self.url}#token={self.token}" if self.token else self.url

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """End the child: close its lifeline, wait, kill it if it does not stop in time."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "dashboard server (pid %d) did not stop within %.0f s; killed", self.pid, timeout
            )
            self.process.kill()
            self.process.wait()


def check_limits(limits: object) -> ServeLimits | None:
    """``limits`` if it is a ``ServeLimits`` or ``None``, else ``ConfigError`` (one line)."""
    if limits is None or isinstance(limits, ServeLimits):
        return limits
    raise ConfigError(
        f"serve_limits={limits!r}: pass killsafe.server.ServeLimits(saves_per_minute=..., "
        "named_saves_kept=...) or None"
    )


def start_child_server(
    run_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    token: str | bool | None = None,
    limits: ServeLimits | None = None,
) -> ChildServer:
    """Serve ``run_dir`` from a child process; return once it accepts connections.

    ``port=0`` picks a free port (read it from ``.port``); ``token`` as for
    ``serve_in_thread``. Raises ``ConfigError`` (one line) when FastAPI or
    uvicorn is missing, the port cannot be bound or the child does not start.
    """
    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                "the dashboard needs FastAPI and uvicorn; pip install fastapi uvicorn"
            )
    limits = check_limits(limits)
    token = _resolve_token(host, token)
    sock = _bind(host, port)
    bound_port = int(sock.getsockname()[1])
    ready_read, ready_write = os.pipe()
    config = {
        "run_dir": str(Path(run_dir).resolve()),
        "socket_fd": sock.fileno(),
        "ready_fd": ready_write,
        "parent_pid": os.getpid(),
        "token": token,  # on the lifeline pipe, never in argv or the environment
        "limits": (limits or ServeLimits()).to_json(),
    }
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "killsafe.server.launcher"],
            stdin=subprocess.PIPE,
            pass_fds=(sock.fileno(), ready_write),
            env=_child_environment(),
        )
    except OSError as exc:
        os.close(ready_read)
        raise ConfigError(f"the dashboard process did not start: {exc}") from exc
    finally:
        sock.close()  # the child owns the listening socket now
        os.close(ready_write)
    child = ChildServer(_url(host, bound_port), bound_port, token, host, process)
    assert process.stdin is not None
    try:
        process.stdin.write(json.dumps(config).encode() + b"\n")
        process.stdin.flush()
        ready = _wait_ready(ready_read)
    except OSError:
        ready = False
    finally:
        os.close(ready_read)
    if not ready:
        child.close(timeout=1.0)
        raise ConfigError(
            f"the dashboard process on port {bound_port} did not start (exit code "
            f"{process.returncode}); its error is above, or run `killsafe serve DIR` to see it"
        )
    log.info("dashboard at %s", child.page_url)
    return child


def _child_environment() -> dict[str, str]:
    # The child imports this very killsafe, wherever the parent found it.
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _wait_ready(fd: int) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            return os.read(fd, 16).startswith(b"ready")
    return False


# ---- the child -------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGKILL when the parent dies (Linux), then check it is alive."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # died before the request above took effect
        os._exit(0)


def _watch_lifeline(
    lifeline: IO[bytes], parent_pid: int, server: Any, stop: threading.Event
) -> None:
    """Shut down on EOF of stdin (the run closes it); exit at once if the parent is gone."""
    fd = lifeline.fileno()
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        readable, _, _ = select.select([fd], [], [], PARENT_POLL_SECONDS)
        if readable and not os.read(fd, 4096):
            stop.set()  # ends the event streams so the shutdown does not wait on them
            server.should_exit = True
            return


def _signal_ready(server: Any, fd: int) -> None:
    while not server.started and not server.should_exit:
        time.sleep(0.01)
    with contextlib.suppress(OSError):
        if server.started:
            os.write(fd, b"ready\n")
        os.close(fd)


def main() -> int:
    """The child's entry point: read the config line on stdin, serve until EOF."""
    lifeline = sys.stdin.buffer
    config = json.loads(lifeline.readline())
    parent_pid = int(config["parent_pid"])
    _die_with_parent(parent_pid)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(CHILD_NICE)
    logging.basicConfig(level=logging.WARNING, format="killsafe dashboard: %(message)s")
    stop = threading.Event()
    limits = ServeLimits.from_json(config["limits"])
    server = _make_server(
        config["run_dir"],
        config["token"],
        stop,
        limits=limits,
        handle_signals=False,
        reuse_for=REUSE_ANSWERS_FOR,
    )
    sock = socket.socket(fileno=int(config["socket_fd"]))
    threading.Thread(
        target=_signal_ready, args=(server, int(config["ready_fd"])), daemon=True
    ).start()
    threading.Thread(
        target=_watch_lifeline, args=(lifeline, parent_pid, server, stop), daemon=True
    ).start()
    try:
        server.run(sockets=[sock])
    finally:
        stop.set()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
