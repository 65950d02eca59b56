"""Non-blocking saves: how long the loop is blocked, what it costs a training loop.

Prints one table of ratios, every row measured in this run on this machine:

1. time the loop is blocked per save of a ~1 GiB torch state (model + Adam):
   killsafe's fork snapshot and reused-buffer copy, against a plain copy of
   the state into preallocated buffers and against
   ``torch.distributed.checkpoint.async_save`` (single process, gloo);
   on a GPU (when one is visible) the state lives there and the baseline is a
   pinned device-to-host copy into preallocated buffers;
2. wall-time overhead of saving every 50 steps on a real training loop
   against the same loop without checkpoints;
3. throughput to durable storage of the background write against the
   store's synchronous save;
4. zstd (as the store writes it) against gzip level 6 on the same bytes.

Run: ``python benchmarks/bench_saver.py [--size-gb 1.0] [--width 1104] [--rounds 5]
[--loop-windows 12] [--parts blocked write loop zstd] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import gzip
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from killsafe.format import ZSTD_LEVEL
from killsafe.state import tensors_in
from killsafe.store import CheckpointStore

SETTLE_SECONDS = 3.0


def build_state(
    size_gb: float, width: int, device: str
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model whose parameters plus Adam's two moments weigh ``size_gb``.

    With the default width, 1 GiB is 73 layers, 584 tensors (146 weights and
    biases, their two moments and step counts), about what a 1 GiB
    transformer's state holds.
    """
    params_per_layer = width * width + width
    layers = max(1, round(size_gb * 2**30 / 12 / params_per_layer))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(4, width, device=device)).sum().backward()
    optimizer.step()
    return model, optimizer


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def tensors_of(tree: Any) -> list[torch.Tensor]:
    return list(tensors_in(tree))


def nbytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(tree))


def sync() -> None:
    """Wait for the GPU's queued work, so times count what it did (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def touch_every_parameter(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What an optimizer step does to memory: every parameter and moment changes."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-6)
        for group in optimizer.state.values():
            for value in group.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    value.mul_(0.999)


class PlainCopy:
    """The baseline: copy every tensor into preallocated buffers (pinned for CUDA)."""

    name = "plain copy"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.sources = tensors_of(state_of(model, optimizer))
        self.pinned = self.sources[0].is_cuda
        self.buffers = [
            torch.empty_like(t, device="cpu", pin_memory=self.pinned) for t in self.sources
        ]

    def save(self, step: int) -> Callable[[], None]:
        for buf, src in zip(self.buffers, self.sources, strict=True):
            buf.copy_(src, non_blocking=self.pinned)
        if self.pinned:
            torch.cuda.synchronize()
        return lambda: None

    def close(self) -> None:
        self.buffers = []


class KillsafeSave:
    """``CheckpointStore.save_async`` with one snapshot strategy."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: Path, snapshot: str
    ) -> None:
        self.name = f"{snapshot} snapshot"
        self.model, self.optimizer = model, optimizer
        self.store = CheckpointStore(root / f"ck-{snapshot}", keep_last=1, snapshot=snapshot)

    def save(self, step: int) -> Callable[[], None]:
        pending = self.store.save_async(state_of(self.model, self.optimizer), step)
        assert pending is not None

        def finish() -> None:
            pending.wait()

        return finish

    def close(self) -> None:
        self.store.close()


class DcpAsyncSave:
    """``torch.distributed.checkpoint.async_save`` in a one-process gloo group."""

    name = "DCP async_save"

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: Path
    ) -> None:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.dist, self.dcp = dist, dcp
        self.model, self.optimizer, self.root = model, optimizer, root
        init = f"file://{root / 'dist-init'}"
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)

    def save(self, step: int) -> Callable[[], None]:
        target = self.root / f"dcp-{step}"
        future: Any = self.dcp.async_save(
            state_of(self.model, self.optimizer), checkpoint_id=str(target)
        )

        def finish() -> None:
            future.result()
            shutil.rmtree(target, ignore_errors=True)

        return finish

    def close(self) -> None:
        self.dist.destroy_process_group()


