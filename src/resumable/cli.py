"""The ``resumable`` command line.

Exit codes: 0 success, 1 a failed check, 2 bad usage or input. Errors are one
line on stderr, never a traceback: every subcommand handler runs under the one
handler in ``main``, which turns ``ResumableError`` and ``OSError`` into a
message. Subcommands import what they need inside their handler, so
``resumable --help`` is fast and works without the optional dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from resumable import __version__
from resumable.errors import ResumableError

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resumable",
        description="Make long-running Python processes safe to interrupt and cheap to resume.",
    )
    parser.add_argument("--version", action="version", version=f"resumable {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 inside argparse
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``resumable list DIR | head``): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED_CHECK
    except ResumableError as exc:
        return _fail(args, str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        return _fail(args, _describe_os_error(exc), EXIT_BAD_INPUT)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    sys.stderr.write(f"resumable {args.command}: error: {message}\n")
    return code


def _describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


# --- resumable run ------------------------------------------------------------


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "run",
        help="run a command; restart it with RESUMABLE_RESUME=auto when it crashes",
        description=(
            "Run CMD in its own process group, pass SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 on "
            "to it, and start it again when it crashes (a non-zero exit that was not a "
            "requested stop, or a kill), with exponential backoff. Exits with the child's "
            "exit code (128+N for a death by signal N)."
        ),
        usage="resumable run [-h] [--max-restarts N] [--backoff SECONDS] "
        "[--max-backoff SECONDS] [--dir DIR] -- CMD...",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="give up after N restarts (default 3)",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="wait before the first restart, doubled for each further one (default 1)",
    )
    p.add_argument(
        "--max-backoff",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait between restarts (default 60)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="the run directory whose run.json records the restarts "
        "(default: the value of --dir in CMD)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command to run")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from resumable.supervise import Supervisor, run_dir_from_command

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    supervisor = Supervisor(
        command,
        max_restarts=args.max_restarts,
        backoff=args.backoff,
        max_backoff=args.max_backoff,
        run_dir=args.dir if args.dir is not None else run_dir_from_command(command),
    )
    return supervisor.run()
