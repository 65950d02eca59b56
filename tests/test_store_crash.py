"""A writer SIGKILLed at random moments never leaves a broken or older store behind.

Each writer is a real process forked from a preloaded forkserver
(``fork_helpers``), so a hundred of them start fast.
"""

from __future__ import annotations

import random
import signal
import textwrap
import time
from pathlib import Path

import pytest
from fork_helpers import ScriptProcess

from killsafe.store import CheckpointStore

WRITER = textwrap.dedent(
    """
    import os, sys
    from killsafe.store import CheckpointStore
    store = CheckpointStore(sys.argv[1], keep_last=3)
    latest = store.latest()
    step = latest.step + 1 if latest else 0
    payload = os.urandom(int(sys.argv[2]))
    print("ready", flush=True)
    while True:
        store.save({"step": step, "blob": payload, "nested": {"n": [step] * 10}}, step)
        print(step, flush=True)
        step += 1
    """
)

KILLS = 110

pytestmark = pytest.mark.usefixtures("no_stray_children")


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_committed_steps(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    store = tmp_path / "store"
    rng = random.Random(1234)
    committed = -1
    for kill in range(KILLS):
        size = rng.choice([100, 20_000, 300_000])
        proc = ScriptProcess(script, [str(store), str(size)], tmp_path)
        assert proc.wait_for_line() == "ready"
        if kill % 8 == 7:  # now and then a kill after a commit, so the store moves on
            proc.wait_for_lines(2)
        time.sleep(rng.uniform(0, 0.03))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, err)
        printed = [int(line) for line in out.split() if line.isdigit()]
        if printed:
            committed = max(committed, printed[-1])
        reader = CheckpointStore(store)
        latest = reader.latest()
        if committed < 0:
            continue
        assert latest is not None, f"kill {kill}: nothing loadable after step {committed}"
        assert latest.step >= committed, f"kill {kill}: latest {latest.step} < {committed}"
        loaded = reader.load(latest)
        assert loaded["step"] == latest.step and loaded["nested"]["n"] == [latest.step] * 10
        reader.verify(latest)
        committed = latest.step
    assert committed > 10
