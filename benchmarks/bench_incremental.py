"""Incremental checkpoints: bytes written and save time against full saves.

Prints one table, every row measured in this run on this machine:

1. adapter fine-tune: a frozen base (``--base-mib``) plus ~20 MB of trainable
   adapters with their Adam state (a save every 50 steps: the adapters and
   their moments change, the base does not): bytes written per save and
   save time, incremental against a full save;
2. a replay buffer growing by 1% between saves: bytes written against a
   full save;
3. dense training where every tensor changes: save time, incremental
   against a non-incremental save (saves alternate, medians compared);
4. disk used by ``keep_last=5`` after the adapter saves, both stores.

Every save is synchronous and durable (fsynced) on the same disk.

Run: ``python benchmarks/bench_incremental.py [--base-mib 1024] [--rounds 8] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from killsafe.store import CheckpointStore

MIB = 1 << 20


def adapter_state(base_mib: int, rng: np.random.Generator) -> dict[str, Any]:
    """A frozen base of ``base_mib`` MiB (64 MiB layers, norms) and ~20 MB of adapters + Adam."""
    layers = max(1, base_mib // 64)
    base = {
        f"layer{i}": {
            "weight": rng.random(16 * MIB, dtype=np.float32),  # 64 MiB
            "norm": np.ones(4096, np.float32),
        }
        for i in range(layers)
    }
    per_adapter = max(1, round(20e6 / 3 / 4 / (2 * layers)))  # params + two moments = ~20 MB
    adapters = {f"lora{i}": rng.random(per_adapter, dtype=np.float32) for i in range(2 * layers)}
    adam = {
        key: {"exp_avg": np.zeros_like(value), "exp_avg_sq": np.zeros_like(value)}
        for key, value in adapters.items()
    }
    return {"base": base, "adapters": adapters, "adam": adam, "step": 0}


def train_adapters(state: dict[str, Any], rng: np.random.Generator) -> None:
    """50 steps change the adapters and their moments, never the base."""
    for key, value in state["adapters"].items():
        value += rng.standard_normal(value.shape, dtype=np.float32) * 1e-3
        state["adam"][key]["exp_avg"] += 1e-3
        state["adam"][key]["exp_avg_sq"] += 1e-6
    state["step"] += 50


def timed_save(store: CheckpointStore, state: Any, step: int) -> tuple[float, int]:
    """Seconds of one durable save, and the bytes it wrote."""
    start = time.perf_counter()
    info = store.save(state, step=step)
    elapsed = time.perf_counter() - start
    return elapsed, info.added if info.added is not None else info.size


def disk_used(directory: Path) -> int:
    return sum(
        os.lstat(os.path.join(root, name)).st_size
        for root, _, names in os.walk(directory)
        for name in names
    )


def adapter_rows(root: Path, base_mib: int, rounds: int) -> list[tuple[str, str, str, str]]:
    rng = np.random.default_rng(0)
    state = adapter_state(base_mib, rng)
    full = CheckpointStore(root / "adapter-full", keep_last=5)
    incremental = CheckpointStore(root / "adapter-incr", keep_last=5, incremental=True)
    incremental.save(state, step=0)  # the first incremental save writes everything
    full.save(state, step=0)
    times: dict[str, list[float]] = {"full": [], "incr": []}
    written: dict[str, list[int]] = {"full": [], "incr": []}
    for _ in range(rounds):
        train_adapters(state, rng)
        for kind, store in (("full", full), ("incr", incremental)):
            seconds, nbytes = timed_save(store, state, state["step"])
            times[kind].append(seconds)
            written[kind].append(nbytes)
    bytes_ratio = statistics.mean(written["incr"]) / statistics.mean(written["full"])
    time_ratio = statistics.median(times["incr"]) / statistics.median(times["full"])
    full_disk, incr_disk = disk_used(full.directory), disk_used(incremental.directory)
    full.close()
    incremental.close()
    what = f"adapter fine-tune ({base_mib} MiB base + 20 MB adapters/Adam)"
    return [
        (
            f"{what}: bytes written per save",
            f"{statistics.mean(written['incr']) / MIB:.1f} MiB vs "
            f"{statistics.mean(written['full']) / MIB:.1f} MiB",
            f"{bytes_ratio:.3f}",
            "<= 0.05",
        ),
        (
            f"{what}: save time",
            f"{statistics.median(times['incr']):.3f} s vs {statistics.median(times['full']):.3f} s",
            f"{time_ratio:.3f}x",
            "<= 0.2x",
        ),
        (
            "adapter fine-tune: disk used by keep_last=5",
            f"{incr_disk / MIB:.0f} MiB vs {full_disk / MIB:.0f} MiB",
            f"{incr_disk / full_disk:.3f}",
            "(smaller is better)",
        ),
    ]


def replay_row(root: Path, buffer_mib: int, rounds: int) -> tuple[str, str, str, str]:
    rng = np.random.default_rng(1)
    rows = buffer_mib * MIB // (84 * 84 + 4 + 4)
    observations = rng.integers(0, 255, (rows, 84, 84), dtype=np.uint8)
    actions = rng.integers(0, 18, rows, dtype=np.int32)
    rewards = rng.random(rows, dtype=np.float32)
    store = CheckpointStore(root / "replay", keep_last=2, incremental=True)
    grow = rows // 100
    size = 0
    store.save({"obs": observations, "act": actions, "rew": rewards}, step=0)
    written: list[int] = []
    for step in range(1, rounds + 1):
        fresh = rng.integers(0, 255, (grow, 84, 84), np.uint8)
        observations = np.concatenate([observations, fresh])
        actions = np.concatenate([actions, rng.integers(0, 18, grow, dtype=np.int32)])
        rewards = np.concatenate([rewards, rng.random(grow, dtype=np.float32)])
        state = {"obs": observations, "act": actions, "rew": rewards}
        _, nbytes = timed_save(store, state, step)
        written.append(nbytes)
        size = store.get(step).size
    store.close()
    return (
        f"replay buffer ({buffer_mib} MiB) growing 1% per save: bytes written",
        f"{statistics.mean(written) / MIB:.2f} MiB vs {size / MIB:.1f} MiB",
        f"{statistics.mean(written) / size:.3f}",
        "<= 0.03",
    )


def dense_row(root: Path, size_mib: int, rounds: int) -> tuple[str, str, str, str]:
    rng = np.random.default_rng(2)
    state = {f"w{i}": rng.random(4 * MIB, dtype=np.float32) for i in range(size_mib // 16)}
    state.update({f"b{i}": rng.random(1024, dtype=np.float32) for i in range(64)})
    stores = {
        "full": CheckpointStore(root / "dense-full", keep_last=1),
        "incr": CheckpointStore(root / "dense-incr", keep_last=1, incremental=True),
    }
    times: dict[str, list[float]] = {"full": [], "incr": []}
    for step in range(rounds + 1):
        for value in state.values():
            value += 1.0  # every tensor changes
        order = ("full", "incr") if step % 2 else ("incr", "full")
        for kind in order:
            seconds, _ = timed_save(stores[kind], state, step)
            if step:  # the first round warms both up
                times[kind].append(seconds)
    for store in stores.values():
        store.close()
    full, incr = statistics.median(times["full"]), statistics.median(times["incr"])
    return (
        f"dense training ({size_mib} MiB, every tensor changes): save time",
        f"{incr:.3f} s vs {full:.3f} s",
        f"{incr / full:.3f}x",
        "<= 1.05x",
    )


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    headers = ("case", "incremental vs full", "ratio", "goal")
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        return " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))

    print(line(headers))
    print("-+-".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-mib", type=int, default=1024, help="frozen base size")
    parser.add_argument("--buffer-mib", type=int, default=256, help="replay buffer size")
    parser.add_argument("--dense-mib", type=int, default=512, help="dense state size")
    parser.add_argument("--rounds", type=int, default=8, help="saves per case")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-incremental-", dir=args.dir))
    try:
        rows = adapter_rows(root, args.base_mib, args.rounds)
        rows.append(replay_row(root, args.buffer_mib, args.rounds))
        rows.append(dense_row(root, args.dense_mib, args.rounds))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(rows)


if __name__ == "__main__":
    main()
