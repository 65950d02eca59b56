"""One rank of an FSDP2 or DDP training under ``Run``, saving or resuming.

See distributed_helpers.py.

``SCENARIO RANK WORLD PORT DIR ROOT [RUN:LAYOUT...]``. Scenario ``save``
trains a small model wrapped with ``fully_shard`` (FSDP2: DTensor
parameters and Adam states) in ``ROOT/fsdp`` and one wrapped with DDP in
``ROOT/ddp``, 3 steps each, checkpointed at step 3. Scenario ``load``
resumes each ``ROOT/RUN`` into a fresh model wrapped as ``LAYOUT``
(``fsdp`` or ``ddp``; ``wide``: FSDP2 with a wider hidden layer, which
does not fit; ``plain``: not wrapped, one process alone). Each
rank writes the whole model and optimizer state it ended with (DTensors
gathered) to ``DIR/rank-N.json``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from killsafe import Run
from killsafe.errors import KillsafeError

STEPS = 3


def build(layout: str, world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose shards are uneven on 2 and on 3 ranks, wrapped as ``layout``."""
    torch.manual_seed(seed)
    hidden = 7 if layout == "wide" else 5
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)
    )
    if layout in ("fsdp", "wide"):
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif layout == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def whole(value: Any) -> Any:
    """A state value as plain data, a DTensor gathered whole first (collective)."""
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    saved = optimizer.state_dict()
    return {
        "model": {key: whole(value) for key, value in inner.state_dict().items()},
        "optimizer": {
            str(index): {key: whole(value) for key, value in state.items()}
            for index, state in saved["state"].items()
        },
        "lr": [group["lr"] for group in saved["param_groups"]],
    }


def save(rank: int, world: int, root: Path) -> dict[str, Any]:
    result = {}
    for layout in ("fsdp", "ddp"):
        model, optimizer = build(layout, world, seed=0)
        torch.manual_seed(100 + rank)  # each rank its own data
        with Run(root / layout, total_steps=STEPS, save_every_steps=STEPS) as run:
            run.track(model=model, optimizer=optimizer)
            for _ in run.steps():
                loss = model(torch.randn(8, 4)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        result[layout] = states(model, optimizer)
    return result


def load(world: int, root: Path, pairs: list[str]) -> dict[str, Any]:
    result = {}
    for pair in pairs:
        run_name, layout = pair.split(":")
        model, optimizer = build(layout, world, seed=1)  # other weights than the saved ones
        try:
            with Run(root / run_name, total_steps=STEPS) as run:
                run.track(model=model, optimizer=optimizer)
                assert run.resumed_from is not None and run.step == STEPS
        except KillsafeError as exc:
            result[pair] = {"error": type(exc).__name__, "message": str(exc)}
            continue
        result[pair] = states(model, optimizer)
    return result


def main() -> None:
    name, rank, world, port, workdir, root, *pairs = sys.argv[1:]
    rank_, world_ = int(rank), int(world)
    store = dist.TCPStore("127.0.0.1", int(port), None, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank_, world_size=world_)
    root_ = Path(root)
    result = save(rank_, world_, root_) if name == "save" else load(world_, root_, pairs)
    Path(workdir, f"rank-{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no teardown collectives


if __name__ == "__main__":
    main()
