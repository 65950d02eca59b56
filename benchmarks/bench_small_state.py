"""Durable small-state saves: Journal append vs CheckpointStore.save vs SQLite WAL.

A trading bot saves its portfolio (about 2 KB) after every trade and cannot
lose one. This measures, on the same disk and in the same run, the latency of
one durable save of such a state three ways:

- ``Journal.append``: one write + fdatasync of a checksummed record;
- ``CheckpointStore.save``: a whole checkpoint directory (files, fsyncs, rename);
- SQLite in WAL mode with ``synchronous=FULL``: one UPDATE of a 2 KB blob per commit.

    python benchmarks/bench_small_state.py [--n 500] [--dir PATH]

Prints a table of p50/p99 latencies in milliseconds and the ratios to SQLite.
The three are interleaved save by save, so that all see the same load on the disk.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from killsafe.journal import Journal, encode_record
from killsafe.store import CheckpointStore


def portfolio(i: int) -> dict:
    rng = random.Random(i)
    symbols = ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "META", "TSLA", "JPM"]
    return {
        "cash": 100_000.0 - i * 1.25,
        "positions": {s: rng.randint(0, 500) for s in symbols},
        "trades": [
            {
                "t": i - k,
                "sym": rng.choice(symbols),
                "qty": rng.randint(-50, 50),
                "px": rng.random(),
            }
            for k in range(32)
        ],
        "n_trades": i,
    }


def timed(n: int, ops: list[Callable[[int], None]]) -> list[list[float]]:
    """Latencies in ms of each op, interleaved round by round so that all see the same disk."""
    for i in range(min(20, n)):  # warm up: files created, caches filled
        for op in ops:
            op(-1 - i)
    out: list[list[float]] = [[] for _ in ops]
    for i in range(n):
        for op, times in zip(ops, out, strict=True):
            start = time.perf_counter()
            op(i)
            times.append((time.perf_counter() - start) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="saves per method")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-small-", dir=args.dir))
    size = len(encode_record(portfolio(0)))

    journal = Journal(base / "journal", compact_every=10**9)
    store = CheckpointStore(base / "store", keep_last=2)
    steps = iter(range(10**9))
    db = sqlite3.connect(base / "state.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE state (id INTEGER PRIMARY KEY, blob BLOB)")
    db.execute("INSERT INTO state VALUES (1, ?)", (b"",))

    def sqlite_save(i: int) -> None:
        blob = json.dumps(portfolio(i), separators=(",", ":")).encode()
        db.execute("BEGIN")
        db.execute("UPDATE state SET blob = ? WHERE id = 1", (blob,))
        db.execute("COMMIT")

    t_journal, t_store, t_sqlite = timed(
        args.n,
        [
            lambda i: journal.append(portfolio(i)),
            lambda i: store.save(portfolio(i), step=next(steps)),
            sqlite_save,
        ],
    )
    journal.close()
    store.close()
    db.close()

    shutil.rmtree(base)
    ref = statistics.median(t_sqlite)
    rows = [
        ("Journal.append (O_DSYNC write)", t_journal),
        ("CheckpointStore.save", t_store),
        ("SQLite WAL synchronous=FULL", t_sqlite),
    ]
    results = [
        {
            "method": name,
            "p50_ms": statistics.median(t),
            "p99_ms": pct(t, 99),
            "p50_vs_sqlite": statistics.median(t) / ref,
        }
        for name, t in rows
    ]
    if args.json:
        print(json.dumps({"state_bytes": size, "n": args.n, "rows": results}))
        return
    print(f"durable save of a {size}-byte state, {args.n} saves each, on the disk of {base.parent}")
    print(f"| {'method':<36} | {'p50 ms':>7} | {'p99 ms':>7} | {'p50 / SQLite':>12} |")
    print(f"|{'-' * 38}|{'-' * 9}|{'-' * 9}|{'-' * 14}|")
    for r in results:
        print(
            f"| {r['method']:<36} | {r['p50_ms']:>7.3f} | {r['p99_ms']:>7.3f} "
            f"| {r['p50_vs_sqlite']:>12.2f} |"
        )


if __name__ == "__main__":
    main()
