"""One rank of a test job (see distributed_helpers.py): ``SCENARIO RANK WORLD PORT DIR ARGS...``."""

from __future__ import annotations

import json
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
        return Vote(stop="é" * 3000 if rank == last else None, name="ünïcode" if rank == 0 else None)
    return Vote()


@scenario
def agree(rank: int, world: int, workdir: Path, *args: str) -> dict[str, Any]:
    coordinator = TorchCoordinator(timeout=30)
    agreements = [coordinator.agree(votes_for(step, rank, world)).__dict__ for step in range(6)]
    coordinator.barrier("the end of the agree scenario")
    return {
        "agreements": agreements,
        "broadcast": coordinator.broadcast({"from": rank, "list": [1, 2.5, None]}, src=world - 1),
        "gather": coordinator.gather(f"rank {rank}"),
        "rank": coordinator.rank,
        "world_size": coordinator.world_size,
        "host": coordinator.host(rank),
    }


@scenario
def lost(rank: int, world: int, workdir: Path, *args: str) -> dict[str, Any]:
    """Rank ``args[0]`` exits, is killed or hangs after one good step; the others agree."""
    victim, how = int(args[0]), args[1]
    coordinator = TorchCoordinator(timeout=3)
    coordinator.agree(Vote())
    if rank == victim:
        if how == "exit":
            os._exit(3)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)  # hangs; the test kills it
    started = time.monotonic()
    errors = []
    for _ in range(2):  # the second call fails at once: the coordinator stays failed
        try:
            coordinator.agree(Vote(stop="never agreed"))
        except RankUnresponsive as exc:
            errors.append({"message": str(exc), "ranks": list(exc.ranks), "hosts": list(exc.hosts)})
    return {"errors": errors, "seconds": time.monotonic() - started}


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
