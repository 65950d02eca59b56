"""A reader never loses to the pruner: real writer and reader processes on one store."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import killsafe

SAVES = 400

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import killsafe

    store = killsafe.CheckpointStore(sys.argv[1], keep_last=3)
    for step in range(1, int(sys.argv[2]) + 1):
        store.save({"w": np.full(256, step, dtype=np.float32), "step": step}, step=step)
    store.close()
    """
)

READER = textwrap.dedent(
    """
    import json, logging, sys
    from pathlib import Path
    import killsafe

    warnings = []

    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("killsafe").addHandler(Keep(logging.WARNING))
    store = killsafe.CheckpointStore(sys.argv[1])
    done = Path(sys.argv[2])
    loads, errors, last = 0, [], 0
    while not done.exists() or loads == 0:
        try:
            state = store.load("latest")
            info = store.latest()
        except Exception as exc:  # the test reports every failure
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if float(state["w"][0]) != state["step"] or state["step"] < last:
            errors.append(f"inconsistent state at step {state['step']}")
        if info is None:
            errors.append("latest() found nothing")
        last = state["step"]
        loads += 1
    print(json.dumps({"loads": loads, "errors": errors[:5], "warnings": warnings[:5]}))
    """
)


def test_a_reader_racing_the_pruner_always_loads_the_newest_good_checkpoint(
    tmp_path: Path,
) -> None:
    store_dir = tmp_path / "store"
    with killsafe.CheckpointStore(store_dir) as first:
        first.save({"w": np.zeros(256, dtype=np.float32), "step": 0}, step=0)
    done = tmp_path / "writer-done"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(store_dir), str(done)],
        stdout=subprocess.PIPE,
        text=True,
    )
    writer = subprocess.run(
        [sys.executable, "-c", WRITER, str(store_dir), str(SAVES)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    done.touch()
    out, _ = reader.communicate(timeout=120)
    assert writer.returncode == 0, writer.stderr
    assert reader.returncode == 0
    result = json.loads(out)
    assert result["errors"] == [] and result["warnings"] == [], result
    assert result["loads"] > 0
    steps = sorted(info.step for info in killsafe.CheckpointStore(store_dir).list())
    assert steps == [SAVES - 2, SAVES - 1, SAVES]
