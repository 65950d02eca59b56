"""``killsafe inspect CKPT``: a checkpoint's metadata and state tree, without loading tensors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from killsafe.cli.common import (
    EXIT_OK,
    MANIFEST_FILE,
    Commands,
    add_json_flag,
    existing_directory,
    format_metrics,
    format_size,
    format_time,
    print_json,
    print_table,
)
from killsafe.cli.locations import (
    Checkpoint,
    Place,
    open_local_checkpoint,
    open_url_checkpoint,
    path_or_url,
)
from killsafe.errors import ConfigError
from killsafe.rundir import CHECKPOINTS_DIR, json_default


def open_checkpoint(place: Place) -> Checkpoint:
    """The checkpoint at a path or URL, its manifest checked (bad input otherwise)."""
    if isinstance(place, str):
        return open_url_checkpoint(place)
    return open_local_checkpoint(place, read_checkpoint_manifest(place))


def read_checkpoint_manifest(path: Path) -> dict[str, Any]:
    """The validated manifest of checkpoint directory ``path`` (bad input otherwise)."""
    from killsafe.format import read_manifest

    existing_directory(path, "a checkpoint directory (such as DIR/checkpoints/step-000100)")
    if not (path / MANIFEST_FILE).exists() and (
        (path / CHECKPOINTS_DIR).is_dir() or any(p.name.startswith("step-") for p in path.iterdir())
    ):
        raise ConfigError(
            f"{path} holds checkpoints; give one of them (`killsafe list {path}` shows them)"
        )
    return read_manifest(path)


def add_commands(commands: Commands) -> None:
    p = commands.add_parser(
        "inspect",
        help="a checkpoint's metadata and state tree, without loading tensors",
        description="Show the metadata of checkpoint CKPT and its state tree: every "
        "value's path and type, and the dtype, shape and size of tensors and arrays; "
        "a random generator's state is one line. Reads the manifest only.",
    )
    p.add_argument(
        "checkpoint",
        type=path_or_url,
        metavar="CKPT",
        help="a checkpoint directory, or its URL (s3://bucket/prefix/step-000100)",
    )
    add_json_flag(p)
    p.set_defaults(handler=_cmd_inspect)


def checkpoint_summary(path: Path | str, manifest: dict[str, Any]) -> dict[str, Any]:
    from killsafe.format import checkpoint_nbytes
    from killsafe.format.manifest import added_nbytes

    files = {
        name: {"size": info["size"], "xxh3": info["xxh3"]}
        for name, info in manifest["files"].items()
    }
    if "world_size" in manifest:  # sharded: the rank of every file too
        for name, info in manifest["files"].items():
            files[name]["rank"] = info["rank"]
    shards = {  # sharded into an incremental store: each rank's bytes are shared pieces
        name: {"rank": shard["rank"], "added": shard["added"]}
        for name, shard in manifest.get("shards", {}).items()
    }
    size = checkpoint_nbytes(manifest)
    summary = {
        "path": str(path),
        "step": manifest["step"],
        "name": manifest["name"],
        "reason": manifest["reason"],
        "created": manifest["created"],
        "format_version": manifest["format_version"],
        "size": size,
        "added": added_nbytes(manifest) or size,
        "files": files,
        "metrics": manifest["metrics"],
        "metadata": manifest["metadata"],
    }
    if "world_size" in manifest:
        summary["world_size"] = manifest["world_size"]
    if shards:
        summary["shards"] = shards
    return summary


def _sharded_nodes(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """A sharded checkpoint's saved keys (DCP's flat names): tensors with dtype and shape."""
    nodes = []
    for key, item in manifest["dcp"]["state"].items():
        if item.get("kind") == "tensor":
            nodes.append(
                {"path": key, "type": "tensor", "dtype": item["dtype"], "shape": item["size"]}
            )
        else:
            nodes.append({"path": key, "type": "value"})
    return nodes


def _cmd_inspect(args: argparse.Namespace) -> int:
    from killsafe.format.walk import walk

    checkpoint = open_checkpoint(args.checkpoint)
    manifest = checkpoint.manifest
    summary = checkpoint_summary(checkpoint.where, manifest)
    if "world_size" in manifest:
        nodes = _sharded_nodes(manifest)
    else:
        nodes = [leaf.describe() for leaf in walk(manifest["tree"], whole_generators=True)]
    if args.json:
        print_json({**summary, "tree": nodes})
        return EXIT_OK
    out = sys.stdout
    for key in ("path", "step", "name", "reason"):
        out.write(f"{key + ':':<10}{'' if summary[key] is None else summary[key]}\n")
    out.write(f"{'created:':<10}{format_time(summary['created'])}\n")
    out.write(f"{'format:':<10}{summary['format_version']}\n")
    files = ", ".join(f"{n} {format_size(f['size'])}" for n, f in summary["files"].items())
    out.write(f"{'size:':<10}{format_size(summary['size'])}{f' ({files})' if files else ''}\n")
    if summary["added"] != summary["size"]:
        pieces = len(manifest.get("pieces", ()))
        added = format_size(summary["added"])
        out.write(f"{'added:':<10}{added} written by this save ({pieces} shared pieces in all)\n")
    if "shards" in summary:
        added = ", ".join(
            f"rank {s['rank']} {format_size(s['added'])}" for s in summary["shards"].values()
        )
        world = summary["world_size"]
        out.write(f"{'sharded:':<10}world size {world}, shared pieces; added by {added}\n")
    elif "world_size" in summary:
        out.write(f"{'sharded:':<10}world size {summary['world_size']}, one file per rank\n")
    out.write(f"{'metrics:':<10}{format_metrics(summary['metrics'])}\n")
    if summary["metadata"]:
        metadata = json.dumps(summary["metadata"], default=json_default)
        out.write(f"{'metadata:':<10}{metadata}\n")
    out.write("\n")
    print_table(["path", "type", "dtype", "shape", "size", "value"], _tree_rows(nodes))
    return EXIT_OK


def _tree_rows(nodes: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for node in nodes:
        kind = node["type"]
        if "length" in node:
            kind += f" ({node['length']})"
        value = ""
        if kind == "random state":
            value = node["generator"] + (f", {node['ints']} ints" if node["ints"] else "")
        elif "value" in node:
            value = repr(node["value"]) if node["type"] == "str" else str(node["value"])
            value = value if len(value) <= 40 else value[:37] + "..."
        rows.append(
            [
                node["path"],
                kind,
                str(node.get("dtype", "")),
                str(node["shape"]) if "shape" in node else "",
                format_size(node["size"]) if _shows_size(node) else "",
                value,
            ]
        )
    return rows


def _shows_size(node: dict[str, Any]) -> bool:
    """Tensors and arrays show their bytes, empty ones too; random states only data they hold."""
    return bool(node.get("size")) if node["type"] == "random state" else "size" in node
