"""What four clients hammering the dashboard cost a training loop that serves it.

A ``Run`` with ``serve=True`` resumes a run whose history holds 18,600 records
and trains: each step is a fixed amount of NumPy work and logs a metric. Four
client processes hammer every endpoint over real sockets on 127.0.0.1, as fast
as answers come: ``GET /api/history`` (the whole history each time),
``/api/report``, ``/api/checkpoints``, ``/api/status`` and save ``POST`` s,
unnamed and named. The clients hammer in windows of ``--window`` seconds,
alternating with quiet windows of the same length, for ``--seconds`` of
hammering in all, so that a machine whose load drifts (other jobs) slows both
kinds alike; the table gives the median step rate of each kind and the median
ratio of each hammered window to the quiet ones around it:

- against the run's own server (a child process: ``Run(serve=...)``);
- for comparison, against a server in a thread of the training process
  (``serve_in_thread``, how ``Run(serve=...)`` used to serve).

Goal: with the run's own server hammered, training keeps at least 90% of its
step rate. Run it with ``python benchmarks/server_flood.py``; ratios depend on
the machine (compare rows within one run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from killsafe import Run
from killsafe.server import serve_in_thread
from killsafe.store import CheckpointStore

CLIENTS = 4
HISTORY_RECORDS = 18_600
SETTLE = 0.3  # seconds after switching the clients on or off, not measured

CLIENT = """
import json, os, sys, time
from collections import Counter
import httpx
url, folder, me = sys.argv[1], sys.argv[2], int(sys.argv[3])
hammer, done = os.path.join(folder, "hammer"), os.path.join(folder, "done")
requests = [
    ("GET", "/api/history", None),
    ("GET", "/api/report", None),
    ("GET", "/api/checkpoints", None),
    ("GET", "/api/status", None),
    ("POST", "/api/checkpoints", {}),
    ("POST", "/api/checkpoints", {"name": None}),
]
codes, count = Counter(), 0
with httpx.Client(base_url=url, timeout=60) as client:
    while not os.path.exists(done):
        for method, path, body in requests:
            while not os.path.exists(hammer) and not os.path.exists(done):
                time.sleep(0.01)
            if os.path.exists(done):
                break
            if body is not None and "name" in body:
                body = {"name": f"client{os.getpid()}-{count}"}
            answer = client.request(method, path, json=body)
            codes[f"{method} {answer.status_code}"] += 1
            count += 1
print(json.dumps({"requests": count, "codes": codes}), flush=True)
"""


@dataclass
class Windows:
    """Step rates and CPU per step of the quiet and the hammered windows of one server."""

    name: str
    quiet: list[float] = field(default_factory=list)
    loud: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    quiet_cpu: list[float] = field(default_factory=list)
    loud_cpu: list[float] = field(default_factory=list)
    requests: int = 0
    codes: Counter[str] = field(default_factory=Counter)


class Loop:
    """The training loop: steps of fixed NumPy work, timed in windows."""

    def __init__(self, run: Run, width: int):
        self.run = run
        self.steps = iter(run.steps())
        self.weights = np.zeros(width, dtype=np.float32)

    def step(self) -> None:
        next(self.steps)
        self.weights *= 0.999
        self.weights += 0.001
        self.run.log(loss=float(self.weights[:1024].sum()))

    def window(self, seconds: float) -> tuple[float, float]:
        """Steps a second over ``seconds``, and CPU ms a step cost this process
        (all its threads: a server thread's work counts here)."""
        done = 0
        start, cpu = time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - start) < seconds:
            self.step()
            done += 1
        return done / elapsed, (time.process_time() - cpu) * 1e3 / done

    def run_for(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            self.step()


def prefill(run_dir: Path) -> None:
    """A first session whose history holds ``HISTORY_RECORDS`` records."""
    with Run(
        run_dir, total_steps=HISTORY_RECORDS, progress=False, keyboard=False, report=False
    ) as run:
        run.track(weights=np.zeros(1024, dtype=np.float32))
        for step in run.steps():
            run.log(loss=1.0 / (1 + step))


def measure(name: str, loop: Loop, url: str, args: argparse.Namespace) -> Windows:
    """Alternate quiet and hammered windows against the server at ``url``."""
    result = Windows(name)
    with tempfile.TemporaryDirectory() as folder:
        hammer, done = Path(folder) / "hammer", Path(folder) / "done"
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT, url, folder, str(i)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(CLIENTS)
        ]
        loop.run_for(2.0)  # the clients' interpreters start
        before = loop.window(args.window)
        for _ in range(round(args.seconds / args.window)):
            hammer.touch()
            loop.run_for(SETTLE)
            loud = loop.window(args.window)
            hammer.unlink()
            loop.run_for(SETTLE)
            after = loop.window(args.window)
            result.quiet.append(before[0])
            result.loud.append(loud[0])
            result.quiet_cpu.append(before[1])
            result.loud_cpu.append(loud[1])
            result.ratios.append(loud[0] / ((before[0] + after[0]) / 2))
            before = after
        result.quiet.append(before[0])
        done.touch()
        for client in clients:
            answer = json.loads(client.communicate()[0])
            result.requests += answer["requests"]
            result.codes.update(answer["codes"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="hammering in all (20)")
    parser.add_argument("--window", type=float, default=2.0, help="one window (default 2 s)")
    parser.add_argument("--width", type=int, default=1_500_000, help="floats a step touches")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        prefill(run_dir)
        with Run(run_dir, serve=True, progress=False, keyboard=False, report=False) as run:
            run.track(weights=np.zeros(1024, dtype=np.float32))
            loop = Loop(run, args.width)
            assert run._server is not None
            child = measure("Run(serve=...): a child process", loop, run._server.url, args)
            with serve_in_thread(run_dir) as in_thread:
                thread = measure("serve_in_thread: the loop's process", loop, in_thread.url, args)
            run.stop("benchmark done")
            for _ in loop.steps:
                pass
        named = [c for c in CheckpointStore(run_dir / "checkpoints").list() if c.name]
    print_table([child, thread], args, len(named))


def print_table(results: list[Windows], args: argparse.Namespace, named: int) -> None:
    print(
        f"{CLIENTS} clients hammering for {args.seconds:.0f} s in windows of {args.window:g} s, "
        f"alternating with quiet windows; history of {HISTORY_RECORDS} records"
    )
    print(
        "| server                               | steps/s quiet | steps/s hammered "
        "| hammered / quiet | CPU ms/step quiet, hammered | requests answered |"
    )
    print(
        "|--------------------------------------|--------------:|-----------------:"
        "|-----------------:|----------------------------:|------------------:|"
    )
    for r in results:
        cpu = f"{statistics.median(r.quiet_cpu):.2f}, {statistics.median(r.loud_cpu):.2f}"
        print(
            f"| {r.name:<36} | {statistics.median(r.quiet):>13.1f} "
            f"| {statistics.median(r.loud):>16.1f} | {statistics.median(r.ratios):>16.0%} "
            f"| {cpu:>27} | {r.requests:>17} |"
        )
    for r in results:
        print(f"{r.name}: " + ", ".join(f"{k}: {v}" for k, v in sorted(r.codes.items())))
    print(f"checkpoints with a name at the end: {named}")


if __name__ == "__main__":
    main()
