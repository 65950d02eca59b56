"""One rank of a test job (see distributed_helpers.py): ``SCENARIO RANK WORLD PORT DIR ARGS...``."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from killsafe.distributed import TorchCoordinator, Vote
from killsafe.errors import KillsafeError, RankUnresponsive

SCENARIOS: dict[str, Any] = {}


def scenario(function: Any) -> Any:
    SCENARIOS[function.__name__] = function
    return function


def votes_for(step: int, rank: int, world: int) -> Vote:
    """The vote of ``rank`` at ``step`` of the agree scenario (also used by the test)."""
    last = world - 1
    if step == 1:
        return Vote(stop={1: "q pressed", last: "SIGTERM"}.get(rank))
    if step == 2:
        return Vote(save="every 2 steps" if rank == 0 else "not rank 0", name=f"s{rank}")
    if step == 3:
        return Vote(stop="time limit" if rank in (0, last) else None, save="exit" if rank else None)
    if step == 4:
        return Vote(
            stop="é" * 3000 if rank == last else None, name="ünïcode" if rank == 0 else None
        )
    return Vote()


def agree_everything(coordinator: TorchCoordinator, rank: int, world: int) -> dict[str, Any]:
    agreements = [coordinator.agree(votes_for(step, rank, world)).__dict__ for step in range(6)]
    # each start settles the one before; a pending agreement is never lost
    pending = [coordinator.agree_async(votes_for(step, rank, world)) for step in range(6)]
    coordinator.barrier("the end of the agree scenario")
    return {
        "agreements": agreements,
        "pipelined": [p.wait().__dict__ for p in pending],
        "broadcast": coordinator.broadcast({"from": rank, "list": [1, 2.5, None]}, src=world - 1),
        "gather": coordinator.gather(f"rank {rank}"),
        "rank": coordinator.rank,
        "world_size": coordinator.world_size,
        "hosts": [coordinator.host(r) for r in range(world)],
    }


@scenario
def agree_then_lose(rank: int, world: int, workdir: Path, *args: str) -> dict[str, Any]:
    """Agree, broadcast and gather; then the victims (``args``: ``RANK:kill`` or
    ``RANK:hang``) go and the others try to agree twice."""
    victims = dict(arg.split(":") for arg in args)
    coordinator = TorchCoordinator(timeout=3)
    result = agree_everything(coordinator, rank, world)
    how = victims.get(str(rank))
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "hang":
        time.sleep(600)  # the test kills it
    errors = []
    for _ in range(2):  # the second call fails at once: the coordinator stays failed
        try:
            coordinator.agree(Vote(stop="never agreed"))
        except RankUnresponsive as exc:
            errors.append({"message": str(exc), "ranks": list(exc.ranks), "hosts": list(exc.hosts)})
    return {**result, "errors": errors}


@scenario
def send_what_is_not_json(rank: int, world: int, workdir: Path, *args: str) -> dict[str, Any]:
    """Rank 0 broadcasts, then rank 1 gathers, a value that is not JSON; then all gather."""
    coordinator = TorchCoordinator(timeout=10)
    sends = [
        lambda: coordinator.broadcast(object() if rank == 0 else None),
        lambda: coordinator.gather(math.nan if rank == 1 else rank),
    ]
    errors = []
    for send in sends:
        try:
            send()
            errors.append(None)
        except KillsafeError as exc:
            errors.append([type(exc).__name__, str(exc)])
    return {"errors": errors, "after": coordinator.gather(rank)}


@scenario
def refuse_timeouts(rank: int, world: int, workdir: Path, *args: str) -> dict[str, Any]:
    """Build a coordinator with each timeout that is not a positive finite number."""
    refused = {}
    for timeout in (math.inf, math.nan, 1e300, None, "5", 0, -1.0):
        try:
            TorchCoordinator(timeout=timeout)  # type: ignore[arg-type]
        except KillsafeError as exc:
            refused[repr(timeout)] = [type(exc).__name__, str(exc)]
    return {"refused": refused}


def full_state(seed: int = 0) -> dict[str, Any]:
    """The whole state the sharded scenarios save (also built by the test to compare)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(10, 6, generator=generator),
            "b": torch.randn(7, generator=generator).to(torch.bfloat16),
        },
        "optim": {
            "exp_avg": torch.randn(10, 6, generator=generator),
            "step": torch.tensor(12, dtype=torch.int64),
            "config": {"lr": 0.01, "betas": (0.9, 0.999), "name": "adam", "huge": 2**70},
        },
        "data": {"seen": b"\x00\x01" * 50, "epoch": 3},
    }


