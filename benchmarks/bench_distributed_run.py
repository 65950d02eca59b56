"""Benchmark a ``Run`` in a job: the step boundary's cost and the loop blocked by a background save.

Launches real gloo processes on 127.0.0.1 (this script, one process per
rank) and prints one table from the same run:

- **the step boundary**: each rank times the gap between the end of one
  step's body and the start of the next (what the loop waits for the
  boundary), over ``--boundaries`` boundaries of a ``Run`` that never
  saves, with steps that do nothing and with ``--step-ms`` steps (a sleep,
  as a step whose work is on an accelerator leaves the CPU waiting). The
  same loop bare and a ``Run`` of one process (no process group) give the
  baseline; a job's boundary minus the lone ``Run``'s is what agreeing
  costs, and the time to start the flags' all_reduce and to wait for the
  one started a boundary before is shown apart (totals over the
  boundaries, per boundary). Each job runs once per ``--flag-periods``
  value (``KILLSAFE_FLAG_PERIOD``: the default, and 0 for an exchange at
  every boundary). Blocks of bare and ``Run`` loops alternate, three each.
- **the loop blocked by a background save** of a DTensor-sharded model and
  its Adam states (``--size-gb`` in all, rows sharded over ``--ranks``
  ranks): ``GroupStore.save_async`` (what a ``Run`` in a job calls) against
  ``torch.distributed.checkpoint.async_save`` with its ``FileSystemWriter``
  and a gloo group of its own, the same state; per round, the slowest
  rank's blocked time and the time until the write is done. A first round
  of each warms up and is not counted; the order alternates.

It asserts nothing.

    python benchmarks/bench_distributed_run.py                       # 1 GiB, 4 ranks
    python benchmarks/bench_distributed_run.py --size-gb 0.25 --boundaries 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch
import torch.distributed as dist
from bench_distributed import build_state, local_bytes

BLOCKS = 3
GIB = 1 << 30


# ---------------------------------------------------------------- the step boundary


def gaps(steps: Any, step_seconds: float) -> list[float]:
    """Seconds between one step body's end and the next one's start, for every boundary."""
    measured: list[float] = []
    last = None
    for _ in steps:
        start = time.perf_counter()
        if last is not None:
            measured.append(start - last)
        if step_seconds:
            time.sleep(step_seconds)
        last = time.perf_counter()
    return measured


def run_gaps(directory: Path, count: int, step_seconds: float) -> list[float]:
    from killsafe import Run

    options = {"save_every_steps": 10**9, "save_on_exit": False, "progress": False}
    with Run(directory, total_steps=count, **options) as run:
        return gaps(run.steps(), step_seconds)


class FlagTimes:
    """Times the two parts of a job's boundary that talk to the other ranks.

    Wraps ``TorchCoordinator.max_async`` in this process: ``started`` gets
    the time to start the flags' all_reduce, ``waited`` the time to wait for
    the one started at the boundary before (a microsecond or two of the
    wrapping's own is in both).
    """

    def __init__(self) -> None:
        self.started: list[float] = []
        self.waited: list[float] = []

    def install(self) -> None:
        from killsafe.distributed.process_group import TorchCoordinator

        original = TorchCoordinator.max_async
        started, waited = self.started, self.waited

        def max_async(coordinator: Any, values: tuple[int, ...]) -> Any:
            began = time.perf_counter()
            pending = original(coordinator, values)
            started.append(time.perf_counter() - began)
            wait = pending.wait

            def timed_wait() -> Any:
                began = time.perf_counter()
                try:
                    return wait()
                finally:
                    waited.append(time.perf_counter() - began)

            pending.wait = timed_wait
            return pending

        TorchCoordinator.max_async = max_async

    def take(self) -> tuple[list[float], list[float]]:
        """The times since the last ``take``."""
        taken = (list(self.started), list(self.waited))
        self.started.clear()
        self.waited.clear()
        return taken


def bench_boundaries(args: argparse.Namespace, out: Path) -> dict[str, list[float]]:
    """This rank's boundary gaps, bare and in a ``Run``, with empty and with timed steps;
    in a job, also what starting and waiting for the boundary's flags took."""
    step_seconds = args.step_ms / 1000
    flags = FlagTimes()
    if args.world > 1:
        flags.install()
    result: dict[str, list[float]] = {}
    for block in range(BLOCKS):
        for kind, count, seconds in (
            ("empty", args.boundaries, 0.0),
            ("timed", args.timed_boundaries, step_seconds),
        ):
            result.setdefault(f"bare_{kind}", []).extend(gaps(range(count), seconds))
            run_dir = out / f"run-{args.world}-{kind}-{block}"
            result.setdefault(f"run_{kind}", []).extend(run_gaps(run_dir, count, seconds))
            started, waited = flags.take()
            result.setdefault(f"started_{kind}", []).extend(started)
            result.setdefault(f"waited_{kind}", []).extend(waited)
    return result


# ---------------------------------------------------------------- background saves


def sharded_model(size_gb: float, world: int, rank: int) -> tuple[Any, Any]:
    """A module whose parameters are row-sharded DTensors, with Adam states like them."""
    state = build_state(size_gb, world, rank, fill=True)
    model = torch.nn.Module()
    for name, tensor in state["model"].items():
        model.register_parameter(name, torch.nn.Parameter(tensor))
    optimizer = torch.optim.Adam(model.parameters())
    for name, parameter in model.named_parameters():
        optimizer.state[parameter] = {
            "step": torch.tensor(1.0),
            "exp_avg": state["optim"]["exp_avg"][name],
            "exp_avg_sq": state["optim"]["exp_avg_sq"][name],
        }
    return model, optimizer


def bench_background(args: argparse.Namespace, coordinator: Any, out: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from killsafe import CheckpointStore
    from killsafe.run.group import GroupStore, RunGroup

    model, optimizer = sharded_model(args.size_gb, args.world, args.rank)
    ours = GroupStore(CheckpointStore(out / "ours"), RunGroup(coordinator))
    dcp_group = dist.new_group(backend="gloo")

    def save_ours(round_: int) -> Any:
        pending = ours.save_async({"model": model, "optimizer": optimizer}, step=round_)
        return lambda: ours.wait() or pending.wait()

    def save_dcp(round_: int) -> Any:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        writer = dcp.FileSystemWriter(str(out / f"dcp-{round_}"))
        future = dcp.async_save(state, storage_writer=writer, process_group=dcp_group)
        return future.result

    savers = {"ours": save_ours, "dcp": save_dcp}
    times: dict[str, dict[str, list[float]]] = {
        kind: {"blocked": [], "done": []} for kind in savers
    }
    for round_ in range(args.rounds + 1):  # round 0 warms up
        order = ["ours", "dcp"] if round_ % 2 == 0 else ["dcp", "ours"]
        for kind in order:
            coordinator.barrier("a timed save")
            start = time.perf_counter()
            finish = savers[kind](round_ + 1)
            blocked = time.perf_counter() - start
            finish()
            done = time.perf_counter() - start
            slowest = coordinator.gather([blocked, done])
            if round_:
                times[kind]["blocked"].append(max(b for b, _ in slowest))
                times[kind]["done"].append(max(d for _, d in slowest))
            coordinator.barrier("written")
            if args.rank == 0:
                for path in out.glob("dcp-*"):
                    shutil.rmtree(path)
                shutil.rmtree(out / "ours", ignore_errors=True)
            coordinator.barrier("cleaned up")
            time.sleep(args.settle)
    total = coordinator.gather(local_bytes(model.state_dict()) * 3)
    return {"times": times, "bytes": sum(total)}


# ---------------------------------------------------------------- one rank


def rank_main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.world > 1 or args.part == "save":
        store = dist.TCPStore("127.0.0.1", args.port, None, False, timeout=timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world)
    if args.part == "boundaries":
        result: dict[str, Any] = bench_boundaries(args, out)
        name = f"boundaries-{args.world}-{args.flag_period}-{args.rank}.json"
        Path(out, name).write_text(json.dumps(result))
    else:
        from killsafe.distributed import TorchCoordinator

        coordinator = TorchCoordinator(timeout=600)
        result = bench_background(args, coordinator, out)
        if args.rank == 0:
            Path(out, "save.json").write_text(json.dumps(result))
        coordinator.barrier("the end")
    os._exit(0)


# ---------------------------------------------------------------- the launcher


def launch(
    args: argparse.Namespace, part: str, world: int, out: Path, flag_period: str = "default"
) -> None:
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=120), wait_for_workers=False
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KILLSAFE_FLAG_PERIOD", None)
    if flag_period != "default":
        env["KILLSAFE_FLAG_PERIOD"] = flag_period
    common = [f"--port={store.port}", f"--out={out}", f"--size-gb={args.size_gb}"]
    common += [f"--rounds={args.rounds}", f"--boundaries={args.boundaries}", f"--world={world}"]
    common += [f"--step-ms={args.step_ms}", f"--settle={args.settle}", f"--part={part}"]
    common += [f"--timed-boundaries={args.timed_boundaries}", f"--flag-period={flag_period}"]
    ranks = [
        subprocess.Popen([sys.executable, __file__, f"--rank={rank}", *common], env=env)
        for rank in range(world)
    ]
    codes = [process.wait() for process in ranks]
    if any(codes):
        raise SystemExit(f"the {part} ranks of {world} exited with {codes}")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def report_boundaries(args: argparse.Namespace, out: Path, jobs: list[tuple[int, str]]) -> None:
    measured: dict[tuple[int, str], dict[str, list[float]]] = {}
    for world, period in jobs:
        merged: dict[str, list[float]] = {}
        for rank in range(world):
            ranked = json.loads((out / f"boundaries-{world}-{period}-{rank}.json").read_text())
            for key, values in ranked.items():
                merged.setdefault(key, []).extend(values)
        measured[(world, period)] = merged
    for kind, title in (
        ("empty", "steps that do nothing"),
        ("timed", f"{args.step_ms:g} ms steps"),
    ):
        print(f"\nstep boundary, {title} (gap from a step's end to the next one's start)")
        print(f"  {'loop':38} {'count':>7} {'mean us':>9} {'median us':>10} {'p99 us':>9}", end="")
        print(f" {'share of a step':>16}" if kind == "timed" else "")
        alone = statistics.fmean(measured[jobs[0]][f"run_{kind}"])
        share = args.step_ms / 1000 if kind == "timed" else None
        for world, period in jobs:
            values = measured[(world, period)]
            if world == 1:
                print_row("bare loop", values[f"bare_{kind}"], share)
                print_row("Run, one process (no group)", values[f"run_{kind}"], share)
                continue
            print_row(f"Run, {world} ranks, flag period {period}", values[f"run_{kind}"], share)
            boundaries = len(values[f"run_{kind}"])
            for part, label in (("started", "start the flags"), ("waited", "wait for them")):
                spent = sum(values[f"{part}_{kind}"]) / boundaries
                exchanges = len(values[f"{part}_{kind}"])
                print(f"    of which: {label:26} {exchanges:7d} {spent * 1e6:9.1f} per boundary")
        for world, period in jobs[1:]:
            cost = statistics.fmean(measured[(world, period)][f"run_{kind}"]) - alone
            print(
                f"  agreeing on {world} ranks, flag period {period} "
                f"(a job's Run minus a lone one): {cost * 1e6:8.1f} us"
                + (f" = {cost / share:.2%} of a step" if share else "")
            )


def print_row(label: str, values: list[float], step: float | None = None) -> None:
    mean = statistics.fmean(values)
    print(
        f"  {label:34} {len(values):7d} {mean * 1e6:9.1f} "
        f"{statistics.median(values) * 1e6:10.1f} {percentile(values, 0.99) * 1e6:9.1f}"
        + (f" {mean / step:15.2%}" if step else "")
    )


def report_save(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    times = saved["times"]
    gib = saved["bytes"] / GIB
    ref = min(times["dcp"]["blocked"])
    print(
        f"\nbackground save, {gib:.2f} GiB DTensor model + Adam on {args.ranks} ranks "
        f"(slowest rank, best of {args.rounds})"
    )
    print(f"  {'':38} {'blocked s':>9} {'median':>8} {'written s':>10} {'blocked vs dcp':>15}")
    rows = (("dcp.async_save + FileSystemWriter", "dcp"), ("GroupStore.save_async", "ours"))
    for label, kind in rows:
        blocked, done = times[kind]["blocked"], times[kind]["done"]
        print(
            f"  {label:38} {min(blocked):9.3f} {statistics.median(blocked):8.3f} "
            f"{min(done):10.3f} {min(blocked) / ref:14.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--ranks", type=int, default=4, help="ranks that save")
    parser.add_argument("--worlds", default="2,4", help="job sizes timed at the boundary")
    parser.add_argument("--boundaries", type=int, default=2000, help="empty steps per block")
    parser.add_argument("--timed-boundaries", type=int, default=200, help="timed steps per block")
    parser.add_argument("--step-ms", type=float, default=20.0, help="the timed step's length")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each save")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between saves")
    parser.add_argument("--parts", default="boundaries,save", help="what to measure")
    parser.add_argument(
        "--flag-periods",
        default="default,0",
        help="KILLSAFE_FLAG_PERIOD values the jobs' boundaries run with (default: unset)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go")
    for hidden in ("--part", "--out", "--flag-period"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--rank", "--world", "--port"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        rank_main(args)
        return
    parts = args.parts.split(",")
    worlds = [int(w) for w in args.worlds.split(",")]
    jobs = [(1, "default")]
    jobs += [(world, period) for world in worlds for period in args.flag_periods.split(",")]
    parent = args.dir or Path(__file__).resolve().parent.parent
    out = Path(tempfile.mkdtemp(prefix=".bench-distributed-run-", dir=parent))
    try:
        print(f"{args.size_gb} GiB state on {args.ranks} ranks; boundaries on {worlds}; {out}")
        if "boundaries" in parts:
            for world, period in jobs:
                launch(args, "boundaries", world, out, period)
            report_boundaries(args, out, jobs)
        if "save" in parts:
            launch(args, "save", args.ranks, out)
            report_save(args, json.loads((out / "save.json").read_text()))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
