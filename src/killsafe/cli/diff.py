"""``killsafe diff A B``: two checkpoints side by side, tensors compared chunk by chunk."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING, Any

from killsafe.cli.common import (
    EXIT_OK,
    Commands,
    add_json_flag,
    format_time,
    number,
    print_json,
    print_table,
)
from killsafe.cli.locations import Checkpoint, path_or_url
from killsafe.cli.tree import checkpoint_summary, open_checkpoint

if TYPE_CHECKING:
    from killsafe.format.walk import TreeNode

_CHUNK_ELEMENTS = 1 << 20  # compare tensors a million elements at a time


def add_commands(commands: Commands) -> None:
    p = commands.add_parser(
        "diff",
        help="two checkpoints side by side: metadata, metrics, and what changed",
        description="Compare checkpoints A and B: metadata and metrics, the paths only in "
        "one, and for every value in both whether it changed (for tensors and arrays, the "
        "largest absolute difference). Tensors are loaded one pair at a time, memory-mapped.",
    )
    p.add_argument("a", type=path_or_url, metavar="A", help="a checkpoint directory or URL")
    p.add_argument("b", type=path_or_url, metavar="B", help="another checkpoint directory or URL")
    add_json_flag(p)
    p.set_defaults(handler=_cmd_diff)


def _cmd_diff(args: argparse.Namespace) -> int:
    a, b = open_checkpoint(args.a), open_checkpoint(args.b)
    manifests = a.manifest, b.manifest
    summaries = [checkpoint_summary(c.where, c.manifest) for c in (a, b)]
    result: dict[str, Any] = {
        "a": summaries[0],
        "b": summaries[1],
        "fields": _changed_fields(summaries),
        "metrics": _compare_mapping(manifests[0]["metrics"], manifests[1]["metrics"]),
        "metadata": _compare_mapping(manifests[0]["metadata"], manifests[1]["metadata"]),
    }
    result.update(_compare_trees(a, b))
    if args.json:
        print_json(result)
    else:
        _write_diff_text(result)
    return EXIT_OK


def _changed_fields(summaries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    a, b = summaries
    keys = ("step", "name", "reason", "created", "format_version", "size")
    return {k: {"a": a[k], "b": b[k]} for k in keys if a[k] != b[k]}


def _compare_mapping(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every key of either side: both values, and the change of numbers."""
    rows: dict[str, dict[str, Any]] = {}
    for key in list(a) + [k for k in b if k not in a]:
        row: dict[str, Any] = {"a": a.get(key), "b": b.get(key)}
        if key not in a or key not in b:
            row["only_in"] = "a" if key in a else "b"
        elif number(a[key]) is not None and number(b[key]) is not None:
            row["delta"] = float(b[key]) - float(a[key])
        row["changed"] = a.get(key) != b.get(key) or "only_in" in row
        rows[key] = row
    return rows


def _compare_trees(checkpoint_a: Checkpoint, checkpoint_b: Checkpoint) -> dict[str, Any]:
    from killsafe.format.walk import CONTAINERS, walk

    tree_a, tree_b = checkpoint_a.manifest["tree"], checkpoint_b.manifest["tree"]
    leaves_a = {leaf.path: leaf for leaf in walk(tree_a, whole_generators=True)}
    leaves_b = {leaf.path: leaf for leaf in walk(tree_b, whole_generators=True)}
    values = []
    for path, leaf_a in leaves_a.items():
        leaf_b = leaves_b.get(path)
        if leaf_b is None or (
            leaf_a.generator is None and leaf_a.kind in CONTAINERS and leaf_b.kind == leaf_a.kind
        ):
            continue
        row = _compare_leaf(checkpoint_a, checkpoint_b, leaf_a, leaf_b)
        values.append({**row, "part": _part(leaf_a)})
    return {
        "only_in_a": [p for p in leaves_a if p not in leaves_b],
        "only_in_b": [p for p in leaves_b if p not in leaves_a],
        "values": values,
        "changed": _changed_counts(values),
    }


_PARTS = ("tensors", "plain values", "generator states")


