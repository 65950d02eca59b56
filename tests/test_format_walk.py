"""The manifest tree walker: every node of a saved tree, with its path, without loading data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from killsafe import CheckpointStore
from killsafe import format as fmt
from killsafe.errors import CorruptCheckpoint
from killsafe.format import walk as treewalk


def _manifest(tmp_path: Path, state: object) -> dict:
    with CheckpointStore(tmp_path / "checkpoints") as store:
        info = store.save(state, step=1)
    return fmt.read_manifest(info.path)


def test_walk_yields_parents_before_children_with_their_paths(tmp_path: Path) -> None:
    state = {
        "model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "steps": [1, 2.5, None],
        "by_id": {7: "seven"},
        "flag": True,
    }
    manifest = _manifest(tmp_path, state)
    paths = [node.path for node in treewalk.walk(manifest["tree"])]
    assert paths == [
        "(root)",
        "model",
        "model.w",
        "steps",
        "steps[0]",
        "steps[1]",
        "steps[2]",
        "by_id",
        "by_id[7]",
        "flag",
    ]


def test_describe_says_what_each_node_holds(tmp_path: Path) -> None:
    state = {"w": np.zeros((2, 3), dtype=np.float64), "n": 3, "x": float("nan"), "b": b"hi"}
    manifest = _manifest(tmp_path, state)
    rows = {node.path: node.describe() for node in treewalk.walk(manifest["tree"])}
    assert rows["(root)"] == {"path": "(root)", "type": "dict", "length": 4}
    assert rows["w"]["shape"] == [2, 3] and rows["w"]["size"] == 48 and "value" not in rows["w"]
    assert rows["n"]["value"] == 3
    assert rows["x"]["value"] != rows["x"]["value"]  # nan, read from its bits
    assert rows["b"]["value"] == "<2 bytes>"
    data = {node.path for node in treewalk.walk(manifest["tree"]) if node.is_data}
    assert data == {"w"}


def test_a_huge_int_is_shown_in_hex(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, {"big": 1 << 20_000})
    (big,) = [n for n in treewalk.walk(manifest["tree"]) if n.path == "big"]
    assert big.describe()["value"] == f"0x{1 << 20_000:x}"


def test_a_malformed_node_is_a_typed_error_naming_its_path() -> None:
    tree = {"type": "dict", "entries": {"a": {"type": "list", "items": [{"no": "type"}]}}}
    with pytest.raises(CorruptCheckpoint, match=r"a\[0\]"):
        list(treewalk.walk(tree))


def test_a_deep_tree_does_not_exhaust_the_stack() -> None:
    tree: dict = {"type": "none"}
    for _ in range(5000):
        tree = {"type": "list", "items": [tree]}
    assert sum(1 for _ in treewalk.walk(tree)) == 5001
