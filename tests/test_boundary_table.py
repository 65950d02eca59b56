"""The step boundary as a decision table, driven through real Runs.

Each row sets up one combination of what can meet at a step boundary and
says what the boundary does about it:

- signal: none, SIGTERM or SIGINT delivered to this process during the step;
- request: none, ``save``, ``save`` with a name, or ``stop``, as control files;
- policy: a periodic save due at this boundary (``save_every_steps=1``) or none;
- limit: the time limit (``stop_after``) reached at this boundary or not;
- busy: no background save in flight, or one in flight with ``if_busy`` wait/skip.

The run has ``total_steps=2``; everything meets at the boundary after step 1,
so a run that does not stop there runs step 2 and finishes with the exit save.
The outcome is what was committed (step, reason, name of each checkpoint after
the step-0 one the busy rows start with), the exit reason and the steps run.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import killsafe
from killsafe import rundir
from killsafe.policy import Boundary


def main_thread_waits() -> bool:
    """Whether the main thread is blocked in a wait (an Event, a Condition, a join)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    return (
        frame is not None
        and frame.f_code.co_filename == threading.__file__
        and frame.f_code.co_name in ("wait", "join", "_wait_for_tstate_lock")
    )


class CommitGate:
    """Holds background checkpoint commits until released or until the loop waits for them.

    A checkpoint becomes visible by a rename into ``checkpoints/``; holding that
    rename on the writer thread keeps a save in flight for as long as the test
    needs, without depending on how fast the disk is.
    """

    GIVE_UP_SECONDS = 60.0  # a wait this test cannot see fails the row instead of hanging

    def __init__(self) -> None:
        self.released = threading.Event()
        self.gave_up = False

    def around(self, rename: Callable[..., None]) -> Callable[..., None]:
        """``rename`` (``os.rename`` or ``os.replace``), held on the writer thread."""

        def held(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            on_writer = threading.current_thread() is not threading.main_thread()
            if on_writer and Path(dst).parent.name == "checkpoints":
                self.hold()
            rename(src, dst, *args, **kwargs)

        return held

    def hold(self) -> None:
        give_up = time.monotonic() + self.GIVE_UP_SECONDS
        while not (self.released.wait(0.002) or main_thread_waits()):
            if time.monotonic() > give_up:
                self.gave_up = True
                return


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[CommitGate]:
    held = CommitGate()
    monkeypatch.setattr(os, "rename", held.around(os.rename))
    monkeypatch.setattr(os, "replace", held.around(os.replace))
    yield held
    held.released.set()


def run_case(
    run_dir: Path, gate: CommitGate, signal_: str, request: str, policy: str, limit: str, busy: str
) -> tuple[list[tuple[int, str | None, str | None]], str | None, int]:
    """Run the scripted loop for one row; returns (checkpoints, exit reason, steps run)."""
    with killsafe.Run(
        run_dir,
        total_steps=2,
        save_every_steps=1 if policy == "due" else None,
        stop_after=1e-6 if limit == "reached" else None,
        if_busy="skip" if busy == "skip" else "wait",
        keep_last=None,
        snapshot="copy",
        progress=False,
        keyboard=False,
        report=False,
    ) as run:
        run.track(counter={"n": 0})
        if busy != "none":
            run.save("warmup")  # step 0, written in the background and held in flight
        for step in run.steps():
            run.state["counter"]["n"] += 1
            if step > 0:
                gate.released.set()
                continue
            if request != "none":
                action, _, name = request.partition(":")
                control = rundir.ControlRequest(action=action, name=name or None)
                rundir.submit_request(run_dir, control)
            if signal_ != "none":
                os.kill(os.getpid(), getattr(signal, signal_))
    infos = killsafe.CheckpointStore(run_dir / "checkpoints").list()
    if busy != "none":
        assert (infos[0].step, infos[0].name) == (0, "warmup")
        infos = infos[1:]
    saved = [(info.step, info.reason, info.name) for info in infos]
    return saved, run.exit_reason, run.step


def waited_at_step_one(run_dir: Path) -> bool:
    """Whether the boundary after step 1 waited for the step-0 save still in flight."""
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return any(
        event["kind"] == "save-waited" and (event["step"], event["busy"]) == (1, 0)
        for event in map(json.loads, lines)
    )


SIGNALS = ("none", "SIGTERM", "SIGINT")
REQUESTS = ("none", "save", "save:asked", "stop")
POLICIES = ("due", "none")
LIMITS = ("reached", "not")
BUSY = ("none", "wait", "skip")

# The first row that matches a combination gives its outcome; "*" matches anything.
# Saved: "step reason [name]" of each checkpoint after step 0. The loop stops at
# step 1 unless the exit reason is "finished" (then it ran both steps).
# signal  request    policy limit   busy     saved                          exit reason
TABLE = [
    # A stop request outranks a signal and the time limit at the same boundary.
    ("*       stop       *      *       *",     "1 request",                   "request"),
    # A stop saves once, with its reason, under the name a save request asked for.
    ("SIGTERM save:asked *      *       *",     "1 signal:SIGTERM asked",      "signal:SIGTERM"),
    ("SIGTERM *          *      *       *",     "1 signal:SIGTERM",            "signal:SIGTERM"),
    ("SIGINT  save:asked *      *       *",     "1 keyboard asked",            "keyboard"),
    ("SIGINT  *          *      *       *",     "1 keyboard",                  "keyboard"),
    ("none    save:asked *      reached *",     "1 time-limit asked",          "time-limit"),
    ("none    *          *      reached *",     "1 time-limit",                "time-limit"),
    # Busy and if_busy="skip": nothing at step 1; the exit save answers the request.
    ("none    save:asked *      not     skip",  "2 finished asked",            "finished"),
    ("none    *          *      not     skip",  "2 finished",                  "finished"),
    # A due policy gives the reason; a save request alone says "request".
    ("none    save:asked due    not     *",     "1 periodic asked, 2 finished", "finished"),
    ("none    *          due    not     *",     "1 periodic, 2 finished",      "finished"),
    ("none    save:asked none   not     *",     "1 request asked, 2 finished", "finished"),
    ("none    save       none   not     *",     "1 request, 2 finished",       "finished"),
    ("none    none       none   not     *",     "2 finished",                  "finished"),
]  # fmt: skip

COMBINATIONS = list(itertools.product(SIGNALS, REQUESTS, POLICIES, LIMITS, BUSY))


def first_row(combination: tuple[str, ...]) -> int:
    for index, (when, _, _) in enumerate(TABLE):
        if all(want in ("*", got) for want, got in zip(when.split(), combination, strict=True)):
            return index
    raise AssertionError(f"no row of TABLE covers {combination}")


def expected_saves(text: str) -> list[tuple[int, str, str | None]]:
    saves = []
    for item in text.split(", "):
        step, reason, *name = item.split()
        saves.append((int(step), reason, name[0] if name else None))
    return saves


def test_every_row_of_the_table_is_reached() -> None:
    assert sorted({first_row(c) for c in COMBINATIONS}) == list(range(len(TABLE)))


@pytest.mark.parametrize(
    "combination", COMBINATIONS, ids=["-".join(c).replace(":", "=") for c in COMBINATIONS]
)
def test_the_boundary_decides_as_the_table_says(
    tmp_path: Path, gate: CommitGate, combination: tuple[str, str, str, str, str]
) -> None:
    _, saves, reason = TABLE[first_row(combination)]
    outcome = run_case(tmp_path / "run", gate, *combination)
    assert not gate.gave_up, "the loop waited for a held save in a way the gate cannot see"
    steps = 2 if reason == "finished" else 1
    assert outcome == (expected_saves(saves), reason, steps)
    # A busy row's step-1 checkpoint was due while the step-0 one was in flight.
    if combination[4] != "none" and saves.startswith("1 "):
        assert waited_at_step_one(tmp_path / "run")


class WarmupSaves:
    """Your own policy, giving its own reason."""

    def should_save(self, boundary: Boundary) -> str | None:
        return "warmup" if boundary.step <= 1 else None


class EveryThirdStep:
    """Your own policy, answering True or False."""

    def should_save(self, boundary: Boundary) -> bool:
        return boundary.step % 3 == 0


def test_a_policy_of_your_own_gives_the_checkpoint_its_reason(tmp_path: Path) -> None:
    policy = killsafe.AnyOf(WarmupSaves(), EveryThirdStep())
    with killsafe.Run(
        tmp_path / "run", total_steps=4, save=policy, progress=False, keyboard=False, report=False
    ) as run:
        run.track(counter={"n": 0})
        for _ in run.steps():
            run.state["counter"]["n"] += 1
    saved = killsafe.CheckpointStore(tmp_path / "run" / "checkpoints").list()
    assert [(info.step, info.reason) for info in saved] == [
        (1, "warmup"),
        (3, "policy"),
        (4, "finished"),
    ]
