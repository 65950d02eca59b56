"""``killsafe consolidate CKPT OUT``: a sharded checkpoint as one process's, and its weights."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from killsafe.cli.common import EXIT_OK, Commands, existing_directory
from killsafe.errors import ConfigError


def add_commands(commands: Commands) -> None:
    p = commands.add_parser(
        "consolidate",
        help="write a sharded checkpoint as a one-process checkpoint (and its weights)",
        description="Read checkpoint CKPT, saved by many processes, and write OUT: a "
        "one-process checkpoint with every module and optimizer whole and rank 0's own "
        "state (a one-process run resumes from it), and OUT.safetensors with the "
        "modules' weights, readable by safetensors alone. Needs torch.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a sharded checkpoint directory")
    p.add_argument("out", type=Path, metavar="OUT", help="the new checkpoint directory")
    p.add_argument("--no-weights", action="store_true", help="do not write OUT.safetensors")
    p.set_defaults(handler=_cmd_consolidate)


def _cmd_consolidate(args: argparse.Namespace) -> int:
    existing_directory(
        args.checkpoint, "a checkpoint directory (such as DIR/checkpoints/step-000100)"
    )
    try:
        from killsafe.distributed.runstate import consolidate
    except ImportError as exc:
        raise ConfigError(
            f"consolidate needs torch ({exc}); install it: pip install 'killsafe[torch]'"
        ) from exc
    out, weights = consolidate(args.checkpoint, args.out, weights=not args.no_weights)
    sys.stdout.write(f"wrote {out}\n")
    if weights is not None:
        sys.stdout.write(f"wrote {weights}\n")
    return EXIT_OK
