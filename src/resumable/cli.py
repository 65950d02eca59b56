"""The ``resumable`` command line.

Exit codes: 0 success, 1 a failed check, 2 bad usage or input. Errors are one
line on stderr, never a traceback: every subcommand handler runs under the one
handler in ``main``, which turns ``ResumableError`` and ``OSError`` into a
message. Subcommands import what they need inside their handler, so
``resumable --help`` is fast and works without the optional dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from resumable import __version__
from resumable.errors import CheckpointNotFound, ConfigError, ResumableError

EXIT_OK = 0
EXIT_FAILED_CHECK = 1
EXIT_BAD_INPUT = 2

Handler = Callable[[argparse.Namespace], int]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of front ends owned by other modules are added
    only when ``command`` names them, so ``--help`` imports nothing optional."""
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
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


def _print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    item = getattr(value, "item", None)
    if callable(item):  # numpy and torch scalars
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _existing_directory(path: Path, what: str) -> Path:
    """``path`` if it is a directory; otherwise a one-line error naming it."""
    if not path.exists():
        raise CheckpointNotFound(f"{path} does not exist; give {what}")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file; give {what}")
    return path


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


# --- resumable demo -----------------------------------------------------------


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "demo",
        help="train a small PyTorch network with checkpoints; run it again to resume",
        description=(
            "Train a small network on synthetic data generated inside the package, with "
            "checkpoints, live progress, the dashboard and a report at the end. Ctrl+C "
            "stops it gracefully; the same command continues where it stopped."
        ),
    )
    p.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=Path("runs/demo"),
        metavar="DIR",
        help="the run directory (default runs/demo)",
    )
    p.add_argument("--steps", type=int, default=None, metavar="N", help="training steps")
    p.add_argument(
        "--no-serve", action="store_true", help="do not start the dashboard during the run"
    )
    p.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        return _fail(
            args,
            "the demo needs PyTorch; install it with: pip install -c constraints.txt -e '.[torch]'",
            EXIT_BAD_INPUT,
        )
    from resumable.demo import DemoConfig, run_demo

    config = DemoConfig() if args.steps is None else DemoConfig(steps=args.steps)
    if config.steps < 1:
        return _fail(args, f"--steps must be 1 or more, got {config.steps}", EXIT_BAD_INPUT)
    _check_directory_target(args.directory)
    serve = not args.no_serve and _server_available()
    return run_demo(args.directory, config, serve=serve, stream=sys.stdout)


def _server_available() -> bool:
    import importlib.util

    return all(
        importlib.util.find_spec(name) is not None
        for name in ("fastapi", "uvicorn", "resumable.server")
    )


def _check_directory_target(path: Path) -> None:
    """Refuse a path that exists but is not a directory (a run directory is created)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; give a run directory (it is created if missing)")


# --- front ends of other modules: report, preflight, serve ----------------------


def _add_front_end(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    selected: str | None,
    name: str,
    module_name: str,
    *,
    help: str,
    missing: str,
) -> None:
    """Mount ``module.add_cli_arguments`` / ``module.run_cli`` as subcommand ``name``."""
    p = commands.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".")
    if selected != name:
        return  # not asked for: do not import the module
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        message = missing or f"cannot import {module_name}: {exc}"
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        p.set_defaults(handler=lambda args: _fail(args, message, EXIT_BAD_INPUT))
        return
    module.add_cli_arguments(p)
    p.set_defaults(handler=module.run_cli)
