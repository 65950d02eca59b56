"""The standard command-line flags of a killsafe script.

Two lines give an existing training script the flags::

    parser = argparse.ArgumentParser()
    killsafe.add_arguments(parser)          # --dir, --resume, --save-every, ...
    args = parser.parse_args()
    with killsafe.Run.from_args(args, total_steps=10_000) as run:
        ...

Keyword options given to ``Run.from_args`` are the script's defaults; a flag
given on the command line wins over them. The environment variable
``KILLSAFE_RESUME`` (set by ``killsafe run`` when it restarts a crashed
command) wins over both for ``resume``.
"""

from __future__ import annotations

import argparse
from typing import Any

from killsafe.errors import ConfigError
from killsafe.policy import parse_duration

__all__ = ["add_arguments", "options_from_args"]

# argparse destination -> Run keyword.
_FLAG_OPTIONS = {
    "killsafe_dir": "directory",
    "killsafe_resume": "resume",
    "killsafe_save_every": "save_every_steps",
    "killsafe_save_every_seconds": "save_every_seconds",
    "killsafe_save_every_epochs": "save_every_epochs",
    "killsafe_keep_last": "keep_last",
    "killsafe_stop_after": "stop_after",
    "killsafe_progress_every": "progress_every",
    "killsafe_serve": "serve",
    "killsafe_clear": "clear",
    "killsafe_mirror": "mirror",
    "killsafe_requeue": "requeue",
}


def add_arguments(
    parser: argparse.ArgumentParser, *, directory: str | None = None
) -> argparse._ArgumentGroup:
    """Add the standard flags to ``parser`` (in a group named "checkpointing"); returns the group.

    ``directory`` is the default of ``--dir``; without one, ``--dir`` is required.
    """
    group = parser.add_argument_group("checkpointing (killsafe)")
    group.add_argument(
        "--dir",
        dest="killsafe_dir",
        default=directory,
        required=directory is None,
        metavar="DIR",
        help="run directory: checkpoints, history and status live here"
        + (f" (default: {directory})" if directory else ""),
    )
    group.add_argument(
        "--resume",
        dest="killsafe_resume",
        default=None,
        metavar="auto|never|ask|PATH|STEP|NAME",
        help="where to continue from: the newest checkpoint (auto, the default), "
        "none (never), ask on the terminal, or one checkpoint",
    )
    group.add_argument(
        "--clear",
        dest="killsafe_clear",
        action="store_true",
        default=None,
        help="with --resume never: delete the existing checkpoints and start over",
    )
    group.add_argument(
        "--save-every",
        dest="killsafe_save_every",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="save a checkpoint every STEPS steps",
    )
    group.add_argument(
        "--save-every-seconds",
        dest="killsafe_save_every_seconds",
        type=_duration,
        default=None,
        metavar="SECONDS",
        help="save a checkpoint every SECONDS of wall time (also 10m, 1h)",
    )
    group.add_argument(
        "--save-every-epochs",
        dest="killsafe_save_every_epochs",
        type=_positive_int,
        default=None,
        metavar="EPOCHS",
        help="save a checkpoint at the end of every EPOCHS epochs of run.epochs()",
    )
    group.add_argument(
        "--keep-last",
        dest="killsafe_keep_last",
        type=_positive_int,
        default=None,
        metavar="N",
        help="keep the newest N checkpoints (older ones are deleted after each save)",
    )
    group.add_argument(
        "--stop-after",
        dest="killsafe_stop_after",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="stop with a checkpoint before DURATION of wall time (3h50m, 90m, 45s)",
    )
    group.add_argument(
        "--mirror",
        dest="killsafe_mirror",
        default=None,
        metavar="URL",
        help="also upload every checkpoint, in the background, to URL "
        "(s3://bucket/prefix, gs://, az://, or a directory); resume from it on a fresh machine",
    )
    group.add_argument(
        "--requeue",
        dest="killsafe_requeue",
        action="store_true",
        default=None,
        help="in a SLURM job, requeue it (scontrol requeue) after the checkpoint of a stop "
        "that a signal or --stop-after caused",
    )
    group.add_argument(
        "--progress-every",
        dest="killsafe_progress_every",
        type=_duration,
        default=None,
        metavar="SECONDS",
        help="seconds between two progress lines when not on a terminal",
    )
    group.add_argument(
        "--serve",
        dest="killsafe_serve",
        nargs="?",
        const=True,
        type=_port,
        default=None,
        metavar="PORT",
        help="serve the dashboard and HTTP API on 127.0.0.1 (a free port without PORT)",
    )
    return group


def options_from_args(args: argparse.Namespace, **defaults: Any) -> dict[str, Any]:
    """The ``Run`` keyword options from parsed flags, over the script's ``defaults``."""
    options = dict(defaults)
    for dest, option in _FLAG_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None:
            options[option] = value
    if "directory" not in options:
        raise ConfigError(
            "no run directory: call killsafe.add_arguments(parser) before parsing, "
            "or pass directory= to Run.from_args"
        )
    return options


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {text!r} is not a number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value
