"""Launch a real multi-process gloo job on 127.0.0.1 for the distributed tests.

The test process serves the rendezvous store, as ``torchrun``'s agent does,
so a rank (rank 0 included) can die without taking the store with it. Each
rank runs ``tests/distributed_worker.py SCENARIO`` (forked from the session's
forkserver, which imported torch once: ``fork_helpers``) and writes what it
saw to ``rank-N.json`` in the work directory. The ranks exchange their step
boundary's flags at every boundary (``KILLSAFE_FLAG_PERIOD=0``), so a stop
asked on one rank lands at a known step, unless ``flag_period`` says otherwise
(``None``: the default period).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from fork_helpers import ScriptProcess

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


class Job:
    """The ranks of one launched job and the store they meet at."""

    def __init__(
        self,
        scenario: str,
        world: int,
        workdir: Path,
        *args: str,
        worker: Path = WORKER,
        flag_period: str | None = "0",
    ) -> None:
        import torch.distributed as dist

        self.workdir = workdir
        self.store = dist.TCPStore(
            "127.0.0.1", 0, None, True, timeout=timedelta(seconds=60), wait_for_workers=False
        )
        self.place = [str(self.store.port), str(workdir)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        env.pop("KILLSAFE_FLAG_PERIOD", None)
        if flag_period is not None:
            env["KILLSAFE_FLAG_PERIOD"] = flag_period
        self._logs = tempfile.TemporaryDirectory(prefix="killsafe-job-")
        self.ranks = [
            ScriptProcess(
                worker,
                [scenario, str(rank), str(world), *self.place, *args],
                Path(self._logs.name),
                env,
                whole_env=True,
            )
            for rank in range(world)
        ]

    def wait(self, timeout: float = 90) -> list[int]:
        """Exit codes of every rank; a rank still running after ``timeout`` is killed."""
        deadline = time.monotonic() + timeout
        codes = []
        for process in self.ranks:
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                codes.append(process.wait())
        return codes

    def output(self, rank: int) -> str:
        """What the rank printed: its stdout, then its stderr."""
        process = self.ranks[rank]
        return "".join(
            path.read_text() for path in (process.stdout_path, process.stderr_path) if path.exists()
        )

    def result(self, rank: int) -> Any:
        path = self.workdir / f"rank-{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result:\n{self.output(rank)}"
        return json.loads(path.read_text())


def run_job(
    scenario: str,
    world: int,
    workdir: Path,
    *args: str,
    expect: int = 0,
    worker: Path = WORKER,
    flag_period: str | None = "0",
) -> Job:
    """Launch a job, wait for it, and check every rank exited with ``expect``."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = Job(scenario, world, workdir, *args, worker=worker, flag_period=flag_period)
    codes = job.wait()
    for rank, code in enumerate(codes):
        assert code == expect, f"rank {rank} exited {code}:\n{job.output(rank)}"
    return job
