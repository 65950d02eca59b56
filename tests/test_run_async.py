"""``Run`` with background saves: the loop meets failures, both save paths agree."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from killsafe.errors import ConfigError
from killsafe.run import Run
from killsafe.rundir import read_json, read_jsonl


def _steps_on_disk(run_dir: Path) -> list[int]:
    found = [
        json.loads((p / "manifest.json").read_text())
        for p in (run_dir / "checkpoints").glob("step-*")
    ]
    return sorted(m["step"] for m in found)


@pytest.mark.parametrize("async_save", [True, False])
def test_both_save_paths_commit_the_same_checkpoints_and_events(
    tmp_path: Path, async_save: bool
) -> None:
    values = {"total": 0}
    with Run(
        tmp_path,
        total_steps=7,
        save_every_steps=3,
        progress=False,
        report=False,
        async_save=async_save,
    ) as run:
        run.track(values=values)
        for step in run.steps():
            values["total"] += step
    assert _steps_on_disk(tmp_path) == [3, 6, 7]
    saved = [e["step"] for e in read_jsonl(tmp_path / "events.jsonl") if e["kind"] == "saved"]
    assert saved == [3, 6, 7]
    with Run(tmp_path, total_steps=7, progress=False, report=False) as run:
        run.track(values={"total": -1})
        assert run.state["values"] == {"total": sum(range(7))}


def test_if_busy_must_be_wait_or_skip(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="if_busy"):
        Run(tmp_path, if_busy="later")


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    import torch
    from killsafe import Run, SaveFailed
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with EFBIG
    weights = {"w": torch.zeros(1 << 20)}

    def fill_the_disk(run, info):  # once the first checkpoint is committed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    try:
        with Run(sys.argv[1], total_steps=100, save_every_steps=2, progress=False,
                 report=False, snapshot=sys.argv[2], on_save=fill_the_disk) as run:
            run.track(weights=weights)
            for step in run.steps():
                weights["w"] += 1
    except SaveFailed as exc:
        print("raised at step", run.step, "-", exc)
    """
)


@pytest.mark.parametrize("snapshot", ["fork", "copy"])
def test_a_failed_background_save_is_raised_in_the_loop_and_recorded(
    tmp_path: Path, snapshot: str
) -> None:
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, str(script), str(run_dir), snapshot],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "raised at step" in out.stdout and "step 4" in out.stdout
    step = int(out.stdout.split("raised at step")[1].split()[0])
    assert 4 <= step <= 8  # a boundary soon after the failure
    assert _steps_on_disk(run_dir) == [2]
    record = read_json(run_dir / "run.json")
    assert record["status"] == "failed" and "SaveFailed" in record["error"]
    failed = [e for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == "save-failed"]
    assert [e["step"] for e in failed] == [4]


@pytest.mark.parametrize("if_busy", ["wait", "skip"])
def test_a_save_due_while_one_is_writing_waits_or_skips_and_says_so(
    tmp_path: Path, if_busy: str
) -> None:
    np = pytest.importorskip("numpy")
    weights = {"w": np.random.default_rng(0).random(8_000_000)}  # 64 MB: writes take a while
    with Run(
        tmp_path,
        total_steps=6,
        save_every_steps=1,
        keep_last=None,
        progress=False,
        report=False,
        if_busy=if_busy,
    ) as run:
        run.track(weights=weights)
        for step in run.steps():
            weights["w"][:] = step  # every step changes the whole state
    events = read_jsonl(tmp_path / "events.jsonl")
    kinds = [e["kind"] for e in events]
    saved = _steps_on_disk(tmp_path)
    if if_busy == "wait":
        assert saved == [1, 2, 3, 4, 5, 6]
        assert "save-waited" in kinds and "save-skipped" not in kinds
    else:
        skipped = [e["step"] for e in events if e["kind"] == "save-skipped"]
        waited = [e["step"] for e in events if e["kind"] == "save-waited"]
        assert skipped and set(waited) <= {6}  # only the exit waits
        assert not set(skipped) & set(saved)
        assert saved[-1] == 6  # the final checkpoint is never skipped
    for step in saved:  # each checkpoint holds its own step's values
        with Run(tmp_path, resume=step, progress=False, report=False) as run:
            restored = {"w": np.zeros(8_000_000)}
            run.track(weights=restored)
            assert (restored["w"] == step - 1).all()
