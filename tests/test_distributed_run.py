"""A ``Run`` in a real 2-process DDP job on gloo: stopping together, resuming exactly.

Each rank runs ``tests/distributed_run_worker.py``. One job is stopped by a
SIGTERM to one rank and resumed (the rank raises its flag at the boundary
after the signal, step 4, and every rank stops at the next, step 5); it must
end bit-identical to a job never interrupted. The stopped job's checkpoint is
also resumed by one process, listed, verified and consolidated. A rank that is
SIGKILLed is named by the other, which does not hang.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from distributed_helpers import Job, run_job  # noqa: E402

from killsafe import CheckpointStore  # noqa: E402
from killsafe.cli import main as cli  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

WORKER = Path(__file__).resolve().parent / "distributed_run_worker.py"
STOPPED = 75
STOP_STEP = 5  # SIGTERM during step 3: flagged at boundary 4, agreed at boundary 5
QUICK_TIMEOUT = {"KILLSAFE_TEST_COLLECTIVE_TIMEOUT": "3"}  # seconds, for jobs where a rank dies


def train(
    workdir: Path,
    run_dir: Path,
    *events: str,
    world: int = 2,
    expect: int = 0,
    scenario: str = "train",
) -> Job:
    scenario = "alone" if world == 1 else scenario
    return run_job(scenario, world, workdir, str(run_dir), *events, expect=expect, worker=WORKER)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted job (rank 0 alone asks for a save during step 3); one stopped by
    SIGTERM to rank 1 during step 3, then resumed."""
    root = tmp_path_factory.mktemp("ddp")
    whole = train(root / "whole", root / "whole-run", "0:3:save")
    stopped = train(root / "stopped", root / "run", "1:3:term", expect=STOPPED)
    copy = root / "copy-at-stop"
    shutil.copytree(root / "run", copy)  # as the stop left it, for the one-process resume
    resumed = train(root / "resumed", root / "run")
    return {"root": root, "whole": whole, "stopped": stopped, "resumed": resumed, "copy": copy}


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_step(jobs: dict[str, Any]) -> None:
    stopped = jobs["stopped"]
    for rank in range(2):
        result = stopped.result(rank)
        assert (result["step"], result["exit_reason"]) == (STOP_STEP, "signal:SIGTERM")
        assert result["exit_code"] == STOPPED
    infos = CheckpointStore(jobs["copy"] / "checkpoints").list()
    assert [(i.step, i.reason) for i in infos] == [(3, "periodic"), (STOP_STEP, "signal:SIGTERM")]
    assert all(i.sharded and i.world_size == 2 for i in infos)


def test_a_save_asked_on_rank_0_alone_is_taken_by_every_rank_one_step_later(
    jobs: dict[str, Any],
) -> None:
    infos = CheckpointStore(jobs["root"] / "whole-run" / "checkpoints").list()
    assert (5, "asked", "request", 2) in [(i.step, i.name, i.reason, i.world_size) for i in infos]


def test_only_rank_0_writes_the_records_and_prints(jobs: dict[str, Any]) -> None:
    stopped = jobs["stopped"]
    assert stopped.output(1) == ""
    assert f"stopped at step {STOP_STEP} of 8 (signal:SIGTERM)" in stopped.output(0)
    run_json = json.loads((jobs["copy"] / "run.json").read_text())
    assert len(run_json["sessions"]) == 1  # one run, not one per rank
    events = [json.loads(line)["kind"] for line in (jobs["copy"] / "events.jsonl").open()]
    assert events.count("saved") == 2 and events.count("stop-requested") == 1


def test_stopped_and_resumed_ends_bit_identical_to_uninterrupted(jobs: dict[str, Any]) -> None:
    for rank in range(2):
        whole, stopped, resumed = (jobs[k].result(rank) for k in ("whole", "stopped", "resumed"))
        assert resumed["restored"] == stopped["weights"]
        assert resumed["weights"] == whole["weights"]
        assert resumed["seen"] == whole["seen"]  # per-rank data and random streams
        assert resumed["next_random"] == whole["next_random"]
        assert resumed["exit_code"] == 0 and resumed["step"] == 8
    assert jobs["whole"].result(0)["seen"] != jobs["whole"].result(1)["seen"]


def test_two_ranks_checkpoint_resumes_on_one_process(jobs: dict[str, Any]) -> None:
    run_dir = jobs["root"] / "alone-run"
    shutil.copytree(jobs["copy"], run_dir)
    job = train(jobs["root"] / "alone", run_dir, world=1)
    result = job.result(0)
    assert result["restored"] == jobs["stopped"].result(0)["weights"]
    assert result["seen"][:STOP_STEP] == jobs["stopped"].result(0)["seen"]  # rank 0's own part
    assert (result["step"], result["exit_code"]) == (8, 0)
    assert "per-rank random states cannot carry over" in job.output(0)


