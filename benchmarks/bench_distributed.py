"""Benchmark the distributed room: agreeing at step boundaries, sharded saves and loads.

Launches real gloo processes on 127.0.0.1 (this script, one process per
rank) and prints one table of ratios measured in the same run:

- the cost of ``TorchCoordinator.agree`` per step, against a 20 ms step
  (a loop of ``time.sleep(0.02)`` steps, with and without agreeing, and
  the time the loop spends inside the calls); the loop's own numbers
  include the ranks' drift, which agreeing every step takes up;
- a synchronous sharded save of a DTensor state (model and Adam moments,
  rows sharded over the ranks): ``save_sharded`` against ``dcp.save`` with
  DCP's ``FileSystemWriter``;
- loading it resharded onto fewer ranks: ``load_sharded`` against
  ``dcp.load`` with ``FileSystemReader``, cold (the files dropped from the
  page cache with ``posix_fadvise``) and warm.

It asserts nothing.

    python benchmarks/bench_distributed.py                   # 1 GiB, 4 ranks, load on 2
    python benchmarks/bench_distributed.py --size-gb 0.25    # quick run
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

GIB = 1 << 30
STEP_SECONDS = 0.02
SETTLE_SECONDS = 1.0
TENSORS = 8  # per kind: parameters, exp_avg, exp_avg_sq
WIDTH = 4096


# ---------------------------------------------------------------- inside a rank


def shapes(size_gb: float) -> list[tuple[int, int]]:
    rows = max(12, round(size_gb * GIB / (3 * TENSORS * WIDTH * 4) / 12) * 12)  # splits evenly
    return [(rows, WIDTH)] * TENSORS


def build_state(size_gb: float, world: int, rank: int, fill: bool) -> dict[str, Any]:
    """Model and Adam moments as DTensors sharded by rows; each rank makes only its shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(rank)
    state: dict[str, Any] = {"model": {}, "optim": {"exp_avg": {}, "exp_avg_sq": {}}}
    for i, (rows, cols) in enumerate(shapes(size_gb)):
        local_rows = rows // world
        for place in (state["model"], state["optim"]["exp_avg"], state["optim"]["exp_avg_sq"]):
            local = (
                torch.randn(local_rows, cols, generator=generator)
                if fill
                else torch.zeros(local_rows, cols)
            )
            place[f"layer{i}"] = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=(rows, cols), stride=(cols, 1)
            )
    return state


def local_bytes(state: Any) -> int:
    if isinstance(state, dict):
        return sum(local_bytes(v) for v in state.values())
    local = state.to_local()
    return int(local.numel() * local.element_size())


