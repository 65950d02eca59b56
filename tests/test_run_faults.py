"""``Run`` under faults and odd inputs: a full disk, a finished run started again,
a damaged checkpoint on the way, bad arguments."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fault_helpers import SmallDisk, damage, mounted_small_disk, one_line
from report_helpers import wait_for_png

from killsafe.errors import ConfigError, InvalidName, KillsafeError, SaveFailed
from killsafe.format import verify_checkpoint
from killsafe.run import Run
from killsafe.store import CheckpointStore

RECORDS = (
    "run.json",
    "status.json",
    "history.jsonl",
    "events.jsonl",
    "report.txt",
    "report.json",
    "report.png",
)


def train(directory: Path, total: int, **options: object) -> list[int]:
    """A small loop with a plain state, an array and a metric; returns the steps it ran.

    The array gives every checkpoint a tensor file whatever else this process
    imported (random generators' states are saved only for the libraries
    that are loaded).
    """
    ran = []
    options = {"progress": False, "keyboard": False, "save_every_steps": 5, **options}
    with Run(directory, total_steps=total, **options) as run:  # type: ignore[arg-type]
        state = run.track(weights=[0.0] * 4, moments=np.zeros(4))
        for step in run.steps():
            state["weights"][0] += 1
            run.log(loss=1.0 / (step + 1))
            ran.append(step)
    return ran


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    yield from mounted_small_disk(tmp_path)


def records(directory: Path) -> dict[str, bytes]:
    return {
        name: (directory / name).read_bytes() for name in RECORDS if (directory / name).exists()
    }


# ------------------------------------------------------------ a finished run


def test_a_finished_run_started_again_says_so_and_keeps_every_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert train(tmp_path, 10) == list(range(10))
    wait_for_png(tmp_path)  # drawn after the exit
    before = records(tmp_path)
    assert {"run.json", "status.json", "history.jsonl", "events.jsonl"} <= set(before)
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with caplog.at_level(logging.INFO, logger="killsafe"):
        with Run(tmp_path, total_steps=10, progress=False, keyboard=False) as run:
            run.track(weights=[0.0] * 4)
            assert run.state["weights"][0] == 10  # restored, for an evaluation
            assert list(run.steps()) == []
            run.log(test_loss=0.5)  # a finished run's history is not rewritten
        assert run.exit_reason == "finished"
    said = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "step 10 of 10" in said[0]
    assert records(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == checkpoints


def test_a_finished_run_with_more_total_steps_goes_on(tmp_path: Path) -> None:
    train(tmp_path, 10)
    assert train(tmp_path, 15) == list(range(10, 15))
    assert CheckpointStore(tmp_path / "checkpoints").latest().step == 15  # type: ignore[union-attr]


FINISHED_SCRIPT = textwrap.dedent(
    """
    import sys
    from killsafe.run import Run
    with Run(sys.argv[1], total_steps=3, keyboard=False) as run:
        run.track(n=0)
        for step in run.steps():
            run.state["n"] += 1
    print("ran", run.state["n"], run.exit_reason)
    """
)


def test_a_finished_run_started_again_exits_zero_with_one_line(tmp_path: Path) -> None:
    def start() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", FINISHED_SCRIPT, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    first = start()
    assert first.returncode == 0 and first.stdout == "ran 3 finished\n", first.stderr
    wait_for_png(tmp_path)  # drawn after the exit
    before = records(tmp_path)
    again = start()
    assert again.returncode == 0 and again.stdout == "ran 3 finished\n", again.stderr
    lines = again.stderr.splitlines()
    assert len(lines) == 1 and "already finished at step 3 of 3" in lines[0], lines
    assert records(tmp_path) == before


def train_epochs(directory: Path, epochs: int) -> list[tuple[int, int]]:
    """Epochs of three batches; returns the (epoch, batch) pairs it ran."""
    ran = []
    with Run(directory, progress=False, keyboard=False) as run:
        state = run.track(weights=[0.0] * 4, moments=np.zeros(4))
        for epoch in run.epochs(epochs):
            for batch in run.batches([1.0, 2.0, 3.0]):
                state["weights"][0] += batch
                run.log(loss=batch)
                ran.append((epoch, run.batch_index))
    return ran


def test_a_finished_epoch_loop_started_again_says_so_and_keeps_every_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert len(train_epochs(tmp_path, 2)) == 6
    wait_for_png(tmp_path)
    before = records(tmp_path)
    with caplog.at_level(logging.INFO, logger="killsafe"):
        with Run(tmp_path, progress=False, keyboard=False) as run:
            run.track(weights=[0.0] * 4, moments=np.zeros(4))
            assert run.state["weights"][0] == 12  # restored, for an evaluation
            assert list(run.epochs(2)) == []
            run.log(test_loss=0.5)  # a finished run's history is not rewritten
        assert run.exit_reason == "finished" and run.exit_code == 0 and run.step == 6
    said = [r.getMessage() for r in caplog.records if "already finished" in r.getMessage()]
    assert len(said) == 1 and "2 epochs at step 6" in said[0], said
    assert "run.epochs() above 2" in said[0]
    assert records(tmp_path) == before


def test_a_finished_epoch_loop_given_more_epochs_goes_on(tmp_path: Path) -> None:
    train_epochs(tmp_path, 2)
    assert train_epochs(tmp_path, 3) == [(2, 0), (2, 1), (2, 2)]
    sessions = json.loads((tmp_path / "run.json").read_text())["sessions"]
    assert [(s["start_step"], s["end_step"]) for s in sessions] == [(0, 6), (6, 9)]


def test_a_finished_epoch_loop_entered_without_a_loop_keeps_every_record(tmp_path: Path) -> None:
    train_epochs(tmp_path, 2)
    wait_for_png(tmp_path)
    before = records(tmp_path)
    with Run(tmp_path, progress=False, keyboard=False) as run:
        run.track(weights=[0.0] * 4, moments=np.zeros(4))
    assert run.exit_reason == "finished" and records(tmp_path) == before


def test_a_failure_before_the_loop_of_a_finished_epoch_run_is_recorded(tmp_path: Path) -> None:
    train_epochs(tmp_path, 2)
    run = Run(tmp_path, progress=False, keyboard=False)
    with pytest.raises(RuntimeError, match="before the loop"), run:
        raise RuntimeError("before the loop")
    assert run.exit_reason == "error"
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "failed" and len(record["sessions"]) == 2
    assert "before the loop" in (tmp_path / "events.jsonl").read_text()


def test_a_stop_inside_the_batches_passes_an_except_exception_around_them(
    tmp_path: Path,
) -> None:
    ends = []
    with Run(tmp_path, progress=False, keyboard=False) as run:
        for epoch in run.epochs(3):
            try:
                for _ in run.batches([1.0, 2.0, 3.0]):
                    if run.step == 4:
                        run.stop("enough")
            except Exception:  # a loop that logs a bad batch and goes on
                pytest.fail("the stop was caught as an Exception")
            ends.append(epoch)
    assert ends == [0] and run.exit_reason == "enough" and run.exit_code == 75
    assert (run.epoch, run.batch_index) == (1, 2)


# ------------------------------------------------------------ damaged checkpoints


def test_a_resumed_run_writes_beside_a_damaged_checkpoint_and_keeps_it(tmp_path: Path) -> None:
    train(tmp_path, 10, keep_last=None)
    store_dir = tmp_path / "checkpoints"
    damaged_dir = store_dir / "step-000010"
    damaged = damage(damaged_dir)
    # The newest good checkpoint is step 5: the run resumes there and reaches 10 again.
    assert train(tmp_path, 10, keep_last=None) == list(range(5, 10))
    assert {p.name: p.read_bytes() for p in damaged_dir.iterdir()} == damaged
    beside = store_dir / "step-000010.2"
    verify_checkpoint(beside)
    latest = CheckpointStore(store_dir).latest()
    assert latest is not None and latest.path == beside


# ------------------------------------------------------------ a full disk


def test_a_run_started_on_a_full_disk_is_one_typed_line(
    small_disk: SmallDisk,
) -> None:
    directory = small_disk.mount / "run"
    small_disk.fill()
    with pytest.raises(SaveFailed) as caught:
        train(directory, 3)
    text = one_line(caught.value)
    assert str(small_disk.mount) in text and "free" in text, text
    small_disk.free()
    assert train(directory, 3) == [0, 1, 2]


RUN_FSIZE_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from killsafe.errors import KillsafeError
    from killsafe.run import Run
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
    try:
        with Run(sys.argv[1], total_steps=2, progress=False, keyboard=False) as run:
            pass
    except KillsafeError as exc:
        print(type(exc).__name__, exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with Run(sys.argv[1], total_steps=2, progress=False, keyboard=False) as run:
        print("steps", list(run.steps()))
    """
)


