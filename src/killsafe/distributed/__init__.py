"""Runs of many processes: deciding together and saving shards.

- ``coordinator``: the ``Coordinator`` seam, ``Vote``, ``Agreement`` and
  ``LocalCoordinator`` (one process); no torch needed.
- ``process_group``: ``TorchCoordinator`` over ``torch.distributed``.
- ``sharded``: ``save_sharded`` / ``load_sharded`` through
  ``torch.distributed.checkpoint`` with our storage ``writer``, ``reader``,
  ``manifest`` and JSON ``planners``: safetensors layout, xxh3 checksums,
  JSON metadata, no pickle, one commit; ``incremental``: the ranks' bytes
  as the shared pieces of an incremental store; ``objects``: the same into
  an object store, each rank uploading its own file (nodes without a shared
  disk).

Only this package imports ``torch.distributed``; the torch parts load when
first named.
"""

from __future__ import annotations

from typing import Any

from killsafe.distributed.coordinator import (
    Agreement,
    Coordinator,
    LocalCoordinator,
    Pending,
    PendingAgreement,
    Vote,
    decide,
)

__all__ = [
    "Agreement",
    "Coordinator",
    "JsonLoadPlanner",
    "JsonSavePlanner",
    "LocalCoordinator",
    "Pending",
    "PendingAgreement",
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
    "JsonLoadPlanner": "killsafe.distributed.planners",
    "JsonSavePlanner": "killsafe.distributed.planners",
    "ShardedReader": "killsafe.distributed.reader",
    "ShardedWriter": "killsafe.distributed.writer",
    "load_sharded": "killsafe.distributed.sharded",
    "save_sharded": "killsafe.distributed.sharded",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'killsafe.distributed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
