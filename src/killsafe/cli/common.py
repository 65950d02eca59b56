"""What every command of the command line shares: exit codes, errors, JSON and tables."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeAlias

from killsafe.errors import CheckpointNotFound, ConfigError
from killsafe.rundir import json_default
from killsafe.units import format_size  # noqa: F401  (the commands import it from here)

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2

MANIFEST_FILE = "manifest.json"

Handler = Callable[[argparse.Namespace], int]
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``add_subparsers`` returns; each command module mounts its commands on it."""


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit 2; subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def fail(args: argparse.Namespace, message: str, code: int) -> int:
    sys.stderr.write(f"killsafe {args.command}: error: {message}\n")
    return code


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=json_default) + "\n")


def existing_directory(path: Path, what: str) -> Path:
    """``path`` if it is a directory; otherwise a one-line error naming it."""
    if not path.exists():
        raise CheckpointNotFound(f"{path} does not exist; give {what}")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file; give {what}")
    return path


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def format_time(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={shown}")
    return " ".join(parts)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A rich table on a terminal, aligned plain columns otherwise (greppable, no box)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers, box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for row in [headers, *rows]:
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        sys.stdout.write(line.rstrip() + "\n")
