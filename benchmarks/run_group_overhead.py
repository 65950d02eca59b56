"""The cost of a ``Run`` in a 2-process gloo job per step, against the same steps bare.

Each rank times a tiny DDP model's training steps without killsafe, then the
same steps inside ``Run`` (whose step boundary agrees with the other rank
every step; no saves), and prints the per-step times and their ratio.

    python benchmarks/run_group_overhead.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta


def rank_main(rank: int, port: int, steps: int, directory: str) -> None:
    import torch
    import torch.distributed as dist

    from killsafe import Run

    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 16)

    def step() -> None:
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(100):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    bare = (time.perf_counter() - start) / steps
    with Run(directory, save_on_exit=False, save_every_steps=10**9, progress=False) as run:
        run.track(model=model, optimizer=optimizer)
        start = time.perf_counter()
        for _ in run.steps():
            step()
            if run.step == steps:
                run.total_steps = steps  # ends at this boundary
        in_run = (time.perf_counter() - start) / steps
    if rank == 0:
        print(f"{'loop':<28}{'per step':>12}{'ratio':>8}")
        print(f"{'bare DDP step':<28}{bare * 1e6:>10.1f}us{1.0:>8.3f}")
        print(f"{'in Run, agreed every step':<28}{in_run * 1e6:>10.1f}us{in_run / bare:>8.3f}")
        print(f"agreement and boundary cost: {(in_run - bare) * 1e6:.1f} us per step")
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.port, args.steps, args.dir)
        return
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as directory:
        ranks = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--rank",
                    str(rank),
                    "--port",
                    str(store.port),
                    "--steps",
                    str(args.steps),
                    "--dir",
                    os.path.join(directory, "run"),
                ],
                env=env,
            )
            for rank in range(2)
        ]
        codes = [process.wait() for process in ranks]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")


if __name__ == "__main__":
    main()
