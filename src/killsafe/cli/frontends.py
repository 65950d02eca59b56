"""Commands whose arguments and handler live in another module: report, preflight, serve.

A front end's module is imported only when its command is the one asked for,
so ``killsafe --help`` imports nothing optional.
"""

from __future__ import annotations

import argparse
import importlib

from killsafe.cli.common import EXIT_BAD_INPUT, Commands, fail


def add_front_end(
    commands: Commands,
    selected: str | None,
    name: str,
    module_name: str,
    *,
    help: str,
    missing: str = "",
) -> None:
    """Mount ``module.add_cli_arguments`` / ``module.run_cli`` as subcommand ``name``."""
    p = commands.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
    if selected != name:
        return  # not asked for: do not import the module
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        message = missing or f"cannot import {module_name}: {exc}"
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(handler=lambda args: fail(args, message, EXIT_BAD_INPUT))
        return
    module.add_cli_arguments(p)
    p.set_defaults(handler=module.run_cli)


def add_commands(commands: Commands, selected: str | None) -> None:
    """Mount ``report``, ``preflight`` and ``serve``; import only the ``selected`` one."""
    add_front_end(
        commands,
        selected,
        "report",
        "killsafe.report",
        help="the report of a run: outcome, sessions, metrics, checkpoints",
    )
    add_front_end(
        commands,
        selected,
        "preflight",
        "killsafe.preflight",
        help="go/no-go checks before a long run (disk, packages, data)",
    )
    add_front_end(
        commands,
        selected,
        "serve",
        "killsafe.server",
        help="the dashboard and HTTP API of a run directory, live or finished",
        missing="the dashboard needs FastAPI and uvicorn: pip install fastapi uvicorn",
    )