def dcp_available() -> bool:
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint  # noqa: F401
    except ImportError:
        return False
    return dist.is_available()


def train_for(seconds: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What the loop does between two saves, as far as memory is concerned."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        touch_every_parameter(model, optimizer)
        sync()


def blocked_times(
    savers: list[Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, rounds: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Per saver: seconds blocked per save, and seconds of the next step after it.

    Rounds visit the savers in a new random order each time; each save starts
    after the previous one is durable and the loop has trained on for
    ``SETTLE_SECONDS`` (the state is hot, the snapshot buffers are not), as in
    a loop that saves every few minutes. The first save of each (allocations)
    is not counted.
    """
    results: dict[str, tuple[list[float], list[float]]] = {s.name: ([], []) for s in savers}
    order = random.Random(0)
    for round_index in range(rounds + 1):
        for saver in order.sample(savers, len(savers)):
            train_for(SETTLE_SECONDS, model, optimizer)
            start = time.perf_counter()
            finish = saver.save(round_index)
            blocked = time.perf_counter() - start
            start = time.perf_counter()
            touch_every_parameter(model, optimizer)  # the next step changes every tensor
            sync()
            touched = time.perf_counter() - start
            finish()
            if round_index > 0:
                results[saver.name][0].append(blocked)
                results[saver.name][1].append(touched)
    return results


def write_throughputs(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: Path, rounds: int
) -> dict[str, list[float]]:
    """GB/s to durable commit: the synchronous save, and the background save.

    The background save is timed twice: its write alone (from the return of
    ``save_async`` to the commit) and from the call (snapshot included). The
    two kinds alternate, so that the stalls of a shared virtual disk hit both
    alike; before each, the loop trains on for ``SETTLE_SECONDS`` while the
    previous write settles.
    """
    store = CheckpointStore(root / "ck-rate", keep_last=1)
    rates: dict[str, list[float]] = {"sync": [], "background write": [], "background call": []}
    size = nbytes(state_of(model, optimizer))
    for step in range(2 * rounds):
        train_for(SETTLE_SECONDS, model, optimizer)  # ends with the GPU idle
        start = time.perf_counter()
        if step % 2 == 0:
            store.save(state_of(model, optimizer), step)
            rates["sync"].append(size / (time.perf_counter() - start) / 1e9)
            continue
        pending = store.save_async(state_of(model, optimizer), step)
        returned = time.perf_counter()
        assert pending is not None
        pending.wait()
        end = time.perf_counter()
        rates["background write"].append(size / (end - returned) / 1e9)
        rates["background call"].append(size / (end - start) / 1e9)
    store.close()
    shutil.rmtree(root / "ck-rate", ignore_errors=True)
    return rates


@dataclass
class LoopOverhead:
    step_seconds: float
    wall: tuple[float, float]  # mean extra per window, as a fraction; half-width of its 95% CI
    cpu: tuple[float, float]
    windows: int


def loop_model(device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A model and batch whose training step takes tens of milliseconds on ``device``."""
    width, batch = (4096, 8192) if device == "cuda" else (1024, 256)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, 2 * width), torch.nn.ReLU(), torch.nn.Linear(2 * width, width)
    )
    return model.to(device), torch.randn(batch, width, device=device)


def training_overhead(root: Path, windows: int, every: int, device: str) -> LoopOverhead:
    """Wall and CPU time a save every ``every`` steps adds to a real training loop.

    One loop runs ``windows`` pairs of ``every``-step windows; the first
    window of each pair starts with ``save_async``, the second does not, so
    the drift of a shared machine's CPU hits both alike. The overhead is the
    mean difference within pairs, with its 95% confidence interval.
    """
    torch.manual_seed(0)
    model, data = loop_model(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def window(store: CheckpointStore | None, step: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        if store is not None:
            store.save_async({"model": model, "optimizer": optimizer}, step)
        for _ in range(every):
            optimizer.zero_grad()
            model(data).square().mean().backward()
            optimizer.step()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu

    store = CheckpointStore(root / "ck-loop", keep_last=2)
    window(store, 0)  # warm-up, and the buffers' first allocation
    wall_extra, cpu_extra, plain_wall = [], [], []
    for pair in range(1, windows + 1):
        with_wall, with_cpu = window(store, pair * every)
        without_wall, without_cpu = window(None, 0)
        wall_extra.append(with_wall / without_wall - 1)
        cpu_extra.append(with_cpu / without_cpu - 1)
        plain_wall.append(without_wall)
    store.close()
    shutil.rmtree(root / "ck-loop", ignore_errors=True)
    return LoopOverhead(
        step_seconds=statistics.median(plain_wall) / every,
        wall=mean_and_interval(wall_extra),
        cpu=mean_and_interval(cpu_extra),
        windows=windows,
    )


def mean_and_interval(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% confidence interval (normal approximation)."""
    return statistics.mean(values), 1.96 * statistics.stdev(values) / len(values) ** 0.5


def compression_speeds(sample: bytes) -> tuple[float, float]:
    import zstandard

    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    zstd_seconds = min(_seconds(lambda: compressor.compress(sample)) for _ in range(3))
    gzip_seconds = min(_seconds(lambda: gzip.compress(sample, compresslevel=6)) for _ in range(3))
    return len(sample) / zstd_seconds / 1e6, len(sample) / gzip_seconds / 1e6


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sample_bytes(state: dict[str, Any], size: int) -> bytes:
    chunks, total = [], 0
    for tensor in tensors_of(state):
        if tensor.dim() == 0:
            continue
        raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        chunks.append(raw[: size - total])
        total += len(chunks[-1])
        if total >= size:
            break
    return b"".join(chunks)


def row(name: str, value: str, ratio: str, goal: str) -> str:
    return f"| {name} | {value} | {ratio} | {goal} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=1104, help="of the state's linear layers")
    parser.add_argument("--rounds", type=int, default=5, help="saves measured per method")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    parser.add_argument("--loop-windows", type=int, default=12, help="pairs of 50-step windows")
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-saver-", dir=args.dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        rows = run_benchmarks(args, root, device)
        print("| measure | value | ratio | goal |")
        print("|---|---|---|---|")
        for line in rows:
            print(line)
    finally:
        shutil.rmtree(root, ignore_errors=True)


PARTS = ("blocked", "write", "loop", "zstd")


def run_benchmarks(args: argparse.Namespace, root: Path, device: str) -> list[str]:
    model, optimizer = build_state(args.size_gb, args.width, device)
    state = state_of(model, optimizer)
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"state: {nbytes(state) / 2**30:.2f} GiB in {len(tensors_of(state))} tensors on "
        f"{where}; torch {torch.__version__}; {args.rounds} rounds"
    )
    del state
    rows: list[str] = []
    if "blocked" in args.parts:
        rows += blocked_part(model, optimizer, root, device, args.rounds)
    if "write" in args.parts:
        rows += write_part(model, optimizer, root, max(args.rounds, 5))
    sample = sample_bytes(state_of(model, optimizer), 64 << 20)
    del model, optimizer
    if "loop" in args.parts:
        rows += loop_part(root, args.loop_windows, device)
    if "zstd" in args.parts:
        rows += zstd_part(sample)
    return rows


def blocked_part(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: Path, device: str, rounds: int
) -> list[str]:
    strategies = ["copy"] if device == "cuda" else ["copy", "fork"]
    savers: list[Any] = [PlainCopy(model, optimizer)]
    savers += [KillsafeSave(model, optimizer, root, s) for s in strategies]
    if dcp_available():
        savers.append(DcpAsyncSave(model, optimizer, root))
    # fork last: after a fork every page of the process, not only the state's,
    # is write-protected, and the first write to each costs the other methods
    # a page fault; measured among them, it would slow them down.
    forked = [s for s in savers if s.name == "fork snapshot"]
    try:
        times = blocked_times([s for s in savers if s not in forked], model, optimizer, rounds)
        times.update(blocked_times(forked, model, optimizer, rounds))
    finally:
        for saver in savers:
            saver.close()
    return blocked_rows(times, device)


def write_part(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: Path, rounds: int
) -> list[str]:
    rates = write_throughputs(model, optimizer, root, rounds)
    rows = []
    for kind, label in (("background write", "its write"), ("background call", "call to commit")):
        for pick, which in ((max, "best"), (statistics.median, "median")):
            bg_rate, sync_rate = pick(rates[kind]), pick(rates["sync"])
            rows.append(
                row(
                    f"background save ({label}) vs synchronous save, {which} run",
                    f"{bg_rate:.2f} vs {sync_rate:.2f} GB/s",
                    f"{bg_rate / sync_rate:.2f}x",
                    ">= 0.9x" if kind == "background write" else "",
                )
            )
    return rows


def loop_part(root: Path, windows: int, device: str) -> list[str]:
    loop = training_overhead(root, windows, 50, device)
    rows = []
    for label, (mean, half) in (("wall", loop.wall), ("CPU", loop.cpu)):
        rows.append(
            row(
                f"training loop ({loop.step_seconds * 1e3:.0f} ms/step), async save every 50 steps,"
                f" {label} time, {loop.windows} paired windows",
                f"{mean * 100:+.2f}% (95% CI {(mean - half) * 100:+.2f}% to "
                f"{(mean + half) * 100:+.2f}%)",
                "",
                "< 2% wall time" if label == "wall" else "",
            )
        )
    return rows


def zstd_part(sample: bytes) -> list[str]:
    zstd_rate, gzip_rate = compression_speeds(sample)
    return [
        row(
            f"zstd (level {ZSTD_LEVEL}, all cores) vs gzip -6, same 64 MiB, best of 3",
            f"{zstd_rate:.0f} vs {gzip_rate:.0f} MB/s",
            f"{zstd_rate / gzip_rate:.1f}x",
            ">= 20x",
        )
    ]


def blocked_rows(times: dict[str, tuple[list[float], list[float]]], device: str) -> list[str]:
    """Rows for the blocked time of each method, as ratios to the baselines."""
    baseline = "plain copy"
    baseline_label = "pinned D2H copy" if device == "cuda" else "plain copy"
    quiet = statistics.median(times[baseline][1])
    dcp = times.get("DCP async_save")
    rows = []
    for name, (blocked, touched) in times.items():
        med, best = statistics.median(blocked), min(blocked)
        ratios = [
            f"{med / statistics.median(times[baseline][0]):.2f}x {baseline_label}"
            if name != baseline
            else "1.00x"
        ]
        if dcp is not None and name != "DCP async_save":
            ratios.append(
                f"{med / statistics.median(dcp[0]):.2f}x DCP (best {best / min(dcp[0]):.2f}x)"
            )
        is_ours = name.endswith("snapshot")
        goal = ("<= 1.2x pinned copy" if device == "cuda" else "<= 0.5x DCP") if is_ours else ""
        rows.append(
            row(
                f"blocked per save, {name}" + ("" if is_ours else " (baseline)"),
                f"{med * 1e3:.1f} ms (best {best * 1e3:.1f})",
                ", ".join(ratios),
                goal,
            )
        )
        if name != baseline:
            extra = statistics.median(touched) - quiet
            rows.append(
                row(
                    f"next step after a {name} (changes every tensor)",
                    f"{extra * 1e3:+.1f} ms",
                    f"over {quiet * 1e3:.1f} ms after a plain copy",
                    "",
                )
            )
    return rows


if __name__ == "__main__":
    main()
