"""A checkpoint's tree as one rank of a job resumes it: its own part, the shared parts whole.

Sharded checkpoints (``killsafe.distributed.runstate``) hold modules and
optimizers once for the whole job and the rest per rank. Nothing here
imports torch until a sharded checkpoint is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from killsafe.run.tree import RNG_KEY

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo

__all__ = ["ShardedTree", "tree_of", "unwrapped"]

logger = logging.getLogger("killsafe")


class ShardedTree(Mapping[str, Any]):
    """A sharded checkpoint's tree as one rank resumes it.

    Its own part is read at once; a module or optimizer is read whole when
    it is looked up (a job loads them together instead, resharded: see
    ``GroupResume``). A rank the checkpoint has no part of (the job
    grew) takes rank 0's part without its random states.
    """

    def __init__(self, info: CheckpointInfo, rank: int, world_size: int, where: Any) -> None:
        from killsafe.distributed.runstate import KINDS_KEY, read_rank_part

        self._path = where  # its directory, or where it is in an object store
        self._shared = sorted(dict(info.metadata.get(KINDS_KEY) or {}))
        own = rank if rank < info.world_size else 0
        self._private = dict(read_rank_part(where, own))
        if info.world_size != world_size:
            self._private.pop(RNG_KEY, None)
        self._read: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name in self._private:
            return self._private[name]
        if name not in self._shared:
            raise KeyError(name)
        if name not in self._read:
            from killsafe.distributed.runstate import read_shared

            self._read.update(read_shared(self._path, [name]))
        return self._read[name]

    def __contains__(self, name: object) -> bool:
        return name in self._private or name in self._shared

    def __iter__(self) -> Iterator[str]:
        yield from self._private
        yield from self._shared

    def __len__(self) -> int:
        return len(self._private) + len(self._shared)


def tree_of(store: Any, info: CheckpointInfo, rank: int, world_size: int) -> Mapping[str, Any]:
    """The tree of ``info`` as ``rank`` of ``world_size`` resumes it (sharded or not)."""
    if info.sharded:
        if info.world_size != world_size and rank == 0:
            logger.warning(
                "resuming %s, saved by %d process(es), on %d: modules and optimizers are "
                "resharded; per-rank random states cannot carry over and stay as seeded",
                info.path,
                info.world_size,
                world_size,
            )
        from killsafe.distributed.objects import stored

        return ShardedTree(info, rank, world_size, stored(store, info.path))
    tree: Mapping[str, Any] = store.load(info)
    return tree


def unwrapped(objects: Mapping[str, Any]) -> dict[str, Any]:
    """``objects`` with DDP's wrappers replaced by the modules inside."""
    from killsafe.distributed.runstate import unwrap

    return {name: unwrap(value) for name, value in objects.items()}
