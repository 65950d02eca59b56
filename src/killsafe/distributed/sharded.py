"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), in our format.

DCP plans the save (who writes which shard of each DTensor, replicated
tensors written once, spread over the ranks) and the load (resharding to
any world size). This module is the storage underneath, with our rules:

- every rank writes one file, ``rank-NNNNN.safetensors``, in the
  safetensors layout (readable by ``safetensors`` without killsafe), and
  records an xxh3 checksum of every piece; pieces are verified on load;
- the metadata is ``manifest.json``: DCP's ``Metadata`` as plain JSON, the
  files with their sizes and checksums, and the manifest's own checksum;
- values that are not tensors are stored as JSON (our tree codec), never
  pickled; ``JsonSavePlanner`` / ``JsonLoadPlanner`` do that and the writer
  and reader refuse any other planner for such values;
- the commit is ours: the ranks write into a temporary directory next to
  the target, and only after every rank reported its files does the
  coordinator write the manifest, fsync and rename the directory into
  place. A save that failed anywhere is never visible; the checkpoints
  already there are never touched;
- into an incremental store (``incremental=True``) the ranks write the
  store's shared pieces instead of rank files, only those it lacks
  (``incremental``).

On an object store (``save_sharded(state, CheckpointStore("s3://..."))``)
no rank needs to see another's files: each uploads its own under the save
attempt's prefix and rank 0 commits by putting the manifest last,
create-only, as the store does for one process (``distributed.objects``).

``save_sharded`` and ``load_sharded`` wrap ``dcp.save`` / ``dcp.load`` with
these parts and turn DCP's errors into killsafe's.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

from killsafe import storage
from killsafe.distributed.objects import StoredCheckpoint, stored
from killsafe.distributed.planners import JsonLoadPlanner, JsonSavePlanner
from killsafe.distributed.reader import ShardedReader
from killsafe.distributed.writer import ShardedWriter, check_step
from killsafe.errors import (
    ConfigError,
    CorruptCheckpoint,
    KillsafeError,
    SaveFailed,
    StateMismatch,
    UnsupportedState,
)

if TYPE_CHECKING:
    from killsafe.store import CheckpointStore

__all__ = [
    "FullStateLoadPlanner",
    "JsonLoadPlanner",
    "JsonSavePlanner",
    "ShardedReader",
    "ShardedWriter",
    "load_full",
    "load_sharded",
    "save_sharded",
]


def save_sharded(
    state_dict: dict[str, Any],
    directory: str | os.PathLike[str] | CheckpointStore,
    *,
    coordinator: Any = None,
    step: int = 0,
    name: str | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    incremental: bool = False,
) -> Path:
    """Save ``state_dict`` (DTensors, plain tensors, JSON-able values) as one checkpoint.

    Collective: every rank calls it with its part of the state. DCP plans
    the save on ``coordinator``'s side group when it has one (a
    ``TorchCoordinator``: timeouts and the names of missing ranks), else
    on the default group, else on this process alone. Returns the committed
    directory on every rank.

    ``directory`` may be a ``CheckpointStore`` (opened at the same location
    on every rank): the checkpoint goes into it at ``step`` (and ``name``),
    as ``store.save`` would place it; on an object store each rank uploads
    its own file, so the ranks need no shared disk, and the returned path is
    the checkpoint's key in the store (``store.listed(path)`` lists it).
    With ``incremental`` (the checkpoint is in an incremental store) each
    rank writes only the pieces the store lacks instead of a rank file.

    Raises ``SaveFailed`` (nothing committed, the temporary files removed),
    ``CheckpointExists``, ``UnsupportedState``, or ``RankUnresponsive`` when
    a rank died or hangs.
    """
    _check_state(state_dict, "save_sharded")
    writer = _writer_for(
        directory,
        step=step,
        name=name,
        reason=reason,
        metrics=metrics,
        metadata=metadata,
        incremental=incremental,
    )

    def save() -> None:
        dcp.save(
            state_dict,
            storage_writer=writer,
            planner=JsonSavePlanner(),
            process_group=getattr(coordinator, "group", None),
            no_dist=_single_process(),
        )

    try:
        _guarded(coordinator, f"the save of {writer.where}", save)
    except CheckpointException as exc:
        writer.discard()
        raise _translate(
            exc,
            lambda m: SaveFailed(
                f"saving {writer.where}: {m}; nothing was committed, the earlier checkpoints stand"
            ),
        ) from None
    except KillsafeError:
        writer.discard()
        raise
    return writer.directory


