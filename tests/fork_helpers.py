"""Real child processes that start fast: forked from one preloaded forkserver.

A fresh interpreter pays for its imports at every start (torch: seconds,
killsafe: a few tenths); tests that start children again and again fork them
instead from multiprocessing's forkserver, which imported those modules once.
Each child is still an ordinary process: its own pid, real signals (SIGINT
has Python's default handler, as in a new interpreter), a real exit status.

The forkserver is one per test session and takes its preload list when it
starts, so every module gets it here, with the same list.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Imported once by the forkserver; one that is missing is skipped. With numpy
# loaded, a first save also imports numpy.random and secrets: preloaded too,
# so a writer's first save is as quick as in a fresh interpreter without numpy.
PRELOAD = [
    "killsafe",
    "killsafe.store",
    "numpy",
    "numpy.random",
    "secrets",
    "torch",
    "torch.distributed",
    "torch.distributed.checkpoint",
    "killsafe.distributed",
    "obstore",
    "object_writers",
]

_context: Any = None
_children = itertools.count()


def context() -> Any:
    """The session's forkserver context, preloaded with ``PRELOAD``."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([*PRELOAD, __name__])
    return _context


class ScriptProcess:
    """``python SCRIPT ARGS`` as a forked child, with the parts of ``Popen`` tests use.

    Its stdout and stderr go to files in ``output_dir`` (``child-N.out``,
    ``child-N.err``); ``env`` adds to the environment the child inherits (the
    forkserver's, from when it started), or with ``whole_env`` is all of it.
    """

    def __init__(
        self,
        script: Path,
        args: list[str],
        output_dir: Path,
        env: dict[str, str] | None = None,
        *,
        whole_env: bool = False,
    ) -> None:
        number = next(_children)
        self.stdout_path = output_dir / f"child-{number}.out"
        self.stderr_path = output_dir / f"child-{number}.err"
        self._process = context().Process(
            target=run_as_main,
            args=(str(script), list(args), dict(env or {}), self.stdout_path, self.stderr_path),
            kwargs={"whole_env": whole_env},
        )
        self._process.start()
        self.pid: int = self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, negative for a signal (as ``Popen``), or None while it runs."""
        return self._process.exitcode  # type: ignore[no-any-return]

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status once it ended (``TimeoutExpired`` after ``timeout``), as ``Popen``."""
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(str(self._process), timeout or 0)
        return self._process.exitcode  # type: ignore[no-any-return]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait_for_line(self, timeout: float = 60) -> str:
        """The first line of its stdout, once it is complete (the child must stay alive)."""
        return self.wait_for_lines(1, timeout)[0]

    def wait_for_lines(self, count: int, timeout: float = 60) -> list[str]:
        """The first ``count`` complete lines of its stdout (the child must stay alive)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = _read(self.stdout_path).split("\n")[:-1]
            if len(lines) >= count:
                return lines[:count]
            assert self.poll() is None, f"the child ended: {_read(self.stderr_path)}"
            assert time.monotonic() < deadline, f"the child wrote {len(lines)} lines in time"
            time.sleep(0.002)

    def communicate(self, timeout: float) -> tuple[str, str]:
        """Wait for the end; its stdout and stderr (``TimeoutExpired`` after ``timeout``)."""
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(str(self._process), timeout)
        return _read(self.stdout_path), _read(self.stderr_path)

    def kill(self) -> None:
        self._process.kill()
        self._process.join()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def run_as_main(
    script: str,
    args: list[str],
    env: dict[str, str],
    stdout: Path,
    stderr: Path,
    *,
    whole_env: bool = False,
) -> None:
    """In the child: run ``script`` as ``__main__`` as ``python script ARGS`` would."""
    if whole_env:
        os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
