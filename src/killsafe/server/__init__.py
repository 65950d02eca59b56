"""The dashboard and HTTP control API of a run directory.

``Run(serve=...)`` serves from a child process (``killsafe.server.launcher``),
so that no request takes the training process's CPU or GIL; ``serve_forever``
serves any run directory from another process (``killsafe serve DIR``), live or
finished; ``serve_in_thread`` serves from a daemon thread of the calling
process (tests, notebooks). Either way the server only reads the run
directory's files and drops control requests into it, so it never blocks the
training loop. ``ServeLimits`` caps what save requests can create.

Security: the server binds 127.0.0.1 unless told otherwise. Binding any other
address needs a token (given, or generated and logged once), which every API
request must carry as ``Authorization: Bearer TOKEN`` or ``X-Killsafe-Token``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import math
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from killsafe import storage
from killsafe.errors import ConfigError, KillsafeError
from killsafe.rundir.remote import mirrored_run_copy, refreshed_run_copy
from killsafe.server.limits import ServeLimits

__all__ = [
    "DEFAULT_HOST",
    "ServeLimits",
    "ServerHandle",
    "add_cli_arguments",
    "run_cli",
    "serve_forever",
    "serve_in_thread",
]

log = logging.getLogger("killsafe.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MIRROR_REFRESH = 10.0
"""Seconds between two reads of a served mirror's run files (``--refresh``)."""
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


@dataclass
class ServerHandle:
    """A server running in a background thread; ``close()`` stops it and joins the thread."""

    url: str
    port: int
    token: str | None = field(repr=False)
    host: str
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _stopping: threading.Event = field(repr=False)

    @property
    def page_url(self) -> str:
        """The dashboard's address; it carries the token in the fragment, never sent."""
        return f"{self.url}#token={self.token}" if self.token else self.url

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop serving: end the event streams, shut uvicorn down, join its thread."""
        self._stopping.set()
        self._server.should_exit = True
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("dashboard server thread did not stop within %.0f s", timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_in_thread(
    run_dir: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    token: str | bool | None = None,
    limits: ServeLimits | None = None,
    mirror: str | None = None,
) -> ServerHandle:
    """Serve ``run_dir`` from a daemon thread and return once the server accepts connections.

    ``port=0`` picks a free port (read it from ``handle.port``). ``token``: a
    string to require it, ``True`` to generate one (logged once), ``None`` for
    none, which only a loopback ``host`` allows. ``limits``: caps on save
    requests (default ``ServeLimits()``). ``mirror``: serve read-only the run
    mirrored at this URL, whose run files were copied into ``run_dir``
    (``mirrored_run_copy``). Raises ``ConfigError`` for a non-loopback host
    without a token or a port that cannot be bound.
    """
    token = _resolve_token(host, token)
    sock = _bind(host, port)
    stopping = threading.Event()
    server = _make_server(run_dir, token, stopping, limits=limits, mirror=mirror)
    bound_port = sock.getsockname()[1]
    thread = threading.Thread(
        target=_run_server, args=(server, sock), name=f"killsafe-server:{bound_port}", daemon=True
    )
    thread.start()
    handle = ServerHandle(
        url=_url(host, bound_port),
        port=bound_port,
        token=token,
        host=host,
        _server=server,
        _thread=thread,
        _stopping=stopping,
    )
    _wait_started(handle)
    _announce(handle)
    return handle


def serve_forever(
    run_dir: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token: str | bool | None = None,
    limits: ServeLimits | None = None,
    mirror: str | None = None,
) -> None:
    """Serve ``run_dir`` in this thread until SIGINT or SIGTERM (``killsafe serve DIR``).

    ``token``, ``limits`` and ``mirror`` as for ``serve_in_thread``; a
    non-loopback host without a token raises ``ConfigError``.
    """
    token = _resolve_token(host, token)
    sock = _bind(host, port)
    stopping = threading.Event()
    server = _make_server(run_dir, token, stopping, limits=limits, mirror=mirror)
    bound_port = sock.getsockname()[1]
    url = _url(host, bound_port)
    log.info("serving %s at %s", mirror or run_dir, f"{url}#token={token}" if token else url)
    try:
        _run_server(server, sock)
    finally:
        stopping.set()


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``DIR``, ``--host``, ``--port`` and ``--token`` for ``killsafe serve``."""
    parser.add_argument(
        "dir",
        metavar="DIR|URL",
        help="the run directory to serve, or its mirror's URL (s3://bucket/exp; read-only)",
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}); any other address requires a token",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)"
    )
    parser.add_argument(
        "--token",
        default=None,
        help="require this token on API requests (generated and "
        "printed once when --host is not a loopback address and none is given)",
    )
    parser.add_argument(
        "--refresh",
        type=_seconds,
        default=MIRROR_REFRESH,
        metavar="SECONDS",
        help="with a mirror's URL: read its run files again this often "
        f"(default {MIRROR_REFRESH:g})",
    )
    defaults = ServeLimits()
    parser.add_argument(
        "--saves-per-minute",
        type=_cap,
        default=defaults.saves_per_minute,
        metavar="N|none",
        help="save requests that may reach the run per minute, 429 beyond "
        f"(default {defaults.saves_per_minute})",
    )
    parser.add_argument(
        "--named-saves-kept",
        type=_cap,
        default=defaults.named_saves_kept,
        metavar="N|none",
        help="checkpoints named by save requests that may exist at once, 429 beyond "
        f"(default {defaults.named_saves_kept})",
    )


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: use seconds > 0")
    return seconds


