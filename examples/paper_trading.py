"""A paper-trading bot whose portfolio is saved durably after every trade.

The bot trades a few symbols on a simulated market (a seeded random walk per
tick) with a moving-average crossover. After every tick with a trade, the
whole bot state (cash, positions, the trade log, the price windows of the
strategy, the tick) is appended to a ``killsafe.journal.Journal``: one write
and one fdatasync, about the cost of a SQLite commit, so not one trade is
lost to a crash or a power cut. Every ``--save-every`` records (default 200)
the journal is compacted into a regular checkpoint. Ticks without a trade are
not saved: after a kill they are replayed from the last record, which gives
the very same state because the market and the strategy are deterministic::

    python examples/paper_trading.py --dir runs/bot

Ctrl+C, SIGTERM or ``--stop-after`` finishes the tick, appends the state and
exits. The standard flags apply to the journal: ``--save-every`` and
``--save-every-seconds`` set how often it is compacted, ``--keep-last`` the
checkpoints kept, ``--resume never --clear`` starts over, ``--progress-every``
the seconds between progress lines (``--serve`` needs a ``Run`` and is
ignored). The last line printed is ``result: ...``: the same for an
uninterrupted run and for one stopped and resumed with the same ``--dir``. ``--small`` or
``KILLSAFE_EXAMPLE_SMALL=1`` runs fewer ticks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import killsafe
from killsafe.arguments import options_from_args
from killsafe.errors import ConfigError, KillsafeError
from killsafe.interrupt import StopRequests
from killsafe.journal import Journal

SYMBOLS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG")
FAST, SLOW = 5, 20
LOT = 10


def new_state() -> dict[str, Any]:
    return {
        "tick": 0,
        "cash": 100_000.0,
        "positions": {s: 0 for s in SYMBOLS},
        "prices": {s: [100.0] for s in SYMBOLS},
        "trades": [],  # the newest 50 trades
        "n_trades": 0,
        "fees": 0.0,
    }


def market_move(seed: int, tick: int, symbol: str, price: float) -> float:
    """The next price: a seeded random walk, a pure function of (seed, tick, symbol)."""
    rng = random.Random(f"{seed}:{tick}:{symbol}")
    return round(price * (1.0 + rng.gauss(0.0, 0.004)), 4)


def trade_tick(state: dict[str, Any], seed: int) -> int:
    """Advance the market one tick and trade on it; returns the number of trades."""
    tick = state["tick"]
    made = 0
    for symbol in SYMBOLS:
        window = state["prices"][symbol]
        price = market_move(seed, tick, symbol, window[-1])
        window.append(price)
        del window[: -SLOW - 1]
        if len(window) <= SLOW:
            continue
        fast = sum(window[-FAST:]) / FAST
        slow = sum(window[-SLOW:]) / SLOW
        held = state["positions"][symbol]
        qty = LOT if held == 0 and fast > slow * 1.002 and price * LOT < state["cash"] else 0
        qty = -held if fast < slow * 0.998 and held > 0 else qty
        if qty:
            fee = round(abs(qty) * price * 0.0005, 6)
            state["cash"] = round(state["cash"] - qty * price - fee, 6)
            state["fees"] = round(state["fees"] + fee, 6)
            state["positions"][symbol] = held + qty
            state["trades"].append({"tick": tick, "symbol": symbol, "qty": qty, "price": price})
            del state["trades"][:-50]
            state["n_trades"] += 1
            made += 1
    state["tick"] = tick + 1
    return made


def open_journal(options: dict[str, Any], small: bool) -> Journal:
    """The journal of ``--dir``, emptied first with ``--resume never --clear``."""
    directory = Path(options["directory"])
    resume = str(options.get("resume", "auto"))
    if resume not in ("auto", "never"):
        raise ConfigError(
            f"--resume {resume}: the bot resumes from its journal only; "
            "use --resume auto, or --resume never --clear to start over"
        )
    compact_every = options.get("save_every_steps") or (50 if small else 200)
    keep_last = options.get("keep_last") or 2
    journal = Journal(directory, compact_every=compact_every, keep_last=keep_last)
    if resume == "never" and journal.seq:
        journal.close()
        if not options.get("clear"):
            raise ConfigError(
                f"{directory} holds a journal at record {journal.seq}; "
                "pass --clear with --resume never to delete it, or use another --dir"
            )
        shutil.rmtree(directory / "journal")
        shutil.rmtree(directory / "checkpoints")
        journal = Journal(directory, compact_every=compact_every, keep_last=keep_last)
    return journal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    killsafe.add_arguments(parser, directory="runs/paper_trading")
    parser.add_argument("--ticks", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="a tiny run for tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = options_from_args(args)
    small = args.small or os.environ.get("KILLSAFE_EXAMPLE_SMALL") == "1"
    ticks = args.ticks or (2000 if small else 60_000)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("paper_trading")
    if options.get("serve"):
        log.warning("--serve is ignored: the bot keeps a journal, not a Run directory")
    started = time.monotonic()
    deadline = started + options["stop_after"] if options.get("stop_after") else None
    compact_seconds = options.get("save_every_seconds")
    progress_every = options.get("progress_every") or 30.0

    stops = StopRequests()
    stops.install()
    try:
        journal = open_journal(options, small)
    except KillsafeError as exc:
        stops.restore()
        parser.exit(2, f"error: {exc}\n")
    last_compact = last_progress = started
    try:
        state = journal.replay().latest() or new_state()
        if state["tick"]:
            log.info("resumed at tick %d with %d trades", state["tick"], state["n_trades"])
        while state["tick"] < ticks and not stops.requested:
            if deadline is not None and time.monotonic() >= deadline:
                stops.request("time-limit")
                break
            if trade_tick(state, args.seed):
                journal.append(state)  # durable before the next tick
                now = time.monotonic()
                due = compact_seconds is not None and now - last_compact >= compact_seconds
                if journal.compaction_due or (due and journal.records_since_checkpoint):
                    journal.compact(state)
                    last_compact = now
                if now - last_progress >= progress_every:
                    log.info("tick %d/%d, %d trades", state["tick"], ticks, state["n_trades"])
                    last_progress = now
        if stops.requested:
            journal.append(state)  # the ticks since the last trade, too
            log.info("stopped (%s) at tick %d; run again to continue", stops.reason, state["tick"])
            return
    finally:
        journal.close()
        stops.restore()
    last = {s: state["prices"][s][-1] for s in SYMBOLS}
    equity = state["cash"] + sum(state["positions"][s] * last[s] for s in SYMBOLS)
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    print(
        f"result: ticks={state['tick']} trades={state['n_trades']} cash={state['cash']!r} "
        f"fees={state['fees']!r} equity={equity:.4f} state_sha={digest}",
        flush=True,
    )


if __name__ == "__main__":
    main()
