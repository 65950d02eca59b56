"""``killsafe demo [DIR]``: train a small network with checkpoints; run it again to resume."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from killsafe.cli.common import EXIT_BAD_INPUT, Commands, fail
from killsafe.errors import ConfigError


def add_commands(commands: Commands) -> None:
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
    # Bad input is refused before torch is imported (seconds), not after.
    if args.steps is not None and args.steps < 1:
        return fail(args, f"--steps must be 1 or more, got {args.steps}", EXIT_BAD_INPUT)
    _check_directory_target(args.directory)
    try:
        import torch  # noqa: F401
    except ImportError:
        return fail(
            args,
            "the demo needs PyTorch; install it with: pip install -c constraints.txt -e '.[torch]'",
            EXIT_BAD_INPUT,
        )
    from killsafe.demo import DemoConfig, run_demo

    config = DemoConfig() if args.steps is None else DemoConfig.for_steps(args.steps)
    serve = not args.no_serve and _server_available()
    if not args.no_serve and not serve:
        sys.stderr.write(
            "killsafe demo: running without the dashboard, which needs FastAPI and uvicorn: "
            "pip install -c constraints.txt -e '.[server]'\n"
        )
    return run_demo(args.directory, config, serve=serve, stream=sys.stdout)


def _server_available() -> bool:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return False
    return True


def _check_directory_target(path: Path) -> None:
    """Refuse a path that exists but is not a directory (a run directory is created)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; give a run directory (it is created if missing)")