def sharded(state: dict[str, Any], mesh: Any, world: int) -> dict[str, Any]:
    """``state`` as DTensors: rows of w sharded, exp_avg by columns on 3 ranks, b replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    model, optim = state["model"], state["optim"]
    return {
        "model": {
            "w": distribute_tensor(model["w"], mesh, [Shard(0)]),
            "b": distribute_tensor(model["b"], mesh, [Replicate()]),
        },
        "optim": {
            "exp_avg": distribute_tensor(optim["exp_avg"], mesh, [Shard(1 if world == 3 else 0)]),
            "step": optim["step"],
            "config": optim["config"],
        },
        "data": state["data"],
    }


def zeroed(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: zeroed(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    return None


def plain(state: Any) -> Any:
    """A loaded state as JSON: tensors as (dtype, nested lists) of their full value."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return {k: plain(v) for k, v in state.items()}
    if isinstance(state, DTensor):
        state = state.full_tensor()
    if isinstance(state, torch.Tensor):
        return [str(state.dtype), state.float().tolist()]
    if isinstance(state, bytes):
        return ["bytes", state.hex()]
    if isinstance(state, tuple):
        return ["tuple", [plain(v) for v in state]]
    return state


@scenario
def save_then_die(rank: int, world: int, workdir: Path, *args: str) -> dict[str, Any]:
    """Save a DTensor state and a replicated one; then rank 1 dies while saving a third."""
    from torch.distributed.device_mesh import init_device_mesh

    from killsafe.distributed import ShardedWriter, save_sharded

    coordinator = TorchCoordinator(timeout=float(args[0]))
    mesh = init_device_mesh("cpu", (world,))
    state = sharded(full_state(), mesh, world)
    save_sharded(state, workdir / "dtensor", coordinator=coordinator, step=7, name="first")
    replicated = {"model": full_state()["model"], "rank0_only": {"step": 1}}
    save_sharded(replicated, workdir / "ddp", coordinator=coordinator, step=8)
    try:
        save_sharded({"seen": rank}, workdir / "per-rank", coordinator=coordinator)
        refused = None
    except KillsafeError as exc:
        refused = f"{type(exc).__name__}: {exc}"

    write_data = ShardedWriter.write_data

    def dying_write(self: Any, plan: Any, planner: Any) -> Any:
        result = write_data(self, plan, planner)
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # after writing its file, before reporting
        return result

    ShardedWriter.write_data = dying_write  # type: ignore[method-assign]
    try:
        save_sharded(state, workdir / "never", coordinator=coordinator, step=9)
    except KillsafeError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "refused": refused}
    return {"error": None, "refused": refused}


@scenario
def load_resharded(rank: int, world: int, workdir: Path, *args: str) -> dict[str, Any]:
    """Load the DTensor checkpoint into a state sharded differently over ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    from killsafe.distributed import load_sharded

    coordinator = TorchCoordinator(timeout=30)
    mesh = init_device_mesh("cpu", (world,))
    state = sharded(zeroed(full_state()), mesh, world)
    load_sharded(state, workdir / "dtensor", coordinator=coordinator)
    return {"state": plain(state)}


@scenario
def save_to_store(rank: int, world: int, workdir: Path, url: str) -> dict[str, Any]:
    """Save the DTensor state into the object store ``url`` (each rank uploads its file)."""
    from torch.distributed.device_mesh import init_device_mesh

    from killsafe import CheckpointStore
    from killsafe.distributed import save_sharded

    coordinator = TorchCoordinator(timeout=30)
    mesh = init_device_mesh("cpu", (world,))
    with CheckpointStore(url) as store:
        path = save_sharded(
            sharded(full_state(), mesh, world), store, coordinator=coordinator, step=7
        )
    return {"path": str(path)}


@scenario
def load_from_store(rank: int, world: int, workdir: Path, url: str) -> dict[str, Any]:
    """Load the object store's latest checkpoint into a state sharded over ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    from killsafe import CheckpointStore
    from killsafe.distributed import load_sharded

    coordinator = TorchCoordinator(timeout=30)
    mesh = init_device_mesh("cpu", (world,))
    state = sharded(zeroed(full_state()), mesh, world)
    load_sharded(state, "latest", coordinator=coordinator, store=CheckpointStore(url))
    return {"state": plain(state)}


def main() -> None:
    name, rank, world, port, workdir, *args = sys.argv[1:]
    rank_, world_ = int(rank), int(world)
    store = dist.TCPStore("127.0.0.1", int(port), None, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank_, world_size=world_)
    torch.manual_seed(0)
    try:
        result = SCENARIOS[name](rank_, world_, Path(workdir), *args)
    except KillsafeError as exc:
        result = {"error": type(exc).__name__, "message": str(exc)}
    Path(workdir, f"rank-{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # no teardown collectives with ranks that may be gone


if __name__ == "__main__":
    main()
