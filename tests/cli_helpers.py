"""Helpers shared by the command-line tests: run the CLI for real, snapshot trees."""

from __future__ import annotations

import hashlib
import json
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


def cli_json(*args: str | os.PathLike[str], expect: int = 0) -> Any:
    """Run a data command with ``--json``; check the exit code and parse stdout."""
    out = cli(*args, "--json")
    assert out.returncode == expect, (out.returncode, out.stdout, out.stderr)
    return json.loads(out.stdout)


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
