"""How much ``Progress.update(step)`` adds to one step of a loop.

Prints a table: nanoseconds per call of an empty loop, a plain Python
function call, ``time.monotonic()``, and ``Progress.update`` (plain lines and
the live display), with each one's ratio to a plain function call. The goal:
``update`` costs about as much as two plain calls, so even a loop of
microsecond steps does not notice it.

    python benchmarks/progress_update.py [--steps N]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from killsafe.progress import Progress


def per_call_ns(fn: Callable[[int], None], steps: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for step in range(steps):
            fn(step)
        best = min(best, (time.perf_counter_ns() - started) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    steps = parser.parse_args().steps

    def nothing(step: int) -> None:
        pass

    def clock(step: int) -> None:
        time.monotonic()

    plain = Progress(total=steps, stream=io.StringIO(), every=30.0)
    plain.start()
    disabled = Progress(total=steps, enabled=False)
    disabled.start()

    rows = [
        ("empty loop", per_call_ns(lambda step: None, steps)),
        ("plain function call", per_call_ns(nothing, steps)),
        ("time.monotonic()", per_call_ns(clock, steps)),
        ("Progress.update, plain lines", per_call_ns(plain.update, steps)),
        ("Progress.update, disabled", per_call_ns(disabled.update, steps)),
    ]
    plain.close()
    disabled.close()
    base = rows[1][1]
    print(f"{'what':<32}{'ns/call':>10}{'x plain call':>14}")
    for name, ns in rows:
        print(f"{name:<32}{ns:>10.1f}{ns / base:>14.2f}")


if __name__ == "__main__":
    main()