def drop_cache(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(coordinator: Any, call: Any) -> float:
    """Seconds from all ranks starting to all ranks done, as rank 0 sees it."""
    coordinator.barrier("a timed call")
    start = time.perf_counter()
    call()
    coordinator.barrier("a timed call")
    return time.perf_counter() - start


def bench_agree(coordinator: Any, steps: int) -> dict[str, float]:
    from killsafe.distributed import Vote

    quiet = Vote()
    asking = Vote(save="every 500 steps", name="step-000500") if coordinator.rank == 0 else quiet
    calls = 2000
    result = {
        "quiet": timed(coordinator, lambda: [coordinator.agree(quiet) for _ in range(calls)]),
        "asking": timed(coordinator, lambda: [coordinator.agree(asking) for _ in range(calls)]),
    }
    result = {k: v / calls for k, v in result.items()}

    blocked: dict[str, float] = {"agreed": 0.0, "pipelined": 0.0}

    def steps_without() -> None:
        for _ in range(50):
            time.sleep(STEP_SECONDS)

    def steps_with() -> None:
        for _ in range(50):
            time.sleep(STEP_SECONDS)
            start = time.perf_counter()
            coordinator.agree(quiet)
            blocked["agreed"] += time.perf_counter() - start

    def steps_pipelined() -> None:
        pending = coordinator.agree_async(quiet)
        for _ in range(50):
            time.sleep(STEP_SECONDS)
            start = time.perf_counter()
            pending.wait()  # the decision of the step before
            pending = coordinator.agree_async(quiet)
            blocked["pipelined"] += time.perf_counter() - start
        pending.wait()

    loops: dict[str, list[float]] = {"plain": [], "agreed": [], "pipelined": []}
    blocks = max(1, steps // 50)
    for _ in range(blocks):  # interleaved blocks of 50 steps
        loops["plain"].append(timed(coordinator, steps_without) / 50)
        loops["agreed"].append(timed(coordinator, steps_with) / 50)
        loops["pipelined"].append(timed(coordinator, steps_pipelined) / 50)
    for kind, times in loops.items():
        result[f"loop_{kind}"] = statistics.median(times)
    for kind, seconds in blocked.items():
        result[f"blocked_{kind}"] = seconds / (50 * blocks)
    return result


def bench_save(args: argparse.Namespace, coordinator: Any, rank: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from killsafe.distributed import save_sharded

    state = build_state(args.size_gb, coordinator.world_size, rank, fill=True)
    root = Path(args.out)
    times: dict[str, list[float]] = {"dcp": [], "ours": []}

    def save_dcp(target: Path) -> None:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(target)))

    def save_ours(target: Path) -> None:
        save_sharded(state, target, coordinator=coordinator)

    savers = {"dcp": save_dcp, "ours": save_ours}
    for round_ in range(args.repeat):
        order = ["dcp", "ours"] if round_ % 2 == 0 else ["ours", "dcp"]
        for kind in order:
            target = root / f"{kind}-{round_}"
            times[kind].append(timed(coordinator, lambda k=kind, t=target: savers[k](t)))
            if round_ < args.repeat - 1 and rank == 0:
                shutil.rmtree(target)
            coordinator.barrier("cleaning up")
            time.sleep(SETTLE_SECONDS)
    total = coordinator.gather(local_bytes(state))
    return {"times": times, "bytes": sum(total), "last": args.repeat - 1}


def bench_load(args: argparse.Namespace, coordinator: Any, rank: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from killsafe.distributed import load_sharded

    state = build_state(args.size_gb, coordinator.world_size, rank, fill=False)
    root = Path(args.out)
    last = args.repeat - 1
    sources = {"dcp": root / f"dcp-{last}", "ours": root / f"ours-{last}"}
    loaders = {
        "dcp": lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(str(sources["dcp"]))),
        "ours": lambda: load_sharded(state, sources["ours"], coordinator=coordinator),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"cold": [], "warm": []} for k in loaders}
    loaded: dict[str, list[torch.Tensor]] = {}
    for round_ in range(args.repeat):
        order = ["dcp", "ours"] if round_ % 2 == 0 else ["ours", "dcp"]
        for kind in order:
            if rank == 0:
                drop_cache(sources[kind])
            times[kind]["cold"].append(timed(coordinator, loaders[kind]))
            times[kind]["warm"].append(timed(coordinator, loaders[kind]))
            loaded[kind] = [t.to_local().clone() for t in _tensors(state)]
            time.sleep(SETTLE_SECONDS)
    same = all(torch.equal(a, b) for a, b in zip(loaded["dcp"], loaded["ours"], strict=True))
    return {"times": times, "same": coordinator.gather(same)}


def _tensors(state: Any) -> list[Any]:
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    return [state]


def rank_main(args: argparse.Namespace) -> None:
    from killsafe.distributed import TorchCoordinator

    store = dist.TCPStore("127.0.0.1", args.port, None, False, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world)
    coordinator = TorchCoordinator(timeout=600)
    result: dict[str, Any] = {}
    if args.role == "save":
        result["agree"] = bench_agree(coordinator, args.steps)
        result["save"] = bench_save(args, coordinator, args.rank)
    else:
        result["load"] = bench_load(args, coordinator, args.rank)
    if args.rank == 0:
        Path(args.out, f"{args.role}.json").write_text(json.dumps(result))
    coordinator.barrier("the end")
    os._exit(0)


# ---------------------------------------------------------------- the launcher


