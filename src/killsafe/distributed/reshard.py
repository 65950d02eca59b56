"""Resuming a job's modules and optimizers from a sharded checkpoint: one collective load.

A sharded checkpoint holds each tracked module and optimizer once for the
whole job. Resuming in a job loads them through DCP with our reader into
the objects' own state dicts, so DCP reshards: each rank reads only the
pieces its own shards need. An FSDP2 or DTensor-sharded model gets its
shards at any world size, a DDP model (or a plain one) its whole tensors,
and a checkpoint of either layout fits the other.

An optimizer that has not stepped yet has no state to load into, so its
targets are built from the checkpoint's metadata: a state tensor shaped
like its parameter is made like the parameter (a DTensor sharded the same
way when the parameter is one), any other tensor whole; values that are
not tensors are read as JSON. ``load_state_dict`` then puts them in place.

A checkpoint of one process holds whole tensors: ``sharded_like`` slices
each rank's shards out of them, for a model whose parameters are DTensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from killsafe.distributed.objects import StoredCheckpoint
from killsafe.distributed.reader import ShardedReader
from killsafe.distributed.runstate import param_index
from killsafe.distributed.sharded import load_sharded
from killsafe.errors import StateMismatch

__all__ = ["load_shared", "saved_tables", "sharded_like"]


def saved_tables(
    directory: str | os.PathLike[str] | StoredCheckpoint, names: list[str]
) -> dict[str, Any]:
    """Each module of ``names`` as saved: its tensor keys with their global shapes.

    The values are tensors on the ``meta`` device (a shape and a dtype, no
    data), so the saved tables can be compared with the modules' own before
    any rank starts the collective load. Reads only the manifest.
    """
    metadata = _metadata(directory)
    tables: dict[str, dict[str, Any]] = {name: {} for name in names}
    for fqn, item in metadata.state_dict_metadata.items():
        path = _path(metadata, fqn)
        if len(path) == 2 and path[0] in tables and isinstance(item, TensorStorageMetadata):
            tables[str(path[0])][str(path[1])] = torch.empty(
                item.size, dtype=item.properties.dtype, device="meta"
            )
    return tables


def load_shared(
    directory: str | os.PathLike[str] | StoredCheckpoint,
    objects: Mapping[str, Any],
    coordinator: Any,
) -> None:
    """Load the modules and optimizers ``objects`` in place from ``directory``, resharded.

    Collective on ``coordinator``: every rank of the job calls it with the
    same names. Raises ``StateMismatch`` when a saved state does not fit its
    object, ``CorruptCheckpoint`` or ``RankUnresponsive`` as ``load_sharded``.
    """
    metadata = _metadata(directory)
    targets = {name: _target(name, value, metadata) for name, value in objects.items()}
    load_sharded(targets, directory, coordinator=coordinator)
    for name, value in objects.items():
        target = targets[name]
        if isinstance(value, torch.optim.Optimizer):
            target["state"] = {param_index(key): state for key, state in target["state"].items()}
        try:
            value.load_state_dict(target)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise StateMismatch(
                f"checkpoint {directory}: the saved {name!r} does not fit ({first_line}); "
                "build the objects as the run that saved it did"
            ) from None


def sharded_like(saved: Any, target: Any) -> Any:
    """A module's or optimizer's whole saved state, its tensors made DTensors like the target's.

    Where the target (a module's state or an optimizer's parameter) is a
    DTensor and the saved tensor has its global shape, each rank keeps its
    own shards of the saved tensor, sliced without communication. Anything
    else is left as it is; ``saved`` itself is not changed.
    """
    if isinstance(target, torch.optim.Optimizer) and isinstance(saved, Mapping):
        params = [param for group in target.param_groups for param in group["params"]]
        state = {
            index: _state_like(entries, params, index)
            for index, entries in dict(saved.get("state") or {}).items()
        }
        return {**saved, "state": state}
    if isinstance(target, torch.nn.Module) and isinstance(saved, Mapping):
        current = target.state_dict()
        return {key: _like(value, current.get(key)) for key, value in saved.items()}
    return saved


def _state_like(entries: Any, params: list[Any], index: Any) -> Any:
    position = param_index(index)
    if not (isinstance(position, int) and 0 <= position < len(params)):
        return entries
    if not isinstance(entries, Mapping):
        return entries
    return {key: _like(value, params[position]) for key, value in entries.items()}


def _like(value: Any, like: Any) -> Any:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not (isinstance(like, DTensor) and isinstance(value, torch.Tensor)):
        return value
    if isinstance(value, DTensor) or tuple(value.shape) != tuple(like.shape):
        return value
    whole = value.to(device=like.device)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def _metadata(directory: str | os.PathLike[str] | StoredCheckpoint) -> Metadata:
    """The checkpoint's DCP metadata (``CheckpointNotFound``, ``CorruptCheckpoint``)."""
    return ShardedReader(directory).read_metadata()


def _path(metadata: Metadata, fqn: str) -> tuple[Any, ...]:
    paths = metadata.planner_data or {}
    return tuple(paths.get(fqn, (fqn,)))


def _target(name: str, value: Any, metadata: Metadata) -> Any:
    if isinstance(value, torch.optim.Optimizer):
        return _optimizer_target(name, value, metadata)
    return value.state_dict()


def _optimizer_target(name: str, optimizer: Any, metadata: Metadata) -> dict[str, Any]:
    """The optimizer's saved state, built empty from the checkpoint for DCP to fill."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    target: dict[str, Any] = {"state": {}}
    for fqn, item in metadata.state_dict_metadata.items():
        path = _path(metadata, fqn)
        if path[0] != name:
            continue
        placeholder: Any = None  # a value read as JSON replaces it
        if isinstance(item, TensorStorageMetadata):
            param = _param_of(path, params, name)
            size, dtype = item.size, item.properties.dtype
            if param is not None and tuple(param.shape) == tuple(size):
                placeholder = torch.zeros_like(param.detach(), dtype=dtype)
            else:
                placeholder = torch.empty(size, dtype=dtype)
        set_element(target, path[1:], placeholder)
    return target


def _param_of(path: tuple[Any, ...], params: list[Any], name: str) -> Any:
    """The parameter a state tensor at ``path`` (``name.state.INDEX.KEY``) belongs to."""
    if len(path) != 4 or path[1] != "state":
        return None
    index = param_index(path[2])
    if not (isinstance(index, int) and 0 <= index < len(params)):
        raise StateMismatch(
            f"the checkpoint holds {name!r} state for parameter {path[2]}, but the optimizer "
            f"has {len(params)} parameter(s); build the optimizer as the run that saved it did"
        )
    return params[index]
