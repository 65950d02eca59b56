"""Waiting for the plot a run draws after its exit."""

from __future__ import annotations

import time
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def wait_for_png(run_dir: Path, timeout: float = 120.0) -> Path:
    """``run_dir/report.png`` once drawn for the ``report.json`` beside it.

    A run writes ``report.json`` at its exit and leaves ``report.png`` to a
    detached child; the plot is the report's once it is not older than it.
    """
    png, report = run_dir / "report.png", run_dir / "report.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if png.stat().st_mtime_ns >= report.stat().st_mtime_ns:
                return png
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{png} not drawn for {report} within {timeout:.0f}s")