def launch(args: argparse.Namespace, role: str, world: int, out: Path) -> dict[str, Any]:
    store = dist.TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=120), wait_for_workers=False
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [f"--port={store.port}", f"--out={out}", f"--size-gb={args.size_gb}"]
    common += [f"--repeat={args.repeat}", f"--steps={args.steps}", f"--world={world}"]
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, f"--role={role}", f"--rank={rank}", *common], env=env
        )
        for rank in range(world)
    ]
    codes = [process.wait() for process in ranks]
    if any(codes):
        raise SystemExit(f"the {role} ranks exited with {codes}")
    return dict(json.loads((out / f"{role}.json").read_text()))


def report(args: argparse.Namespace, saved: dict[str, Any], loaded: dict[str, Any]) -> None:
    agree = saved["agree"]
    step = agree["loop_plain"]
    rows = [
        ("nothing to decide (one all_reduce)", agree["quiet"], agree["quiet"] / STEP_SECONDS),
        ("rank 0 asks to save (+ broadcast)", agree["asking"], agree["asking"] / STEP_SECONDS),
        ("20 ms steps, agree: loop slower by", agree["loop_agreed"] - step, 0.0),
        ("  of which blocked in agree (mean)", agree["blocked_agreed"], 0.0),
        ("20 ms steps, agree_async: slower by", agree["loop_pipelined"] - step, 0.0),
        ("  of which blocked in wait+start", agree["blocked_pipelined"], 0.0),
    ]
    print(f"\nagree on {args.ranks} gloo ranks{'per step':>26}{'share of a 20 ms step':>24}")
    for label, seconds, share in rows:
        share = share or seconds / step
        print(f"  {label:38} {seconds * 1e6:8.1f} us {share:14.2%}")

    save = saved["save"]
    gib = save["bytes"] / GIB
    ref = min(save["times"]["dcp"])
    print(f"\nsync save, {gib:.2f} GiB DTensor state on {args.ranks} ranks (best of {args.repeat})")
    print(f"  {'':38} {'best s':>8} {'median s':>9} {'GiB/s':>7} {'vs dcp.save':>12}")
    for label, kind in (("dcp.save + FileSystemWriter", "dcp"), ("save_sharded", "ours")):
        runs = save["times"][kind]
        best, median = min(runs), statistics.median(runs)
        print(f"  {label:38} {best:8.3f} {median:9.3f} {gib / best:7.2f} {best / ref:11.2f}x")

    load = loaded["load"]["times"]
    same = all(loaded["load"]["same"])
    cold_ref, warm_ref = min(load["dcp"]["cold"]), min(load["dcp"]["warm"])
    print(
        f"\nload resharded {args.ranks} -> {args.load_ranks} ranks (best of {args.repeat}), "
        f"equal tensors from both: {same}"
    )
    print(f"  {'':38} {'cold s':>8} {'warm s':>8} {'vs dcp.load cold / warm':>25}")
    for label, kind in (("dcp.load + FileSystemReader", "dcp"), ("load_sharded", "ours")):
        cold, warm = min(load[kind]["cold"]), min(load[kind]["warm"])
        ratios = f"{cold / cold_ref:.2f}x / {warm / warm_ref:.2f}x"
        print(f"  {label:38} {cold:8.3f} {warm:8.3f} {ratios:>25}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="state size in GiB")
    parser.add_argument("--ranks", type=int, default=4, help="ranks that save")
    parser.add_argument("--load-ranks", type=int, default=2, help="ranks that load")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each save and load")
    parser.add_argument("--steps", type=int, default=300, help="20 ms steps per agree loop")
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints go")
    parser.add_argument("--role", choices=("save", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        rank_main(args)
        return
    parent = args.dir or Path(__file__).resolve().parent.parent
    out = Path(tempfile.mkdtemp(prefix=".bench-distributed-", dir=parent))
    try:
        print(f"{args.size_gb} GiB state, {args.ranks} ranks save, {args.load_ranks} load, {out}")
        saved = launch(args, "save", args.ranks, out)
        loaded = launch(args, "load", args.load_ranks, out)
        report(args, saved, loaded)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
