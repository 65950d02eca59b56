"""The cost of a ``Run`` in a 2-process gloo job per step, against the same steps bare.

Each rank times a tiny DDP model's training steps without killsafe; the same
steps each followed by a full, synchronous ``TorchCoordinator.agree`` (what
a ``Run``'s boundary used to cost); and the same steps inside ``Run``, whose
boundary only starts a one-flag ``all_reduce`` read at the next boundary (no
saves). It prints the per-step times and their ratio to the bare step.

    python benchmarks/run_group_overhead.py [--steps 2000] [--step-ms 20]

``--step-ms`` adds that much waiting to each step, as a step whose work is
on an accelerator leaves the CPU waiting.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta


def rank_main(rank: int, port: int, steps: int, directory: str, wait: float) -> None:
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
        if wait:
            time.sleep(wait)

    from killsafe.distributed import TorchCoordinator, Vote

    coordinator = TorchCoordinator(timeout=60)
    idle = Vote()

    def agreed_step() -> None:
        step()
        coordinator.agree(idle)

    flags = [coordinator.any_async((False, False))]

    def flagged_step() -> None:
        step()
        flags[0].wait()
        flags[0] = coordinator.any_async((False, False))

    for _ in range(100):
        step()
    bare = timed(step, steps)
    agreed = timed(agreed_step, steps)
    flagged = timed(flagged_step, steps)
    flags[0].wait()
    with Run(directory, save_on_exit=False, save_every_steps=10**9, progress=False) as run:
        run.track(model=model, optimizer=optimizer)
        start = time.perf_counter()
        for _ in run.steps():
            step()
            if run.step == steps:
                run.total_steps = steps  # ends at this boundary
        in_run = (time.perf_counter() - start) / steps
    if rank == 0:
        extra = f" + {wait * 1000:g} ms waiting" if wait else ""
        print(f"2 gloo ranks, {steps} steps of a tiny DDP model{extra}")
        print(f"{'loop':<28}{'per step':>12}{'ratio':>8}")
        rows = [
            ("bare DDP step", bare),
            ("+ agree() every step", agreed),
            ("+ any_async() every step", flagged),
            ("in Run (flags, async)", in_run),
        ]
        for label, seconds in rows:
            print(f"{label:<28}{seconds * 1e6:>10.1f}us{seconds / bare:>8.3f}")
        print(f"Run's boundary cost: {(in_run - bare) * 1e6:.1f} us per step")
    sys.stdout.flush()
    os._exit(0)


def timed(call: Callable[[], None], count: int) -> float:
    """Mean seconds of one ``call()`` over ``count`` calls."""
    start = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--step-ms", type=float, default=0.0)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.port, args.steps, args.dir, args.step_ms / 1000)
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
                    "--step-ms",
                    str(args.step_ms),
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
