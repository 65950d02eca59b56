"""What a flood of save requests costs a training loop that serves its dashboard.

A ``Run`` with ``serve=PORT`` runs a loop of small NumPy steps in this process;
a second process sends save requests to its API as fast as it can (8 threads).
The table compares the loop's step times without and during the flood, and
counts the requests answered and the checkpoints they caused (coalescing: one
pending request at a time, so a few checkpoints, not one per request).
Run it with ``python benchmarks/server_flood.py``; ratios depend on the machine.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from killsafe import Run
from killsafe.store import CheckpointStore

STEPS_EACH = 600
REQUESTS = 1000

FLOOD = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
import httpx
url, n = sys.argv[1], int(sys.argv[2])
client = httpx.Client(base_url=url, timeout=30)
def save(i):
    return client.post("/api/checkpoints", json={}).status_code
start = time.perf_counter()
with ThreadPoolExecutor(max_workers=8) as pool:
    codes = list(pool.map(save, range(n)))
elapsed = time.perf_counter() - start
print(sum(c == 202 for c in codes), len(codes), f"{elapsed:.2f}", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step(weights: np.ndarray) -> None:
    weights *= 0.999
    weights += 0.001


def timed_steps(run: Run, weights: np.ndarray, steps: int, iterator: object) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        next(iterator)  # type: ignore[call-overload]
        step(weights)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        with Run(run_dir, serve=port, progress=False, keyboard=False, report=False) as run:
            weights = np.zeros(1_000_000, dtype=np.float32)  # 4 MB: the snapshot's size
            run.track(weights=weights)
            steps = iter(run.steps())
            time.sleep(2.5)  # let status.json say "attached"
            quiet = timed_steps(run, weights, STEPS_EACH, steps)
            flood = subprocess.Popen(
                [sys.executable, "-c", FLOOD, f"http://127.0.0.1:{port}/", str(REQUESTS)],
                stdout=subprocess.PIPE,
                text=True,
            )
            loud: list[float] = []
            while flood.poll() is None:
                loud += timed_steps(run, weights, 20, steps)
            answered, sent, seconds = flood.communicate()[0].split()
            run.stop("benchmark done")
            for _ in steps:
                pass
        requested = [
            c for c in CheckpointStore(run_dir / "checkpoints").list() if c.reason == "request"
        ]

    def row(name: str, times: list[float]) -> str:
        times = sorted(times)
        median = statistics.median(times) * 1e3
        p99 = times[int(len(times) * 0.99) - 1] * 1e3
        return f"| {name:<16} | {len(times):>6} | {median:>9.3f} | {p99:>9.3f} |"

    print(
        f"save requests: {answered}/{sent} answered 202 in {seconds} s; "
        f"checkpoints they caused: {len(requested)}"
    )
    print("| loop             |  steps | median ms |    p99 ms |")
    print("|------------------|-------:|----------:|----------:|")
    print(row("no requests", quiet))
    print(row("during the flood", loud))
    ratio = statistics.median(loud) / statistics.median(quiet)
    print(f"median step time during the flood / without: {ratio:.2f}x")


if __name__ == "__main__":
    main()
