"""Benchmark the checkpoint store against torch.save, safetensors and raw writes.

Prints a table; it is not a test and asserts nothing. Everything runs on the
same disk (``--dir``, default a temporary directory next to this repo).

    python benchmarks/bench_store.py                 # ~1 GiB model + Adam state
    python benchmarks/bench_store.py --size-gb 0.1   # quick run

Cold loads drop the page cache (``echo 1 > /proc/sys/vm/drop_caches`` when
root, ``posix_fadvise(DONTNEED)`` on the files otherwise).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch

from killsafe.store import CheckpointStore

GB = 1e9
SETTLE_SECONDS = 1.0


def build_state(size_gb: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP whose parameters are a third of ``size_gb``, plus Adam's two moments."""
    width = 2048
    per_layer = width * width * 4
    layers = max(1, round(size_gb * GB / 3 / per_layer))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    return model, opt


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    for group in opt.state_dict()["state"].values():
        tensors += [v for v in group.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_rename(tmp: Path, final: Path) -> None:
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(final.parent)


def flat_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, group in opt.state_dict()["state"].items():
        for key, value in group.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                flat[f"opt.{index}.{key}"] = value
    return flat


def raw_write(buffers: list[memoryview], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(buffers), 512):
            batch = buffers[start : start + 512]
            while batch:
                n = os.writev(fd, batch)
                while batch and n >= batch[0].nbytes:
                    n -= batch[0].nbytes
                    batch.pop(0)
                if n:
                    batch[0] = batch[0][n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_path(path.parent)


def tensor_views(flat: dict[str, torch.Tensor]) -> list[memoryview]:
    import ctypes

    views = []
    for t in flat.values():
        n = t.numel() * t.element_size()
        views.append(memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B"))
    return views


DROP_ALL = False


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages (posix_fadvise DONTNEED), or all caches with --drop-caches.

    Dropping every cache also evicts the code pages of libtorch and Python,
    which adds random reads to whatever runs next; evicting the checkpoint
    files alone measures a cold checkpoint without that noise.
    """
    os.sync()
    if DROP_ALL and os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def rounds(
    rows: dict[str, Callable[[], Any]], before: Callable[[], None] | None, repeat: int
) -> dict[str, list[float]]:
    """Seconds of every run of every row, ``repeat`` rounds.

    Rows are interleaved in a new random order every round, so that noise
    from other processes (and from a host's disk still flushing what the
    previous row wrote) hits every row alike rather than the one that
    always follows the heaviest.
    """
    labels = list(rows)
    times: dict[str, list[float]] = {label: [] for label in labels}
    order = random.Random(0)
    for _ in range(repeat):
        for label in order.sample(labels, len(labels)):
            if before is not None:
                before()
            gc.collect()
            start = time.perf_counter()
            rows[label]()
            times[label].append(time.perf_counter() - start)
    return times


def bench_saves(
    work: Path, model: Any, opt: Any, nbytes: int, repeat: int
) -> dict[str, tuple[float, float]]:
    """GB/s per save method: (best run, median run)."""
    flat = flat_tensors(model, opt)
    views = tensor_views(flat)
    store_dir = work / "store"
    counter = iter(range(10**6))

    def clear() -> None:
        for p in work.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        os.sync()
        time.sleep(SETTLE_SECONDS)  # let a virtual disk finish the previous row's writes

    def ours() -> None:
        store = CheckpointStore(store_dir)
        store.save({"model": model, "optimizer": opt}, next(counter))
        store.close()

    def ours_zstd() -> None:
        store = CheckpointStore(store_dir, compression="zstd")
        store.save({"model": model, "optimizer": opt}, next(counter))
        store.close()

    def torch_save() -> None:
        tmp, final = work / "ckpt.pt.tmp", work / "ckpt.pt"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
        durable_rename(tmp, final)

    def safetensors_save() -> None:
        from safetensors.torch import save_file

        path = work / "ckpt.safetensors"
        save_file(flat, str(path))
        fsync_path(path)

    def raw() -> None:
        raw_write(views, work / "raw.bin")

    rows = {
        "killsafe save (durable)": ours,
        "torch.save + fsync + rename": torch_save,
        "safetensors save_file + fsync": safetensors_save,
        "raw write of the bytes + fsync + rename": raw,
        "killsafe save, zstd": ours_zstd,
    }
    times = rounds(rows, clear, repeat)
    return {
        label: (nbytes / min(t) / GB, nbytes / statistics.median(t) / GB)
        for label, t in times.items()
    }


def bench_loads(work: Path, model: Any, opt: Any, nbytes: int, repeat: int) -> dict[str, Any]:
    for p in work.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    store = CheckpointStore(work / "store")
    info = store.save({"model": model, "optimizer": opt}, 1)
    store.close()
    pt = work / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, pt)

    live_moments = {
        index: {key: value for key, value in group.items() if isinstance(value, torch.Tensor)}
        for index, group in opt.state_dict()["state"].items()
    }

    def into_live(tree: dict[str, Any]) -> None:
        # Every byte lands in the live tensors. opt.load_state_dict would keep
        # the loaded (possibly memory-mapped) tensors as they are, so a lazy
        # loader would look fast by not reading two thirds of the state yet.
        model.load_state_dict(tree["model"])
        for index, moments in live_moments.items():
            for key, live in moments.items():
                live.copy_(tree["optimizer"]["state"][index][key])

    rows = {
        "killsafe load": lambda: into_live(store.load(info)),
        "killsafe load, mmap": lambda: into_live(store.load(info, mmap=True)),
        "killsafe load, mmap, verify=False": lambda: into_live(
            store.load(info, mmap=True, verify=False)
        ),
        "torch.load": lambda: into_live(torch.load(pt, weights_only=True)),
        "torch.load(mmap=True)": lambda: into_live(torch.load(pt, mmap=True, weights_only=True)),
    }
    cold = {k: min(t) for k, t in rounds(rows, lambda: drop_cache([info.path, pt]), repeat).items()}
    warm = {k: min(t) for k, t in rounds(rows, None, repeat).items()}
    return {label: (nbytes / cold[label] / GB, nbytes / warm[label] / GB) for label in rows}


def bench_listing(work: Path, count: int) -> tuple[float, float]:
    directory = work / "many"
    store = CheckpointStore(directory)
    small = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    for step in range(count):
        store.save({"model": small, "step": step}, step, metrics={"loss": 1.0 / (step + 1)})
    store.close()
    drop_cache([directory])
    reader = CheckpointStore(directory)
    start = time.perf_counter()
    assert len(reader.list()) == count
    cold = time.perf_counter() - start
    start = time.perf_counter()
    reader.list()
    return cold, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="state size (default 1.0)")
    parser.add_argument(
        "--repeat", type=int, default=5, help="runs per row; best and median reported"
    )
    parser.add_argument(
        "--drop-caches", action="store_true", help="cold = drop every cache (root only)"
    )
    parser.add_argument("--list-count", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (same disk)")
    args = parser.parse_args()
    global DROP_ALL
    DROP_ALL = args.drop_caches
    base = args.dir or Path(__file__).resolve().parent.parent / ".bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=base))
    try:
        model, opt = build_state(args.size_gb)
        nbytes = state_bytes(model, opt)
        tensors = len(flat_tensors(model, opt))
        print(f"state: {nbytes / GB:.2f} GB in {tensors} tensors, repeat={args.repeat} (best of)")
        saves = bench_saves(work, model, opt, nbytes, args.repeat)
        loads = bench_loads(work, model, opt, nbytes, args.repeat)
        cold, warm = bench_listing(work, args.list_count)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    torch_best, torch_median = saves["torch.save + fsync + rename"]
    raw_best, raw_median = saves["raw write of the bytes + fsync + rename"]
    print()
    print(f"{'durable save (best / median run)':<42} {'GB/s':>11} {'vs torch.save':>15} "
          f"{'vs raw':>13}")  # fmt: skip
    for label, (best, median) in saves.items():
        print(
            f"{label:<42} {best:5.2f} {median:5.2f} {best / torch_best:7.2f}x "
            f"{median / torch_median:5.2f}x {best / raw_best:5.2f}x {median / raw_median:5.2f}x"
        )
    ref_cold, ref_warm = loads["torch.load(mmap=True)"]
    print()
    print(f"{'load into live model + Adam':<42} {'cold GB/s':>9} {'warm GB/s':>9} "
          f"{'vs torch mmap cold/warm':>24}")  # fmt: skip
    for label, (c, w) in loads.items():
        print(f"{label:<42} {c:9.2f} {w:9.2f} {c / ref_cold:11.2f}x / {w / ref_warm:.2f}x")
    print()
    print(f"list() of {args.list_count} checkpoints: {cold:.3f} s cold, {warm:.3f} s warm")


if __name__ == "__main__":
    main()
