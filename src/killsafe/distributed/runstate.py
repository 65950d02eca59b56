"""A ``Run``'s checkpoint across the ranks of a process group.

The tree a run saves is split in two:

- **shared**: tracked ``torch.nn.Module`` and ``torch.optim.Optimizer``
  objects, as their ``state_dict()``. DCP plans them: a tensor every rank
  holds (DDP's replicas) is written once, by one rank, the ranks sharing
  the work; a DTensor's shards by the ranks that own them.
- **per rank**: everything else (the random generators, the data position,
  samplers, plain values, the run's own counters), captured and encoded as
  one JSON value under ``__rank_NNNNN__``, written by its rank.

Reading needs no collective: every rank reads the shared objects whole
(``read_shared``), and its own part (``read_rank_part``), straight from the
files. ``consolidate`` turns a sharded checkpoint into a one-process one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from killsafe.distributed.objects import StoredCheckpoint
from killsafe.distributed.planners import decode_value, encode_value
from killsafe.distributed.sharded import load_full, save_sharded
from killsafe.errors import CheckpointExists, CheckpointNotFound, CorruptCheckpoint

if TYPE_CHECKING:
    from killsafe.store import CheckpointStore

__all__ = [
    "KINDS_KEY",
    "StagedTree",
    "consolidate",
    "is_shared",
    "param_index",
    "rank_key",
    "read_rank_part",
    "read_shared",
    "save_run_tree",
    "save_staged",
    "shared_kinds",
    "stage_run_tree",
    "unwrap",
]

KINDS_KEY = "shared"
"""Manifest metadata: the shared names and their kind (``module`` or ``optimizer``)."""


def rank_key(rank: int) -> str:
    """The key of ``rank``'s own part of the state."""
    return f"__rank_{rank:05d}__"


def is_shared(value: Any) -> bool:
    """Whether DCP saves ``value`` (a torch module or optimizer) rather than its rank."""
    return _kind(value) is not None


def _kind(value: Any) -> str | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if isinstance(value, torch.nn.Module):
        return "module"
    if isinstance(value, torch.optim.Optimizer):
        return "optimizer"
    return None


def unwrap(value: Any) -> Any:
    """The module inside DDP's wrapper (its state is saved without ``module.``), else ``value``.

    So a checkpoint of a DDP job fits the same module with or without DDP.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.nn.parallel.DistributedDataParallel):
        return value.module
    return value


def shared_kinds(tree: dict[str, Any]) -> dict[str, str]:
    """The shared names of ``tree`` and their kinds."""
    kinds = {name: _kind(value) for name, value in tree.items()}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def save_run_tree(
    tree: dict[str, Any],
    directory: str | os.PathLike[str] | CheckpointStore,
    coordinator: Any,
    *,
    step: int,
    name: str | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    incremental: bool = False,
) -> Path:
    """Save a run's tree as one sharded checkpoint; collective (see ``save_sharded``)."""
    return save_staged(
        stage_run_tree(tree, coordinator.rank, copy=False),
        directory,
        coordinator,
        step=step,
        name=name,
        reason=reason,
        metrics=metrics,
        metadata=metadata,
        incremental=incremental,
    )


class StagedTree:
    """A run's tree made ready for ``save_staged``: the state DCP saves and the kinds."""

    def __init__(self, state: dict[str, Any], kinds: dict[str, str]) -> None:
        self.state = state
        self.kinds = kinds


def stage_run_tree(tree: dict[str, Any], rank: int, *, copy: bool = True) -> StagedTree:
    """``tree`` as ``rank`` saves it: the shared objects' state dicts and its own part.

    With ``copy`` every tensor is copied, so the training may go on while
    the copy is written (the only part of a background save that blocks).
    """
    from killsafe.state import capture

    kinds = shared_kinds(tree)
    state: dict[str, Any] = {name: unwrap(tree[name]).state_dict() for name in kinds}
    if copy:
        state = _copied(state)
    private = capture({key: value for key, value in tree.items() if key not in kinds})
    key = rank_key(rank)
    state[key] = encode_value(private, key)
    return StagedTree(state, kinds)


def _copied(value: Any) -> Any:
    """``value`` with each tensor in it replaced by a detached copy (DTensors stay DTensors)."""
    torch = sys.modules["torch"]
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value


