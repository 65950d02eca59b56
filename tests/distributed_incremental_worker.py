"""One rank of an incremental sharded-save job (see distributed_helpers.py):
``SCENARIO RANK WORLD PORT DIR STORE``.

The scenarios of ``distributed_worker.py`` plus ``incremental_saves``: two
ranks save a state into an incremental store, rank 0 prunes between the
saves, then a second save changes a small part; both checkpoints are loaded
back; a third save fails on rank 1 (its pieces never reach the disk).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import xxhash
from distributed_worker import main, scenario, zeroed

from killsafe import CheckpointStore
from killsafe.distributed import TorchCoordinator, load_sharded, save_sharded
from killsafe.distributed.sharded import load_full
from killsafe.errors import KillsafeError

BASE_ELEMENTS = 8 << 20  # 32 MiB of float32: 2 pieces of 8 MiB on each of 2 ranks


def incremental_state(version: int) -> dict[str, Any]:
    """The whole state of save ``version`` (1, 2 or 3); also built by the test to compare.

    A frozen base, small adapters and a step counter. Version 2 changes the
    adapters, the step and the first 10 values of the base (one piece of
    rank 0); version 3 changes its first and last values (a piece of each rank).
    """
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(BASE_ELEMENTS, generator=generator)
    adapter = torch.randn(64, 16, generator=generator)
    if version >= 2:
        base[:10] += 1.0
        adapter = adapter * 2
    if version >= 3:
        base[0] = base[-1] = 0.0
    return {
        "model": {"base": base, "adapter": adapter},
        "optim": {"step": torch.tensor(version), "config": {"lr": 0.01, "betas": (0.9, 0.99)}},
    }


def as_dtensors(state: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """The base and the adapter split by rows over the ranks; the rest replicated."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model = state["model"]
    return {
        "model": {name: distribute_tensor(model[name], mesh, [Shard(0)]) for name in model},
        "optim": state["optim"],
    }


def summary(state: Any) -> Any:
    """A loaded state as JSON: each tensor (DTensors whole) as dtype, shape and xxh3."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return {key: summary(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return [summary(value) for value in state]
    if isinstance(state, DTensor):
        state = state.full_tensor()
    if isinstance(state, torch.Tensor):
        data = state.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        return [str(state.dtype), list(state.shape), xxhash.xxh3_64_hexdigest(data)]
    return state


def manifest_of(checkpoint: Path) -> dict[str, Any]:
    return dict(json.loads((checkpoint / "manifest.json").read_text()))


def piece_files(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "pieces").glob("*/*") if not p.name.startswith("."))


@scenario
def incremental_saves(rank: int, world: int, workdir: Path, *args: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    store = Path(args[0])
    coordinator = TorchCoordinator(timeout=30)
    mesh = init_device_mesh("cpu", (world,))
    result: dict[str, Any] = {"pieces": {}, "referenced": {}, "added": {}, "loaded": {}}

    def save(version: int) -> Path:
        state = as_dtensors(incremental_state(version), mesh)
        directory = store / f"step-{version:06d}"
        save_sharded(state, directory, coordinator=coordinator, step=version, incremental=True)
        if rank == 0:
            manifest = manifest_of(directory)
            result["added"][version] = manifest["added"]
            result["referenced"][version] = sorted(f"{d}.safetensors" for d in manifest["pieces"])
            result["pieces"][version] = piece_files(store)
        return directory

    def load(directory: Path) -> Any:
        target = as_dtensors(zeroed(incremental_state(1)), mesh)
        target["optim"]["config"] = {"lr": None, "betas": None}
        return summary(load_sharded(target, directory, coordinator=coordinator))

    def prune() -> None:
        if rank == 0:  # retention: the oldest goes, and the pieces only it named
            pruning = CheckpointStore(store, incremental=True, keep_last=1)
            pruning.prune()
            pruning.close()
        coordinator.barrier("rank 0 pruning")

    first = save(1)
    prune()  # removes the one-process checkpoint the test saved first
    if rank == 0:
        result["after_first_prune"] = piece_files(store)
        result["alone"] = summary(load_full(first))  # one process, whole tensors
    second = save(2)
    result["loaded"] = {1: load(first), 2: load(second)}
    prune()  # removes the first: the second still holds the pieces it shares
    result["loaded"][3] = load(second)
    if rank == 0:
        result["after_second_prune"] = piece_files(store)

    from killsafe.format import pieces as format_pieces

    if rank == 1:  # rank 1's disk fails once its pieces are written, before they are renamed

        def failing(self: Any) -> None:
            raise OSError(28, "No space left on device (test)")

        format_pieces.LocalPieces.finish = failing  # type: ignore[method-assign]
    try:
        save(3)
        result["third"] = None
    except KillsafeError as exc:
        result["third"] = f"{type(exc).__name__}: {exc}"
    if rank == 1:
        result["temporary"] = [p.name for p in (store / "pieces").glob("*/.tmp-*")]
    result["pid"] = os.getpid()
    return result


if __name__ == "__main__":
    main()
