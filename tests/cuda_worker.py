"""One rank of a CUDA training under ``Run`` (see test_cuda.py).

``SCENARIO RANK WORLD PORT DIR RUNDIR [STEP]``: scenario ``alone`` trains
on one process without a process group, ``nccl`` in an NCCL job (one rank
per GPU), ``gloo`` in a gloo job whose ranks share GPU 0. The model has
dropout, so each step draws from the CUDA generator. With ``STEP``, rank 0
sends itself SIGTERM during that step. Each rank writes what it saw to
``DIR/rank-N.json`` and exits with ``run.exit_code``. ``KILLSAFE_TEST_DEVICE``
overrides the device (``cpu`` lets the scenarios be tried without a GPU).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from killsafe import Run

TOTAL_STEPS = 10


def build(device: torch.device, scenario: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(512, 8)
    ).to(device)
    if dist.is_initialized():
        ids = [device.index] if device.type == "cuda" and scenario == "nccl" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train(rank: int, scenario: str, run_dir: Path, term_step: int | None) -> dict[str, Any]:
    device = torch.device(os.environ.get("KILLSAFE_TEST_DEVICE", "cuda:0"))
    model, optimizer = build(device, scenario)
    torch.manual_seed(100 + rank)  # each rank its own data stream, on CPU and CUDA alike
    with Run(run_dir, total_steps=TOTAL_STEPS, save_every_steps=3, collective_timeout=30) as run:
        run.track(model=model, optimizer=optimizer)
        for step in run.steps():
            x = torch.randn(64, 256, device=device)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if rank == 0 and step == term_step:
                os.kill(os.getpid(), signal.SIGTERM)
    return {
        "step": run.step,
        "exit_code": run.exit_code,
        "weights": [p.detach().cpu().flatten().tolist() for p in model.parameters()],
        "adam": [s["exp_avg_sq"].cpu().flatten().tolist() for s in optimizer.state.values()],
        "next_random": torch.rand(4, device=device).tolist(),
    }


def main() -> None:
    scenario, rank, world, port, workdir, run_dir, *rest = sys.argv[1:]
    if scenario != "alone":
        store = dist.TCPStore("127.0.0.1", int(port), None, False, timeout=timedelta(seconds=60))
        backend = "nccl" if scenario == "nccl" else "gloo"
        dist.init_process_group(backend, store=store, rank=int(rank), world_size=int(world))
    result = train(int(rank), scenario, Path(run_dir), int(rest[0]) if rest else None)
    Path(workdir, f"rank-{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(result["exit_code"])  # no teardown collectives


if __name__ == "__main__":
    main()
