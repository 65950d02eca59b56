"""``killsafe export CKPT OUT.safetensors``: a checkpoint's tensors as one safetensors file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from killsafe.cli.common import EXIT_OK, Commands, existing_directory, format_size


def add_commands(commands: Commands) -> None:
    p = commands.add_parser(
        "export",
        help="write a checkpoint's tensors into one self-contained safetensors file",
        description="Read checkpoint CKPT (a single tensor file, or pieces shared by an "
        "incremental store), verify its bytes and write every tensor, array and large "
        "bytes value into OUT, one safetensors file readable without killsafe. The keys "
        "are the checkpoint's entry keys (`killsafe inspect CKPT` shows the tree).",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="a checkpoint directory")
    p.add_argument("out", type=Path, metavar="OUT", help="the safetensors file to write")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from killsafe.format import export_tensors

    existing_directory(
        args.checkpoint, "a checkpoint directory (such as DIR/checkpoints/step-000100)"
    )
    size = export_tensors(args.checkpoint, args.out)
    sys.stdout.write(f"wrote {args.out} ({format_size(size)})\n")
    return EXIT_OK