def _writer_for(
    directory: str | os.PathLike[str] | CheckpointStore, *, step: int, **header: Any
) -> ShardedWriter:
    """The writer of a new checkpoint at a path, or in a store at ``step``."""
    check_step(step)
    if isinstance(directory, (str, os.PathLike)):
        return ShardedWriter(_local(directory), step=step, **header)
    from killsafe.store.naming import checkpoint_dirname, sanitize_name

    name = header.pop("name", None)
    clean = sanitize_name(name) if name is not None else None  # as store.save names it
    if directory.is_local:
        target = directory.directory / checkpoint_dirname(step, clean)
        return ShardedWriter(target, step=step, name=clean, **header)
    return ShardedWriter(None, step=step, name=clean, store=directory, **header)


def load_sharded(
    state_dict: dict[str, Any],
    directory: str | os.PathLike[str] | StoredCheckpoint,
    *,
    coordinator: Any = None,
    verify: bool = True,
    store: CheckpointStore | None = None,
) -> dict[str, Any]:
    """Load a ``save_sharded`` checkpoint into ``state_dict`` in place, resharding as needed.

    Collective, like ``save_sharded``. Tensors (DTensors included) are
    filled in place; other values are replaced. Returns ``state_dict``.
    Raises ``CheckpointNotFound``, ``CorruptCheckpoint`` (a checksum or the
    manifest is wrong), ``StateMismatch`` (keys or shapes do not fit) or
    ``RankUnresponsive``.

    With ``store`` (opened at the same location on every rank),
    ``directory`` is a reference in it: ``"latest"``, a step, a name, a
    ``CheckpointInfo`` or the checkpoint's key; on an object store the rank
    files are read in ranged reads, each rank only the pieces it needs.
    """
    _check_state(state_dict, "load_sharded")
    if store is not None:
        directory = stored(store, store.get(directory).path)
    elif not isinstance(directory, StoredCheckpoint):
        directory = _local(directory)
    reader = ShardedReader(directory, verify=verify)

    def load() -> None:
        dcp.load(
            state_dict,
            storage_reader=reader,
            planner=JsonLoadPlanner(),
            process_group=getattr(coordinator, "group", None),
            no_dist=_single_process(),
        )

    _load(reader, lambda: _guarded(coordinator, f"the load of {reader.where}", load))
    return state_dict


class FullStateLoadPlanner(JsonLoadPlanner, _EmptyStateDictLoadPlanner):
    """Builds the saved state itself, whole, from the manifest (``keys``: only these names)."""


def load_full(
    directory: str | os.PathLike[str] | StoredCheckpoint,
    *,
    keys: set[str] | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """The saved state (or its top-level ``keys``), whole tensors, read by this process alone.

    No collective: any process can call it, in a job or not. Nested as it
    was saved. Raises ``CheckpointNotFound`` or ``CorruptCheckpoint``.
    """
    reader = ShardedReader(directory, verify=verify)
    planner = FullStateLoadPlanner(keys=keys)

    def load() -> None:
        with warnings.catch_warnings():  # reading alone is the point here, not a fallback
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)

    _load(reader, load, whole=True)
    state: dict[str, Any] = planner.original_state_dict  # built by the planner, then filled
    return state


def _load(reader: ShardedReader, load: Any, *, whole: bool = False) -> None:
    """Run ``load``; DCP's failures as one killsafe error. ``whole``: the state is built
    from the manifest itself (``load_full``), so a failure is the checkpoint's."""

    def wrap(message: str) -> KillsafeError:
        if whole:
            return CorruptCheckpoint(
                f"checkpoint {reader.where}: {message}; restore another checkpoint"
            )
        return StateMismatch(
            f"loading {reader.where}: {message}; load into a state with the saved keys"
        )

    try:
        load()
    except CheckpointException as exc:
        if reader.error is not None:
            raise reader.error from None
        raise _translate(exc, wrap) from None


def _check_state(state_dict: Any, where: str) -> None:
    if not isinstance(state_dict, dict):
        raise UnsupportedState(
            f"{where} takes a dict of named values (a state dict), got "
            f"{type(state_dict).__name__}; wrap it, e.g. {{'model': model.state_dict()}}"
        )


def _local(directory: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``directory``, refused with the way to go when it is a URL (not a local path)."""
    if storage.is_url(directory):
        raise ConfigError(
            f"{os.fspath(directory)} is a URL; pass store=CheckpointStore(URL) to load_sharded "
            "(or the store itself to save_sharded), opened on every rank"
        )
    return directory


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def _guarded(coordinator: Any, what: str, call: Any) -> None:
    guard = getattr(coordinator, "guard", None)
    if guard is None:
        call()
    else:
        guard(what, call)


def _translate(exc: CheckpointException, wrap: Any) -> KillsafeError:
    """DCP's per-rank failures as one killsafe error: a killsafe error of the lowest rank
    as it is, anything else wrapped (``wrap(message)``) with its rank and first line."""
    failures = sorted(exc.failures.items())
    for _, (error, _trace) in failures:
        if isinstance(error, KillsafeError):
            return error
    rank, (error, _trace) = failures[0]
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    error = wrap(f"rank {rank} failed: {type(error).__name__}: {first_line}")
    return error
