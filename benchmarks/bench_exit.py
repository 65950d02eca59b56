"""What the report costs the exit path of a run stopped by SIGTERM.

Runs a small job in a child process, sends it SIGTERM once it is in its
loop, and times the exit: from the signal to the process's end (the step
finishes, the emergency checkpoint is committed, the records and the report
are written, the interpreter ends). Three ways, interleaved, several times:

- ``report=False``: no report at all, the floor;
- ``report=True``: what a run does (text and JSON inline, the plot drawn by
  a detached child after the exit);
- ``plot inline``: ``report=False`` and then ``write_report(plot="inline")``
  before the exit, the way the exit path drew the plot before.

Prints a table of the median time of the closing (the loop's end to the
with-block's end, in the job) and of the whole exit (SIGTERM to the process's
end, the interpreter's teardown included, noisier on a loaded machine), their
differences to the floor and the ratio, then checks that each ``report=True`` run's ``report.png``
appeared. ``python benchmarks/bench_exit.py [--repeat N] [--torch]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

JOB = textwrap.dedent(
    """
    import sys, time
    mode, with_torch = sys.argv[2], sys.argv[3] == "torch"
    import killsafe
    from killsafe.report import write_report
    state = {"weights": [0.0] * 1000}
    if with_torch:
        import torch
        state = {"model": torch.nn.Linear(256, 256)}
    with killsafe.Run(sys.argv[1], report=(mode == "detached"), progress=False,
                      keyboard=False, save_every_steps=10**9) as run:
        run.track(**state)
        for step in run.steps():
            time.sleep(0.002)
            run.log(loss=1.0 / (step + 1), accuracy=step / (step + 1))
            if step == 50:
                print("ready", flush=True)
        loop_ended = time.perf_counter()
    if mode == "inline":
        write_report(sys.argv[1], plot="inline")
    print(f"closed {time.perf_counter() - loop_ended:.6f}", flush=True)
    sys.exit(run.exit_code)
    """
)

MODES = {"report=False": "none", "report=True": "detached", "plot inline": "inline"}


def exit_seconds(run_dir: Path, mode: str, with_torch: bool) -> tuple[float, float]:
    """Seconds from the loop's end to the with-block's (the report included), and
    from SIGTERM to the end of the job's process (the interpreter's teardown included)."""
    job = subprocess.Popen(
        [sys.executable, "-c", JOB, str(run_dir), mode, "torch" if with_torch else "plain"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert job.stdout is not None
    if job.stdout.readline().strip() != "ready":
        job.kill()
        raise SystemExit(f"the job in {run_dir} did not start; run it by hand to see why")
    start = time.perf_counter()
    job.send_signal(signal.SIGTERM)
    closed_line = job.stdout.readline()
    job.wait()
    elapsed = time.perf_counter() - start
    if job.returncode != 75 or not closed_line.startswith("closed "):
        raise SystemExit(f"the job in {run_dir} exited {job.returncode}, expected 75")
    return float(closed_line.split()[1]), elapsed


def wait_for_png(run_dir: Path, deadline: float) -> bool:
    png = run_dir / "report.png"
    while time.monotonic() < deadline:
        if png.exists() and png.stat().st_mtime_ns >= (run_dir / "report.json").stat().st_mtime_ns:
            return True
        time.sleep(0.1)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--torch", action="store_true", help="the job imports torch")
    args = parser.parse_args()
    closing: dict[str, list[float]] = {name: [] for name in MODES}
    total: dict[str, list[float]] = {name: [] for name in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        detached_dirs = []
        for attempt in range(args.repeat):
            for name, mode in MODES.items():
                run_dir = Path(tmp) / f"{mode}-{attempt}"
                closed, ended = exit_seconds(run_dir, mode, args.torch)
                closing[name].append(closed)
                total[name].append(ended)
                if mode == "detached":
                    detached_dirs.append(run_dir)
                time.sleep(1.5)  # let a plot child finish before the next timing
        drawn = sum(wait_for_png(d, time.monotonic() + 60) for d in detached_dirs)
    job = "torch job" if args.torch else "plain job"
    print(f"exit after SIGTERM, {job}, median of {args.repeat} (cpus: {os.cpu_count()})")
    print("closing: the loop's end to the with-block's; process: SIGTERM to the process's end")
    print(
        f"{'exit path':14} {'closing s':>10} {'minus floor':>12} "
        f"{'process s':>10} {'minus floor':>12} {'ratio':>6}"
    )
    closing_floor = statistics.median(closing["report=False"])
    total_floor = statistics.median(total["report=False"])
    for name in MODES:
        closed, ended = statistics.median(closing[name]), statistics.median(total[name])
        print(
            f"{name:14} {closed:10.3f} {closed - closing_floor:12.3f} "
            f"{ended:10.3f} {ended - total_floor:12.3f} {ended / total_floor:6.2f}"
        )
    print(f"report.png drawn after the exit: {drawn} of {len(detached_dirs)}")


if __name__ == "__main__":
    main()