def test_list_verify_inspect_and_consolidate_a_sharded_checkpoint(
    jobs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = jobs["copy"] / "checkpoints"
    checkpoint = store_dir / f"step-{STOP_STEP:06d}"
    assert cli(["verify", str(store_dir)]) == 0
    assert capsys.readouterr().out.count(": ok") == 2
    assert cli(["list", "--json", str(store_dir)]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(c["step"], c["world_size"]) for c in listed] == [(3, 2), (STOP_STEP, 2)]
    assert cli(["inspect", str(checkpoint)]) == 0
    shown = capsys.readouterr().out
    assert "world size 2" in shown and "rank-00001.safetensors" in shown
    out = jobs["root"] / "one-process"
    assert cli(["consolidate", str(checkpoint), str(out)]) == 0
    state = CheckpointStore(out.parent).load(out)
    weights = jobs["stopped"].result(0)["weights"]
    assert state["model"]["weight"].tolist() == weights[0]
    from safetensors.torch import load_file

    assert load_file(str(out) + ".safetensors")["weight"].tolist() == weights[0]
    assert cli(["consolidate", str(checkpoint), str(out)]) == 2  # never overwritten


@pytest.fixture(scope="module")
def broken_saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run directory: rank 1's write of the step-6 checkpoint fails (a full disk);
    a second job's rank 1 is SIGKILLed as it writes it; a third job resumes and ends."""
    root = tmp_path_factory.mktemp("broken")
    run_dir = root / "run"
    jobs: dict[str, Any] = {"run": run_dir}
    for name, event in (("failed", "1:6:failwrite"), ("killed", "1:6:killwrite")):
        (root / name).mkdir()
        with mock.patch.dict(os.environ, QUICK_TIMEOUT):  # a dead rank is named sooner
            job = Job("train", 2, root / name, str(run_dir), event, worker=WORKER)
        jobs[name] = (job, job.wait(timeout=120))
        jobs[f"{name}-listed"] = [i.step for i in CheckpointStore(run_dir / "checkpoints").list()]
    jobs["resumed"] = train(root / "resumed", run_dir)
    return jobs


def test_a_background_save_that_failed_on_one_rank_fails_on_every_rank(
    broken_saves: dict[str, Any],
) -> None:
    job, codes = broken_saves["failed"]
    assert codes == [1, 1], job.output(0)
    results = [job.result(rank) for rank in range(2)]
    assert [r["error"] for r in results] == ["SaveFailed", "SaveFailed"]
    assert results[0]["step"] == results[1]["step"]  # raised at the same boundary
    assert "rank 1 could not write" in results[0]["message"]
    assert "No space left on device" in results[1]["message"]
    assert broken_saves["failed-listed"] == [3]  # never committed; step 3 stands


def test_a_rank_killed_mid_save_leaves_the_last_checkpoint_and_is_named(
    broken_saves: dict[str, Any],
) -> None:
    job, codes = broken_saves["killed"]
    assert codes == [1, -9], job.output(0)
    result = job.result(0)
    assert (result["error"], result["ranks"]) == ("RankUnresponsive", [1])
    assert broken_saves["killed-listed"] == [3]
    resumed = broken_saves["resumed"].result(0)
    assert resumed["restored"] != resumed["weights"] and resumed["step"] == 8
    assert not [
        p.name
        for p in (broken_saves["run"] / "checkpoints").iterdir()
        if p.name.startswith(".tmp-")
    ]


def test_two_ranks_stopped_mid_epoch_resume_the_epoch_on_one_without_repeats(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    stopped = run_job(
        "epochs", 2, tmp_path / "two", str(run_dir), "1:2:term", expect=STOPPED, worker=WORKER
    )
    before = [stopped.result(rank)["seen"] for rank in range(2)]
    assert stopped.result(0)["step"] == 4  # 4 batches of 2 on each rank: 16 of 24 used
    alone = run_job("epochs-alone", 1, tmp_path / "one", str(run_dir), worker=WORKER)
    after = alone.result(0)["seen"][len(before[0]) :]
    epoch_0 = [i for seen in (*before, after) for e, i in seen if e == 0]
    assert sorted(epoch_0) == list(range(24))  # each sample once, none skipped
    assert sorted(i for e, i in after if e == 1) == list(range(24))
    assert "16 sample(s) were used, the 8 left are dealt over" in alone.output(0)


def test_with_the_default_flag_period_a_stop_on_one_rank_still_lands_on_one_step(
    tmp_path: Path,
) -> None:
    # short steps: the ranks exchange their flags only every few boundaries
    # (rank 0 says how many, to fill the period), so the stop asked during
    # step 20 lands some steps later, on both ranks at the same step
    run_dir = tmp_path / "run"
    job = run_job(
        "paced",
        2,
        tmp_path,
        str(run_dir),
        "1:20:term",
        expect=STOPPED,
        worker=WORKER,
        flag_period=None,
    )
    results = [job.result(rank) for rank in range(2)]
    stop_step = results[0]["step"]
    assert 21 < stop_step < 300 and results[1]["step"] == stop_step
    assert all(r["exit_reason"] == "signal:SIGTERM" for r in results)
    assert results[0]["exchanges"] <= stop_step // 2  # not at every boundary
    assert results[0]["exchanges"] == results[1]["exchanges"]
    infos = CheckpointStore(run_dir / "checkpoints").list()
    assert [(i.step, i.reason) for i in infos] == [(stop_step, "signal:SIGTERM")]


def test_a_job_told_to_start_over_clears_the_checkpoints_on_rank_0_alone(
    jobs: dict[str, Any],
) -> None:
    run_dir = jobs["root"] / "fresh-run"
    shutil.copytree(jobs["copy"], run_dir)
    job = train(jobs["root"] / "fresh", run_dir, scenario="fresh")
    for rank in range(2):
        result = job.result(rank)
        assert result["restored"] == jobs["whole"].result(rank)["restored"]  # not resumed
        assert result["weights"] == jobs["whole"].result(rank)["weights"]
        assert (result["step"], result["exit_code"]) == (8, 0)
    infos = CheckpointStore(run_dir / "checkpoints").list()
    assert [i.step for i in infos] == [3, 6, 8]  # the stopped run's 3 and 5 were cleared
    assert "fresh start" in job.output(0)


def test_a_job_resumed_from_an_older_step_saves_beside_a_damaged_checkpoint(
    tmp_path: Path,
) -> None:
    # it deleted the damaged one (which its start line says is kept for inspection)
    run_dir = tmp_path / "run"
    train(tmp_path / "first", run_dir)
    damaged = run_dir / "checkpoints" / "step-000006" / "rank-00000.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again = train(tmp_path / "again", run_dir, scenario="from3")
    assert damaged.read_bytes() == bytes(data)  # kept as it was, for the user to inspect
    assert "damaged ones kept" in again.output(0)
    names = sorted(i.path.name for i in CheckpointStore(run_dir / "checkpoints").list())
    assert names[-3:] == ["step-000006", "step-000006.2", "step-000008"]  # keep_last=3
    assert cli(["verify", str(run_dir / "checkpoints" / "step-000006.2")]) == 0
    assert cli(["verify", str(run_dir / "checkpoints" / "step-000008")]) == 0


def test_retention_failing_on_rank_0_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    # only rank 0 raised; rank 1 went on and met a dead rank 0 a timeout later
    with mock.patch.dict(os.environ, QUICK_TIMEOUT):
        job = train(tmp_path, tmp_path / "run", "0:6:failprune", expect=1)
    results = [job.result(rank) for rank in range(2)]
    assert [r["error"] for r in results] == ["StoreLocked", "StoreLocked"], results
    assert results[0]["message"] == results[1]["message"]
    assert results[0]["step"] == results[1]["step"]


def test_rank_0_unable_to_write_its_run_directory_fails_every_rank_at_the_start(
    tmp_path: Path,
) -> None:
    # rank 0 used to raise OSError with a traceback before the probe's broadcast,
    # and rank 1 waited out the timeout and reported rank 0 as dead
    run_dir = tmp_path / "run"
    job = train(tmp_path, run_dir, "0:0:fullprobe", expect=1)
    for rank in range(2):
        result = job.result(rank)
        assert result["error"] == "SaveFailed", result
        assert result["message"].startswith("rank 0: writing ")
        assert "No space left on device" in result["message"]
        assert "\n" not in result["message"]
    assert not list(run_dir.glob(".killsafe-shared-*"))


def test_a_killed_rank_is_named_instead_of_hanging(tmp_path: Path) -> None:
    # killed after its step 3's gradients were exchanged: rank 0 meets the dead
    # peer in the next step's all_reduce, and the flag rank 1 never sent names it
    with mock.patch.dict(os.environ, QUICK_TIMEOUT):
        job = Job("train", 2, tmp_path, str(tmp_path / "run"), "1:3:kill", worker=WORKER)
    codes = job.wait(timeout=90)
    assert codes[1] == -9
    assert codes[0] == 1, job.output(0)
    result = job.result(0)
    assert result["error"] == "RankUnresponsive"
    assert result["ranks"] == [1]
    assert "rank 1 (" in result["message"] and result["hosts"][0] in result["message"]
    assert sys.platform != "win32"
