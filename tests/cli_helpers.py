"""Helpers shared by the command-line tests: run the CLI for real, snapshot trees."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def cli(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 120) -> Any:
    """Run ``python -m killsafe ARGS`` and return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "killsafe", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def cli_in_process(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    """Run ``killsafe ARGS`` through ``killsafe.cli.main`` in this process, as ``cli`` would.

    Skips a fresh interpreter's start-up (about a second a command) for tests
    that call the CLI many times. Standard output and error are captured, and
    logging starts as bare as in a new process (no handler on the root or the
    ``killsafe`` logger), so library messages land on the captured stderr as
    they would there. An exception escaping ``main`` propagates: in a real
    process it would be a traceback, which every test rejects.
    """
    from killsafe.cli import main

    argv = list(map(str, args))
    out, err = io.StringIO(), io.StringIO()
    with _bare_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors and --help
            code = _exit_status(exc, err)
    return subprocess.CompletedProcess(["killsafe", *argv], code, out.getvalue(), err.getvalue())


def _exit_status(exc: SystemExit, err: io.StringIO) -> int:
    """The status a process ending with ``exc`` has (a message: printed, status 1)."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    err.write(f"{exc.code}\n")
    return 1


@contextlib.contextmanager
def _bare_logging() -> Any:
    """Logging as a fresh process has it, restored afterwards."""
    loggers = [logging.getLogger(), logging.getLogger("killsafe")]
    saved = [(logger, logger.handlers[:], logger.level) for logger in loggers]
    for logger in loggers:
        logger.handlers.clear()
    try:
        yield
    finally:
        for logger, handlers, level in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)


def cli_json(*args: str | os.PathLike[str], expect: int = 0, in_process: bool = False) -> Any:
    """Run a data command with ``--json``; check the exit code and parse stdout."""
    out = (cli_in_process if in_process else cli)(*args, "--json")
    assert out.returncode == expect, (out.returncode, out.stdout, out.stderr)
    return json.loads(out.stdout)


def cli_json_in_process(*args: str | os.PathLike[str], expect: int = 0) -> Any:
    """``cli_json`` through ``cli_in_process``."""
    return cli_json(*args, expect=expect, in_process=True)


def assert_one_line_error(out: Any, code: int, *fragments: str) -> None:
    """A failed command: the exit code, one line on stderr with ``fragments``, no traceback."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and directory under ``root``: (mode, mtime_ns, content hash)."""
    found: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            digest = ""
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(root))] = (stat.st_mode, stat.st_mtime_ns, digest)
    return found
