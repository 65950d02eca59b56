"""``killsafe run -- CMD...``: run a command, restart it when it crashes."""

from __future__ import annotations

import argparse
from pathlib import Path

from killsafe.cli.common import Commands


def add_commands(commands: Commands) -> None:
    p = commands.add_parser(
        "run",
        help="run a command; restart it with KILLSAFE_RESUME=auto when it crashes",
        description=(
            "Run CMD in its own process group, pass SIGINT/SIGTERM/SIGHUP/SIGUSR1/SIGUSR2 on "
            "to it, and start it again when it crashes (a non-zero exit that was not a "
            "requested stop, or a kill), with exponential backoff. Exits with the child's "
            "exit code (128+N for a death by signal N)."
        ),
        usage="killsafe run [-h] [--max-restarts N] [--backoff SECONDS] "
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
        "(default: the value of --dir in CMD, or DIR of `killsafe demo DIR`)",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command to run")
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from killsafe.supervise import Supervisor, run_dir_from_command

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
