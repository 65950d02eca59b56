"""Runs of many processes: deciding together and saving shards.

- ``coordinator``: the ``Coordinator`` seam, ``Vote``, ``Agreement`` and
  ``LocalCoordinator`` (one process); no torch needed.
- ``process_group``: ``TorchCoordinator`` over ``torch.distributed``.
- ``sharded``: a storage writer, reader and planners for
  ``torch.distributed.checkpoint`` that write our format (safetensors
  layout, xxh3 checksums, JSON metadata, no pickle) and commit once.

Only this package imports ``torch.distributed``; the torch parts load when
first named.
"""

from __future__ import annotations

from typing import Any

from killsafe.distributed.coordinator import Agreement, Coordinator, LocalCoordinator, Vote, decide

__all__ = [
    "Agreement",
    "Coordinator",
    "JsonLoadPlanner",
    "JsonSavePlanner",
    "LocalCoordinator",
    "ShardedReader",
    "ShardedWriter",
    "TorchCoordinator",
    "Vote",
    "decide",
    "load_sharded",
    "save_sharded",
]

_LAZY = {
    "TorchCoordinator": "killsafe.distributed.process_group",
    "JsonLoadPlanner": "killsafe.distributed.sharded",
    "JsonSavePlanner": "killsafe.distributed.sharded",
    "ShardedReader": "killsafe.distributed.sharded",
    "ShardedWriter": "killsafe.distributed.sharded",
    "load_sharded": "killsafe.distributed.sharded",
    "save_sharded": "killsafe.distributed.sharded",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'killsafe.distributed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
