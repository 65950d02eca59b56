"""The first lines of a run, as a person running ``python train.py`` sees them."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from killsafe.format import CheckpointInfo
from killsafe.policy import AnyOf, EveryNSteps, OnExit
from killsafe.run.start_lines import start_lines

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    import killsafe
    options = json.loads(sys.argv[3])
    if options.pop("basicConfig", False):
        logging.basicConfig(level=logging.INFO, format="LOG %(name)s %(message)s")
    with killsafe.Run(sys.argv[1], total_steps=int(sys.argv[2]), **options) as run:
        run.track(counter={"n": 0})
        for step in run.steps():
            run.state["counter"]["n"] += 1
    sys.exit(run.exit_code)
    """
)


def start(run_dir: Path, total: int, **options: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(run_dir), str(total), json.dumps(options)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def said(stderr: str) -> list[str]:
    """The lines a run wrote before its first step (its summary starts "killsafe: finished")."""
    lines = [line for line in stderr.splitlines() if line.startswith("killsafe: ")]
    return [line for line in lines if not line.startswith("killsafe: finished")]


def test_a_fresh_run_says_so_where_it_saves_and_when(tmp_path: Path) -> None:
    done = start(tmp_path, 3, save_every_steps=500, save_every_seconds="10m")
    assert said(done.stderr) == [
        "killsafe: fresh start",
        f"killsafe: saving to {tmp_path / 'checkpoints'} every 500 steps, every 10 min and on exit",
    ]
    assert done.stderr.index("killsafe: fresh start") == 0  # the very first line


def test_a_resumed_run_names_its_checkpoint_and_step(tmp_path: Path) -> None:
    start(tmp_path, 4, save_every_steps=2)
    done = start(tmp_path, 9)
    assert said(done.stderr) == [
        "killsafe: resumed from step-000004 at step 4",
        f"killsafe: saving to {tmp_path / 'checkpoints'} every 10 min and on exit",
    ]


def test_without_a_save_policy_the_line_says_it_saves_only_on_request(tmp_path: Path) -> None:
    done = start(tmp_path, 2, save_on_exit=False)
    assert said(done.stderr)[1] == f"killsafe: saving to {tmp_path / 'checkpoints'} only on request"


def test_with_logging_configured_each_line_comes_once_through_logging(tmp_path: Path) -> None:
    done = start(tmp_path, 3, basicConfig=True)
    lines = done.stderr.splitlines()
    assert lines.count("LOG killsafe killsafe: fresh start") == 1
    assert not any(line.startswith("killsafe: ") for line in lines)  # no second copy
    saving = [line for line in lines if "saving to" in line]
    assert saving == [
        f"LOG killsafe killsafe: saving to {tmp_path / 'checkpoints'} every 10 min and on exit"
    ]


def test_progress_off_keeps_stderr_quiet(tmp_path: Path) -> None:
    done = start(tmp_path, 3, progress=False)
    assert done.stderr == ""


def test_off_a_terminal_there_is_no_hint_how_to_stop(tmp_path: Path) -> None:
    done = start(tmp_path, 3)
    assert "to stop with a checkpoint" not in done.stderr


def in_terminal(run_dir: Path, **options: object) -> list[str]:
    """The lines a run writes on a real terminal (a pty on stdin, stdout and stderr)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.execvp(
            sys.executable,
            [sys.executable, "-c", SCRIPT, str(run_dir), "3", json.dumps(options)],
        )
    output = b""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return said("\n".join(re.split(r"\r\n|\r|\n", plain)))


def test_on_a_terminal_the_last_line_says_how_to_stop(tmp_path: Path) -> None:
    lines = in_terminal(tmp_path / "watched")
    assert lines[0] == "killsafe: fresh start"
    assert lines[2:] == ["killsafe: Ctrl+C or q + Enter to stop with a checkpoint"]
    unwatched = in_terminal(tmp_path / "unwatched", keyboard=False)
    assert unwatched[2:] == ["killsafe: Ctrl+C to stop with a checkpoint"]


def info_at(path: Path, step: int, **metadata: object) -> CheckpointInfo:
    return CheckpointInfo(
        step=step,
        name=None,
        reason="periodic",
        created=0.0,
        metrics={},
        size=1,
        path=path,
        metadata=dict(metadata),
    )


def test_the_epoch_is_shown_when_the_resumed_state_has_one(tmp_path: Path) -> None:
    store = tmp_path / "checkpoints"
    policy = AnyOf(OnExit(), EveryNSteps(100))

    def first(info: CheckpointInfo, epoch: object = None) -> str:
        lines = start_lines(
            info,
            step=info.step,
            epoch=epoch,
            store_dir=store,
            save_policy=policy,
            keyboard=False,
            terminal=False,
        )
        assert lines[1] == f"killsafe: saving to {store} every 100 steps and on exit"
        return lines[0]

    assert (
        first(info_at(store / "step-000300", 300))
        == "killsafe: resumed from step-000300 at step 300"
    )
    assert first(info_at(store / "step-000300", 300), epoch=3) == (
        "killsafe: resumed from step-000300 at step 300 (epoch 3)"
    )
    assert first(info_at(store / "step-000300", 300, epoch=2)) == (
        "killsafe: resumed from step-000300 at step 300 (epoch 2)"
    )
    elsewhere = tmp_path / "other" / "checkpoints" / "step-000300"
    assert first(info_at(elsewhere, 300)) == f"killsafe: resumed from {elsewhere} at step 300"
