"""The records a scripted run leaves behind, compared with tests/golden/run_story.json.

Two sessions of one run: the first answers a named save request, saves
periodically and stops on SIGTERM; the second resumes, fails to save under a
name already taken, and finishes. ``events.jsonl`` and ``run.json`` are
compared after the fields that differ from machine to machine (times, pids,
hosts, ids, the run directory, durations, memory) are replaced by
placeholders; ids keep their identity (``<id-1>`` is the same id everywhere).

After an intended change, rewrite the golden file with
``KILLSAFE_UPDATE_GOLDEN=1 python -m pytest tests/test_golden_run.py`` and
review its diff.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import killsafe
from killsafe import rundir

GOLDEN = Path(__file__).parent / "golden" / "run_story.json"

OPTIONS: dict[str, Any] = {
    "total_steps": 6,
    "save_every_steps": 3,
    "async_save": False,  # saves land at the boundary that asks for them: a fixed order
    "progress": False,
    "keyboard": False,
    "report": False,
    "config": {"lr": 0.1},
}

PLACEHOLDERS = {
    "time": "<time>",
    "started": "<time>",
    "ended": "<time>",
    "pid": "<pid>",
    "host": "<host>",
    "peak_rss_bytes": "<bytes>",
    "cpu_seconds": "<seconds>",
}
ID_KEYS = ("run_id", "request_id", "id")


def request(run_dir: Path, action: str, name: str | None = None, note: str | None = None) -> None:
    rundir.submit_request(run_dir, rundir.ControlRequest(action=action, name=name, note=note))


def first_session(run_dir: Path) -> None:
    with killsafe.Run(run_dir, **OPTIONS) as run:
        run.track(counter={"n": 0})
        for step in run.steps():
            run.state["counter"]["n"] += 1
            run.log(loss=1.0 / (step + 1))
            if step == 0:  # read at the session's first boundary
                request(run_dir, "save", "asked", note="looks good")
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
    assert (run.exit_reason, run.step) == ("signal:SIGTERM", 3)


def second_session(run_dir: Path) -> None:
    with killsafe.Run(run_dir, **OPTIONS) as run:
        run.track(counter={"n": 0})
        assert run.state["counter"]["n"] == 3
        for step in run.steps():
            run.state["counter"]["n"] += 1
            run.log(loss=1.0 / (step + 1))
            if step == 3:  # the name is taken by the first session's checkpoint
                request(run_dir, "save", "asked")
    assert (run.exit_reason, run.step) == ("finished", 6)


class Normaliser:
    """Replaces what differs between machines and runs by stable placeholders."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = str(run_dir)
        self.ids: dict[str, str] = {}

    def __call__(self, value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: self(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self(item) for item in value]
        if value is None:
            return None
        if key in PLACEHOLDERS:
            return PLACEHOLDERS[key]
        if key in ID_KEYS:
            return self.ids.setdefault(value, f"<id-{len(self.ids) + 1}>")
        if isinstance(value, str):
            return value.replace(self.run_dir, "<run>")
        return value


def records(run_dir: Path) -> dict[str, Any]:
    normalise = Normaliser(run_dir)
    run_json = json.loads((run_dir / "run.json").read_text())
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return {
        "run.json": normalise(run_json),
        "events.jsonl": [normalise(json.loads(line)) for line in lines],
    }


def golden_text(data: dict[str, Any]) -> str:
    """The records as JSON a reviewer reads: one event per line, run.json indented."""
    events = ",\n".join(f"    {json.dumps(event)}" for event in data["events.jsonl"])
    run_json = json.dumps(data["run.json"], indent=2).replace("\n", "\n  ")
    return f'{{\n  "events.jsonl": [\n{events}\n  ],\n  "run.json": {run_json}\n}}\n'


def test_a_scripted_run_leaves_the_golden_records(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first_session(run_dir)
    second_session(run_dir)
    got = records(run_dir)
    if os.environ.get("KILLSAFE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(golden_text(got))
    assert json.loads(golden_text(got)) == got  # the golden text holds all of it
    expected = json.loads(GOLDEN.read_text())
    assert got["events.jsonl"] == expected["events.jsonl"]
    assert got["run.json"] == expected["run.json"]