def _part(leaf: TreeNode) -> str:
    """Which count a compared value goes to: tensors (and arrays, bytes), plain values,
    or random generator states (which differ between runs that do not seed them)."""
    if leaf.generator is not None:
        return "generator states"
    return "tensors" if leaf.is_data else "plain values"


def _changed_counts(values: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    counts = {part: {"changed": 0, "total": 0} for part in _PARTS}
    for row in values:
        counts[row["part"]]["total"] += 1
        counts[row["part"]]["changed"] += bool(row.get("changed"))
    return counts


def _compare_leaf(
    checkpoint_a: Checkpoint,
    checkpoint_b: Checkpoint,
    a: TreeNode,
    b: TreeNode,
) -> dict[str, Any]:
    row: dict[str, Any] = {"path": a.path, "type": a.kind}
    described_a, described_b = a.describe(), b.describe()
    for key in ("dtype", "shape"):
        if key in described_a or key in described_b:
            row[key] = described_a.get(key)
            if described_a.get(key) != described_b.get(key):
                row[f"{key}_b"] = described_b.get(key)
    if a.kind != b.kind:
        row.update(changed=True, type_b=b.kind)
    elif a.generator is not None or b.generator is not None:
        row["type"] = "random state"
        row["changed"] = _generator_changed(checkpoint_a, checkpoint_b, a, b)
    elif not a.is_data and not b.is_data:
        row["changed"] = a.node != b.node
        if row["changed"] and "value" in described_a:
            row.update(a=described_a["value"], b=described_b.get("value"))
    elif "dtype_b" in row or "shape_b" in row:
        row["changed"] = True
    else:
        row.update(_compare_data(checkpoint_a, checkpoint_b, a, b))
    return row


def _generator_changed(
    checkpoint_a: Checkpoint,
    checkpoint_b: Checkpoint,
    a: TreeNode,
    b: TreeNode,
) -> bool:
    """Whether two random states differ: their plain parts, and the data they hold."""
    from killsafe.format.walk import CONTAINERS, walk

    inner_a = {leaf.parts: leaf for leaf in walk(a.node)}
    inner_b = {leaf.parts: leaf for leaf in walk(b.node)}
    if inner_a.keys() != inner_b.keys():
        return True
    for parts, leaf_a in inner_a.items():
        leaf_b = inner_b[parts]
        if leaf_a.kind in CONTAINERS and leaf_a.kind == leaf_b.kind:
            continue  # their children are compared
        if not (leaf_a.is_data and leaf_b.is_data):
            if leaf_a.node != leaf_b.node:
                return True
        elif _compare_data(checkpoint_a, checkpoint_b, leaf_a, leaf_b)["changed"]:
            return True
    return False


def _compare_data(
    checkpoint_a: Checkpoint,
    checkpoint_b: Checkpoint,
    a: TreeNode,
    b: TreeNode,
) -> dict[str, Any]:
    """Load one pair (memory-mapped, checksums verified) and measure the difference."""
    value_a = _read_leaf(checkpoint_a, a)
    value_b = _read_leaf(checkpoint_b, b)
    if isinstance(value_a, (bytes, bytearray)):
        return {"changed": value_a != value_b}
    changed, largest = _difference(value_a, value_b)
    return {"changed": changed, "max_abs_diff": largest}


def _read_leaf(checkpoint: Checkpoint, leaf: TreeNode) -> Any:
    """The value of one tensor, array or bytes node, and nothing else of the checkpoint.

    The node is decoded as a tree of its own (so any key works, dots and int
    keys included, unlike a dotted ``subtree``); memory-mapped, only its bytes
    are touched and their checksum verified.
    """
    return checkpoint.read({**checkpoint.manifest, "tree": leaf.node})


def _difference(a: Any, b: Any) -> tuple[bool, float | None]:
    """(changed, largest |a - b|) of two same-shape tensors or arrays, chunk by chunk.

    NaN against NaN is no change; NaN against a number an infinite difference.
    Arrays that are not numbers (strings, dates) give ``(changed, None)``.
    """
    if type(a).__module__.startswith("torch"):
        return _torch_difference(a, b)
    return _numpy_difference(a, b)


def _torch_difference(a: Any, b: Any) -> tuple[bool, float | None]:
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    changed, largest = False, 0.0
    for start in range(0, flat_a.numel(), _CHUNK_ELEMENTS):
        x = flat_a[start : start + _CHUNK_ELEMENTS]
        y = flat_b[start : start + _CHUNK_ELEMENTS]
        if not x.is_complex():
            x, y = x.double(), y.double()
        same = (x == y) | (x.isnan() & y.isnan())
        if bool(same.all()):
            continue
        changed = True
        difference = (x - y).abs()[~same].nan_to_num(nan=math.inf, posinf=math.inf)
        largest = max(largest, float(difference.max()))
    return changed, largest


def _numpy_difference(a: Any, b: Any) -> tuple[bool, float | None]:
    import numpy as np

    if a.dtype.kind not in "biufc":
        return not np.array_equal(a, b), None
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    changed, largest = False, 0.0
    wide = np.complex128 if a.dtype.kind == "c" else np.float64
    for start in range(0, flat_a.size, _CHUNK_ELEMENTS):
        x = flat_a[start : start + _CHUNK_ELEMENTS].astype(wide)
        y = flat_b[start : start + _CHUNK_ELEMENTS].astype(wide)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        if same.all():
            continue
        changed = True
        difference = np.nan_to_num(np.abs(x - y)[~same], nan=math.inf)
        largest = max(largest, float(difference.max()))
    return changed, largest


def _write_diff_text(result: dict[str, Any]) -> None:
    out = sys.stdout
    for side in ("a", "b"):
        info = result[side]
        name = f", name {info['name']}" if info["name"] else ""
        out.write(f"{side.upper()}: {info['path']} (step {info['step']}{name})\n")
    if result["fields"]:
        out.write("\nfields:\n")
        for key, row in result["fields"].items():
            a, b = row["a"], row["b"]
            if key == "created":
                a, b = format_time(a), format_time(b)
            out.write(f"  {key}: {a} -> {b}\n")
    for section in ("metrics", "metadata"):
        rows = {k: r for k, r in result[section].items() if r["changed"]}
        if rows:
            out.write(f"\n{section}:\n")
            for key, row in rows.items():
                out.write(f"  {key}: {_change_text(row)}\n")
    out.write("\nstate:\n")
    for side in ("a", "b"):
        for path in result[f"only_in_{side}"]:
            out.write(f"  only in {side.upper()}: {path}\n")
    table = []
    for row in result["values"]:
        table.append([row["path"], row["type"], _value_change_text(row)])
    if table:
        print_table(["path", "type", "change"], table)
    counts = ", ".join(
        f"{count['changed']} of {count['total']} {part}"
        for part, count in result["changed"].items()
    )
    out.write(
        f"\nchanged: {counts}; "
        f"{len(result['only_in_a'])} only in A, {len(result['only_in_b'])} only in B\n"
    )


def _change_text(row: dict[str, Any]) -> str:
    if "only_in" in row:
        side = row["only_in"]
        return f"only in {side.upper()} ({row[side]!r})"
    text = f"{_short(row['a'])} -> {_short(row['b'])}"
    if "delta" in row:
        text += f" ({row['delta']:+.4g})"
    return text


def _value_change_text(row: dict[str, Any]) -> str:
    if row.get("changed") is None:
        return row.get("note", "not compared")
    if "type_b" in row:
        return f"type {row['type']} -> {row['type_b']}"
    parts = []
    for key in ("dtype", "shape"):
        if f"{key}_b" in row:
            parts.append(f"{key} {row[key]} -> {row[f'{key}_b']}")
    if parts:
        return "; ".join(parts)
    if not row["changed"]:
        return "same"
    if "max_abs_diff" in row and row["max_abs_diff"] is not None:
        return f"changed, max abs diff {row['max_abs_diff']:.6g}"
    if "a" in row:
        return f"{_short(row['a'])} -> {_short(row['b'])}"
    return "changed"


def _short(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
