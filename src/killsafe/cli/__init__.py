"""The ``killsafe`` command line: ``main`` and the parser; one module per command group.

Exit codes: 0 success, 1 a failed check, 2 bad usage or input. Errors are one
line on stderr, never a traceback: every subcommand handler runs under the one
handler in ``main``, which turns ``KillsafeError`` and ``OSError`` into a
message. Subcommands import what they need inside their handler, so
``killsafe --help`` is fast and works without the optional dependencies.

Command groups: ``demo`` (demo.py); ``list``, ``verify``, ``prune``
(checkpoints.py); ``inspect`` (tree.py); ``diff`` (diff.py); ``report``,
``preflight``, ``serve`` (frontends.py, mounted from their own modules);
``run`` (supervise.py); ``consolidate`` (consolidate.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from killsafe import __version__
from killsafe.cli import (
    checkpoints,
    consolidate,
    demo,
    diff,
    export,
    frontends,
    supervise,
    tree,
)
from killsafe.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED_CHECK,
    EXIT_OK,
    Handler,
    Parser,
    fail,
)
from killsafe.errors import KillsafeError

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED_CHECK", "EXIT_OK", "build_parser", "main"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of front ends owned by other modules are added
    only when ``command`` names them, so ``--help`` imports nothing optional."""
    parser: argparse.ArgumentParser = Parser(
        prog="killsafe",
        description="Make long-running Python processes safe to interrupt and cheap to resume.",
    )
    parser.add_argument("--version", action="version", version=f"killsafe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo.add_commands(commands)
    checkpoints.add_list(commands)
    tree.add_commands(commands)
    checkpoints.add_verify(commands)
    checkpoints.add_prune(commands)
    diff.add_commands(commands)
    consolidate.add_commands(commands)
    export.add_commands(commands)
    frontends.add_commands(commands, command)
    supervise.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)  # usage errors exit 2 inside argparse
    if extra:
        where = f"killsafe {args.command}" if args.command else "killsafe"
        parser.exit(
            EXIT_BAD_INPUT,
            f"{where}: error: unrecognized arguments: {' '.join(extra)}; see `{where} --help`\n",
        )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    _show_library_messages()
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``killsafe list DIR | head``): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED_CHECK
    except KillsafeError as exc:
        return fail(args, str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        return fail(args, _describe_os_error(exc), EXIT_BAD_INPUT)
    except ModuleNotFoundError as exc:  # an optional dependency this command needs
        return fail(args, _missing_module(exc), EXIT_BAD_INPUT)


def _show_library_messages() -> None:
    """Show killsafe's log messages (a served URL, a resume, a skipped checkpoint)
    on stderr as plain lines, unless the embedding program configured logging."""
    import logging

    logger = logging.getLogger("killsafe")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _missing_module(exc: ModuleNotFoundError) -> str:
    name = exc.name or str(exc)
    if name.split(".")[0] == "killsafe":
        return f"{name} is missing from this installation of killsafe; reinstall it"
    return f"this command needs {name}, which is not installed: pip install {name}"