def save_staged(
    staged: StagedTree,
    directory: str | os.PathLike[str] | CheckpointStore,
    coordinator: Any,
    *,
    step: int,
    name: str | None = None,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    incremental: bool = False,
) -> Path:
    """Write a staged tree as one sharded checkpoint; collective on ``coordinator``
    (``incremental``: as pieces shared in the store, see ``save_sharded``)."""
    return save_sharded(
        staged.state,
        directory,
        coordinator=coordinator,
        step=step,
        name=name,
        reason=reason,
        metrics=metrics,
        metadata={**(metadata or {}), KINDS_KEY: staged.kinds},
        incremental=incremental,
    )


def read_shared(
    directory: str | os.PathLike[str] | StoredCheckpoint, names: list[str]
) -> dict[str, Any]:
    """The shared objects ``names`` as whole state dicts, read by this process alone."""
    if not names:
        return {}
    state = load_full(directory, keys=set(names))
    for value in state.values():
        if isinstance(value, dict) and "param_groups" in value:
            value.setdefault("state", {})  # an optimizer with no state (plain SGD): none saved
        if isinstance(value, dict) and isinstance(value.get("state"), dict):
            # an optimizer's: DCP's flattening wrote its parameter ids as text
            value["state"] = {param_index(k): v for k, v in value["state"].items()}
    return state


def param_index(key: Any) -> Any:
    """An optimizer's state key as ``state_dict()`` has it (DCP's flattening made it text)."""
    return int(key) if isinstance(key, str) and key.isdigit() else key


def read_rank_part(
    directory: str | os.PathLike[str] | StoredCheckpoint, rank: int
) -> dict[str, Any]:
    """What ``rank`` saved of its own (``CheckpointNotFound`` when it saved none)."""
    key = rank_key(rank)
    found = load_full(directory, keys={key})
    if key not in found:
        raise CheckpointNotFound(f"checkpoint {directory} holds no state of rank {rank}")
    value = decode_value(found[key], key, str(directory))
    if not isinstance(value, dict):
        raise CorruptCheckpoint(
            f"checkpoint {directory}: the state of rank {rank} is not a mapping; "
            "restore another checkpoint"
        )
    return value


def consolidate(
    source: str | os.PathLike[str], out: str | os.PathLike[str], *, weights: bool = True
) -> tuple[Path, Path | None]:
    """Write ``source`` (sharded) as a one-process checkpoint at ``out``.

    The shared objects are written whole, rank 0's own part beside them, so
    a one-process ``Run`` resumes from it (with rank 0's random states and
    data position). With ``weights``, the modules' tensors also go to
    ``out.safetensors`` beside it, readable by ``safetensors`` alone. Returns
    both paths. Raises ``CheckpointExists`` when ``out`` exists.
    """
    from killsafe import format as fmt

    source, out = Path(source), Path(out)
    manifest = fmt.read_manifest(source)
    if not fmt.is_sharded(manifest):
        raise CorruptCheckpoint(f"{source} is not a sharded checkpoint; it needs no consolidation")
    if out.exists():
        raise CheckpointExists(f"{out} already exists; choose a new output path", out)
    kinds = dict(manifest["metadata"].get(KINDS_KEY) or {})
    tree = {**read_rank_part(source, 0), **read_shared(source, sorted(kinds))}
    metadata = {k: v for k, v in manifest["metadata"].items() if k != KINDS_KEY}
    metadata["consolidated_from"] = {"path": str(source), "world_size": manifest["world_size"]}
    staging = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    staging.mkdir(parents=True)
    try:
        fmt.write_checkpoint(
            staging,
            tree,
            step=manifest["step"],
            name=manifest["name"],
            reason=manifest["reason"],
            metrics=manifest["metrics"],
            metadata=metadata,
        )
        os.rename(staging, out)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    weights_path = None
    if weights:
        modules = {name: tree[name] for name, kind in kinds.items() if kind == "module"}
        weights_path = _write_weights(out.with_name(out.name + ".safetensors"), modules)
    return out, weights_path


def _write_weights(path: Path, modules: dict[str, Any]) -> Path:
    """The modules' tensors as a plain safetensors file."""
    from killsafe.distributed.writer import tensor_file_entries, write_plain_file

    tensors: dict[str, Any] = {}
    for name, state in modules.items():
        table = {k: v for k, v in state.items() if hasattr(v, "shape")}
        for key, tensor in table.items():
            tensors[key if len(modules) == 1 else f"{name}.{key}"] = tensor
    if path.exists():
        raise CheckpointExists(f"{path} already exists; choose a new output path", path)
    write_plain_file(path, tensor_file_entries(tensors))
    return path