def _cap(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use a whole number or 'none'") from None


def run_cli(args: argparse.Namespace) -> int:
    """Run ``killsafe serve`` from parsed arguments until SIGINT or SIGTERM.

    Returns 0 once stopped, 2 (with one line on stderr) for a missing
    directory, a URL that holds no mirrored run, a port that cannot be bound
    or a missing FastAPI/uvicorn.
    """
    if storage.is_url(args.dir):
        url = args.dir.rstrip("/")
        try:
            with mirrored_run_copy(url) as copy, refreshed_run_copy(url, copy, args.refresh):
                return _serve_cli(args, copy, mirror=url)
        except (KillsafeError, OSError) as exc:
            return _cli_error(str(exc))
    run_dir = Path(args.dir)
    if not run_dir.is_dir():
        return _cli_error(f"no run directory at {run_dir}; pass the directory given to Run(...)")
    return _serve_cli(args, run_dir)


def _serve_cli(args: argparse.Namespace, run_dir: Path, *, mirror: str | None = None) -> int:
    token: str | bool | None = args.token
    if token is None and not is_loopback(args.host):
        token = True
    try:
        limits = ServeLimits(
            saves_per_minute=getattr(args, "saves_per_minute", ServeLimits.saves_per_minute),
            named_saves_kept=getattr(args, "named_saves_kept", ServeLimits.named_saves_kept),
        )
        serve_forever(
            run_dir, host=args.host, port=args.port, token=token, limits=limits, mirror=mirror
        )
    except ConfigError as exc:
        return _cli_error(str(exc))
    return 0


def _cli_error(message: str) -> int:
    sys.stderr.write(f"killsafe serve: error: {message}\n")
    return 2


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _resolve_token(host: str, token: str | bool | None) -> str | None:
    if token is True:
        return secrets.token_urlsafe(24)
    if token is None or token is False:
        if not is_loopback(host):
            raise ConfigError(
                f"serving on {host!r} needs a token; pass token='...' or token=True "
                "(--token for killsafe serve), or bind 127.0.0.1"
            )
        return None
    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
        raise ConfigError("the server token must be a non-empty string without spaces")
    return token


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Small JSON answers go out at once (no Nagle delay against delayed ACKs).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another port or port 0"
        ) from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _make_server(
    run_dir: str | Path,
    token: str | None,
    stopping: threading.Event,
    *,
    limits: ServeLimits | None = None,
    handle_signals: bool = True,
    reuse_for: float = 0.0,
    mirror: str | None = None,
) -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigError(
            "the dashboard needs FastAPI and uvicorn; pip install fastapi uvicorn"
        ) from exc
    from killsafe.server.app import create_app

    app = create_app(
        run_dir, token=token, stopping=stopping, limits=limits, reuse_for=reuse_for, mirror=mirror
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            stopping.set()  # end the event streams so shutdown does not wait on them
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Like uvicorn's, without re-raising the signal after the shutdown: a
            # server stopped by Ctrl+C or SIGTERM has done its job and exits 0.
            if not handle_signals or threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=3,
        server_header=False,
    )
    return Server(config)


def _run_server(server: Any, sock: socket.socket) -> None:
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


def _wait_started(handle: ServerHandle) -> None:
    server = handle._server
    deadline = threading.Event()
    for _ in range(int(START_TIMEOUT / 0.01)):
        if server.started or not handle._thread.is_alive():
            break
        deadline.wait(0.01)
    if not server.started:
        handle.close()
        raise ConfigError(f"the dashboard server on port {handle.port} did not start")


def _announce(handle: ServerHandle) -> None:
    log.info("dashboard at %s", handle.page_url)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"
