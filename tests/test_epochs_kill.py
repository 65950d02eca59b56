"""Nested epoch loops killed at random moments and inside the epoch end code end bit-identical.

The scripts (``epochs_script.py``) run as child processes (forked from a
forkserver that imported torch once, ``fork_helpers``) and are stopped
with SIGKILL, SIGINT and SIGTERM: some signals land at a random moment, some
deterministically inside an epoch's end code (the script drops a marker file
there and sleeps). Each is resumed with the same command until it finishes;
then its parameters, optimizer and scheduler state and the log of the end
codes that ran are the same as an uninterrupted run's, each end code once.
"""

from __future__ import annotations

import importlib.util
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from fork_helpers import ScriptProcess

pytest.importorskip("torch")

SCRIPT = Path(__file__).with_name("epochs_script.py")
EPOCHS = 4
pytestmark = pytest.mark.usefixtures("no_stray_children")

# (signal, where): "end" waits for the marker of an end code, "random" waits a
# random time after a batch. The torch script gets fewer sessions; between
# the two every signal lands both ways.
PLANS = {
    "mnist": [
        (signal.SIGKILL, "end"),
        (signal.SIGINT, "random"),
        (signal.SIGTERM, "end"),
        (signal.SIGKILL, "random"),
    ],
    "keras": [
        (signal.SIGINT, "end"),
        (signal.SIGKILL, "random"),
        (signal.SIGKILL, "end"),
        (signal.SIGTERM, "random"),
        (signal.SIGTERM, "end"),
        (signal.SIGINT, "random"),
    ],
}


def uninterrupted(kind: str, run_dir: Path) -> dict[str, Any]:
    """The reference: the same script run to its end in this process (no torch start-up)."""
    spec = importlib.util.spec_from_file_location("epochs_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child runs: bit-identical results
    try:
        found, code = script.run_script(kind, run_dir)
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and found is not None
    return json.loads(json.dumps(found))  # as the child prints it


def start(kind: str, run_dir: Path, marks: Path, **env: str) -> ScriptProcess:
    """``python epochs_script.py KIND RUN_DIR``, forked from the preloaded forkserver."""
    env = {"EPOCHS_MARKS": str(marks), **env}
    return ScriptProcess(SCRIPT, [kind, str(run_dir)], marks.parent, env=env)


def finish(child: ScriptProcess) -> tuple[int, str, str]:
    out, err = child.communicate(timeout=120)
    assert child.returncode is not None
    return child.returncode, out, err


def result(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.startswith("result: ")]
    assert len(lines) == 1, out
    return json.loads(lines[0][len("result: ") :])


def wait_for(child: ScriptProcess, marks: Path, what: str) -> bool:
    """True once the child dropped a ``what`` marker (``end``, ``batch``), False if it ended."""
    while child.poll() is None:
        if any(
            p.name.startswith(what) and p.name.endswith(f"-{child.pid}") for p in marks.iterdir()
        ):
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("kind", ["mnist", "keras"])
def test_killed_anywhere_even_in_the_end_code_it_ends_bit_identical(
    kind: str, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    reference = uninterrupted(kind, tmp_path / "reference")
    assert [epoch for epoch, _ in reference["log"]] == list(range(EPOCHS))

    rng = random.Random(f"{kind}-17")
    run_dir = tmp_path / "interrupted"
    outcomes = []
    for sig, where in PLANS[kind]:
        child = start(kind, run_dir, marks)
        if where == "end":
            landed = wait_for(child, marks, "end")
        else:
            landed = wait_for(child, marks, "batch")
            time.sleep(rng.uniform(0.0, 0.3))  # an epoch takes about 0.3 s
            landed = landed and child.poll() is None
        if landed:
            child.send_signal(sig)
        code, out, err = finish(child)
        outcomes.append((sig.name, where, code))
        if code == 0:
            break
        assert code in (75, -signal.SIGKILL), err  # 75: stopped, resume me
    else:
        code, out, err = finish(start(kind, run_dir, marks))
        assert code == 0, err
    assert result(out) == reference, outcomes
    kills_in_end_code = [o for o in outcomes if o[1] == "end" and o[2] != 0]
    assert len(kills_in_end_code) >= 2, outcomes


def test_an_exception_in_the_end_code_leaves_it_to_run_once_after_the_resume(
    tmp_path: Path,
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    reference = uninterrupted("keras", tmp_path / "reference")
    run_dir = tmp_path / "failing"
    code, out, err = finish(start("keras", run_dir, marks, EPOCHS_FAIL_AT="1"))
    assert code == 1 and "interrupted in the end code of epoch 1" in err
    code, out, err = finish(start("keras", run_dir, marks, EPOCHS_FAIL_AT="1"))
    assert code == 0, err
    assert result(out) == reference
