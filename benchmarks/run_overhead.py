"""How much a ``Run`` adds to each step of a loop, and how fast a loader resumes mid-epoch.

Prints two tables; run it with ``python benchmarks/run_overhead.py``. No
checkpoint is written during the timed part (the store's own benchmarks time
saving).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from killsafe import Run

STEPS = 200_000


def bare_loop(steps: int) -> float:
    start = time.perf_counter()
    total = 0
    for step in range(steps):
        total += step
    return time.perf_counter() - start


def run_loop(directory: Path, steps: int, **options: object) -> float:
    total = 0
    with Run(directory, total_steps=steps, progress=False, report=False, **options) as run:  # type: ignore[arg-type]
        start = time.perf_counter()
        for step in run.steps():
            total += step
        elapsed = time.perf_counter() - start
    return elapsed


def step_overhead_table() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_loop(STEPS)
        rows = [
            ("bare for loop", bare),
            ("Run, no policy", run_loop(Path(tmp) / "a", STEPS, save_on_exit=False)),
            (
                "Run, every N steps + seconds",
                run_loop(
                    Path(tmp) / "b",
                    STEPS,
                    save_every_steps=10**9,
                    save_every_seconds=10**6,
                    save_on_exit=False,
                ),
            ),
        ]
    print(f"{'loop':32} {'us/step':>9} {'ratio to bare':>14}")
    for name, seconds in rows:
        print(f"{name:32} {seconds / STEPS * 1e6:9.3f} {seconds / bare:14.1f}")


def loader_resume_table() -> None:
    try:
        import torch
    except ImportError:
        print("torch not installed: loader table skipped")
        return
    from killsafe.integrations.torch import ResumableLoader

    length, batch = 1_000_000, 1
    dataset = torch.utils.data.TensorDataset(torch.arange(length))
    loader = ResumableLoader(dataset, batch_size=batch, seed=0)
    state = {"epoch": 0, "batches": length - 10, "seed": 0, "length": length, "batch_size": 1}
    start = time.perf_counter()
    loader.load_state_dict(state)
    next(iter(loader))
    resume = time.perf_counter() - start
    replay_sample = 10_000
    naive = ResumableLoader(dataset, batch_size=batch, seed=0)
    start = time.perf_counter()
    iterator = iter(naive)
    for _ in range(replay_sample):
        next(iterator)
    replay = (time.perf_counter() - start) * (length - 10) / replay_sample
    print()
    print(f"{'resume 999,990 batches into an epoch':40} {'seconds':>9}")
    print(f"{'ResumableLoader (slice the order)':40} {resume:9.3f}")
    print(f"{'replaying the batches (extrapolated)':40} {replay:9.3f}")
    print(f"{'ratio':40} {replay / resume:9.0f}x")


if __name__ == "__main__":
    step_overhead_table()
    loader_resume_table()
