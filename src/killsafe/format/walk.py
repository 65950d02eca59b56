"""Walking the state tree of a checked manifest without loading a tensor.

``walk(tree)`` yields every node of a manifest's ``tree`` (validated by
``format.read_manifest`` against ``schema``) with its path, parents before
children; ``TreeNode.describe()`` says what the node holds as plain data
(type, dtype, shape, bytes, and the value of scalars, read with format's own
``int_value``/``float_value``). The command line's ``inspect`` and ``diff``
use it, so a new node type is taught here once, next to the decoder.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from killsafe.errors import CorruptCheckpoint
from killsafe.format.codec import float_value, int_value

__all__ = [
    "CONTAINERS",
    "NO_VALUE",
    "RNG_KEY",
    "TreeNode",
    "generator_label",
    "node_nbytes",
    "plain_value",
    "walk",
]

CONTAINERS = ("dict", "list", "tuple", "set", "frozenset")
NO_VALUE: Any = object()
"""``plain_value`` of a node that is not a scalar."""

_TORCH_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8,
    "complex32": 4, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint64": 8, "uint32": 4,
    "uint16": 2, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}  # fmt: skip
RNG_KEY = "__rng__"
"""Where a run saves the random states it restores (python, numpy, torch, cuda)."""
_TRACKED_GENERATOR_KEYS = frozenset({"generator", "state", "device"})
_MAX_DECIMAL_BITS = 13_000  # about 3,900 digits: below Python's int-to-str limit

Part = str | int
Child = tuple[tuple[Part, ...], Any]


@dataclass(frozen=True)
class TreeNode:
    """One node of a saved state tree, as the manifest describes it."""

    parts: tuple[Part, ...]  # dict keys and list indices from the root
    node: dict[str, Any]
    generator: str | None = None  # a random generator's state, walked as one node

    @property
    def path(self) -> str:
        """``optimizer.state[0].exp_avg``; ``(root)`` for the root."""
        return path_text(self.parts)

    @property
    def kind(self) -> str:
        return str(self.node.get("type"))

    @property
    def is_data(self) -> bool:
        """A tensor, an array or bytes stored in the tensor file."""
        return self.kind in ("tensor", "ndarray") or "entry" in self.node

    def describe(self) -> dict[str, Any]:
        """Path, type, and what applies of length, dtype, shape, size, entry and value.

        A random generator's state is one summary: ``{"type": "random state",
        "generator": ..., "ints": ..., "size": ...}`` (ints and bytes of data in it).
        """
        if self.generator is not None:
            return self._describe_generator()
        node = self.node
        row: dict[str, Any] = {"path": self.path, "type": self.kind}
        if self.kind in CONTAINERS:
            row["length"] = len(node.get("entries") or node.get("items") or [])
        if "dtype" in node:
            row["dtype"] = node["dtype"]
        if "shape" in node:
            row["shape"] = list(node["shape"])
        size = node_nbytes(node)
        if size is not None:
            row["size"] = size
        if "entry" in node:
            row["entry"] = node["entry"]
        value = plain_value(node)
        if value is not NO_VALUE:
            row["value"] = value
        return row

    def _describe_generator(self) -> dict[str, Any]:
        ints, size = 0, 0
        for inner in walk(self.node):
            ints += inner.kind == "int"
            size += node_nbytes(inner.node) or 0
        row: dict[str, Any] = {"path": self.path, "type": "random state"}
        row.update(generator=self.generator, ints=ints, size=size)
        return row


def generator_label(parts: tuple[Part, ...], node: dict[str, Any]) -> str | None:
    """The name of the random generator whose state ``node`` is, or None.

    Two kinds: a run's own ``__rng__.python/numpy/torch/cuda``, and a tracked
    generator saved as ``{"generator": KIND, "state": ...}`` (``KIND`` is the name).
    """
    if len(parts) == 2 and parts[0] == RNG_KEY:
        return str(parts[1])
    entries = node.get("entries")
    if node.get("type") != "dict" or not isinstance(entries, dict):
        return None
    kind = entries.get("generator")
    if "state" not in entries or not set(entries) <= _TRACKED_GENERATOR_KEYS:
        return None
    if not isinstance(kind, dict) or kind.get("type") != "str":
        return None
    return str(kind.get("value"))


def path_text(parts: tuple[Part, ...]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(root)"


def walk(tree: Any, *, whole_generators: bool = False) -> Iterator[TreeNode]:
    """Every node of a manifest tree, parents before children.

    With ``whole_generators``, a random generator's state (``generator_label``)
    is one node, its parts not walked. Raises ``CorruptCheckpoint`` naming the
    path of a node that is not one.
    """
    stack: list[Child] = [((), tree)]
    while stack:
        parts, node = stack.pop()
        if not isinstance(node, dict) or "type" not in node:
            raise CorruptCheckpoint(f"the state tree is malformed at {path_text(parts)}")
        label = generator_label(parts, node) if whole_generators else None
        yield TreeNode(parts, node, label)
        if label is None:
            stack.extend(reversed(list(_children(parts, node))))


def _children(parts: tuple[Part, ...], node: dict[str, Any]) -> Iterator[Child]:
    kind = node["type"]
    if kind == "dict" and isinstance(node.get("entries"), dict):
        for key, child in node["entries"].items():
            yield (*parts, key), child
    elif kind == "dict":
        for key_node, child in node.get("items") or []:
            yield (*parts, _key_part(key_node)), child
    elif kind in CONTAINERS:
        for index, child in enumerate(node.get("items") or []):
            yield (*parts, index), child


def _key_part(key_node: dict[str, Any]) -> Part:
    key = plain_value(key_node)
    return key if isinstance(key, (int, str)) and not isinstance(key, bool) else str(key)


def plain_value(node: dict[str, Any]) -> Any:
    """The value of a scalar node (int, float, str, bool, None, small bytes), else ``NO_VALUE``.

    Bytes and numpy scalars are described (``<12 bytes>``), not decoded.
    """
    kind = node.get("type")
    if kind == "none":
        return None
    if kind in ("bool", "str"):
        return node.get("value")
    if kind == "int":
        return _shown_int(int_value(node))
    if kind == "float":
        return float_value(node)
    if kind == "bytes" and "base64" in node:
        return f"<{len(base64.b64decode(node['base64']))} bytes>"
    if kind == "npscalar":
        return f"<numpy {node.get('dtype')}>"
    return NO_VALUE


def _shown_int(value: int) -> int | str:
    """``value``, or its hex text (``0x...``) when too long for decimal (and for JSON)."""
    if value.bit_length() <= _MAX_DECIMAL_BITS:
        return value
    return f"-0x{-value:x}" if value < 0 else f"0x{value:x}"


def node_nbytes(node: dict[str, Any]) -> int | None:
    """Bytes of a tensor, array or stored bytes node; ``None`` when not known or not data."""
    kind = node.get("type")
    shape = node.get("shape")
    if kind == "bytes":
        return int(node["size"]) if "size" in node else None
    if not isinstance(shape, list):
        return None
    count = 1
    for n in shape:
        count *= int(n)
    itemsize = _itemsize(kind, str(node.get("dtype")))
    return None if itemsize is None else count * itemsize


def _itemsize(kind: Any, dtype: str) -> int | None:
    if kind == "tensor":
        return _TORCH_ITEMSIZE.get(dtype)
    # numpy dtype strings: "<f4", "|b1", "<U8" (4 bytes a character)
    digits = "".join(c for c in dtype.split("[")[0] if c.isdigit())
    return int(digits) * (4 if "U" in dtype else 1) if digits else None