def test_a_run_started_under_a_file_size_limit_is_one_typed_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", RUN_FSIZE_SCRIPT, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("SaveFailed starting the run") and "free" in lines[0], lines
    assert lines[1:] == ["steps [0, 1]"], lines


def test_a_run_under_proc_is_a_typed_error() -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    with pytest.raises(KillsafeError) as caught:
        train(Path("/proc/killsafe-test/run"), 3)
    assert "/proc/killsafe-test/run" in one_line(caught.value)


# ------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("options", "given"),
    [
        ({"serve": "yes"}, "'yes'"),
        ({"serve": -5}, "-5"),
        ({"serve": 70000}, "70000"),
        ({"serve": 8.5}, "8.5"),
        ({"signals": ["SIGKILL"]}, "SIGKILL"),
        ({"signals": ("SIGSTOP",)}, "SIGSTOP"),
        ({"signals": ["SIGNOPE"]}, "SIGNOPE"),
    ],
)
def test_bad_arguments_are_refused_at_the_call(
    tmp_path: Path, options: dict[str, object], given: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Run(tmp_path, **options)  # type: ignore[arg-type]
    text = one_line(caught.value)
    assert given in text and ("use" in text), text
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_a_good_serve_and_signal_are_accepted(tmp_path: Path) -> None:
    Run(tmp_path, serve=0, signals=["SIGUSR1"])
    Run(tmp_path, serve=True)
    Run(tmp_path, serve=False)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "latest", "123", ""])
def test_a_bad_save_name_is_refused_at_the_call(tmp_path: Path, name: str) -> None:
    with Run(tmp_path, total_steps=3, progress=False, keyboard=False) as run:
        run.track(n=0)
        for step in run.steps():
            if step == 1:
                with pytest.raises(InvalidName) as caught:
                    run.save(name=name)
                assert repr(name) in one_line(caught.value)
    assert run.exit_reason == "finished"
    assert not list(tmp_path.parent.glob("x"))
