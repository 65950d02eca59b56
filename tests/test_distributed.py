"""Real multi-process jobs on gloo: agreeing, losing ranks, sharded saves and resharded loads.

Every job runs 2 to 4 processes on 127.0.0.1 (see distributed_helpers.py).
Starting a process that imports torch takes seconds, so each job checks
several things.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import distributed_worker as worker  # noqa: E402
from distributed_helpers import Job, run_job  # noqa: E402
from manifest_helpers import each_hostile_manifest  # noqa: E402

from killsafe.distributed import Agreement, decide, load_sharded, save_sharded  # noqa: E402
from killsafe.errors import (  # noqa: E402
    CheckpointExists,
    CorruptCheckpoint,
    StateMismatch,
    UnsupportedState,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    # DCP says so whenever it saves or loads in one process, as these tests do on purpose
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]


def expected_agreement(step: int, world: int) -> dict[str, Any]:
    agreement = decide([worker.votes_for(step, rank, world) for rank in range(world)])
    if agreement.stop is not None and len(agreement.stop.encode()) > 4096:
        agreement = Agreement(**{**agreement.__dict__, "stop": agreement.stop[:2048]})
    return agreement.__dict__


@pytest.fixture(scope="module")
def lost(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """Four ranks agree; then rank 1 is killed, rank 2 hangs and ranks 0 and 3 go on."""
    job = Job("agree_then_lose", 4, tmp_path_factory.mktemp("lost"), "1:kill", "2:hang")
    try:
        for rank in (0, 3):
            job.ranks[rank].wait(timeout=120)
    finally:
        job.ranks[2].send_signal(signal.SIGKILL)
        job.wait()
    return job


def test_ranks_agree_broadcast_and_gather(lost: Job) -> None:
    expected = [expected_agreement(step, 4) for step in range(6)]
    assert expected[1] == {"stop": "q pressed", "stopped_by": 1, "save": None, "name": None}
    assert expected[2]["save"] == "every 2 steps"
    for rank in (0, 3):
        result = lost.result(rank)
        assert result["agreements"] == expected
        assert result["pipelined"] == expected
        assert result["broadcast"] == {"from": 3, "list": [1, 2.5, None]}
        assert result["gather"] == ["rank 0", "rank 1", "rank 2", "rank 3"]
        assert (result["rank"], result["world_size"]) == (rank, 4)
        assert len(set(result["hosts"])) == 4  # host name and pid of each rank


def test_a_killed_and_a_hung_rank_are_named_instead_of_hanging(lost: Job) -> None:
    for rank in (0, 3):
        result = lost.result(rank)
        for error in result["errors"]:
            # The killed rank 1 and the hung rank 2; a live rank that a loaded
            # machine kept past the 3 s timeout is rightly named as well.
            assert {1, 2} <= set(error["ranks"]) and rank not in error["ranks"]
            assert error["hosts"] == [result["hosts"][r] for r in error["ranks"]]
            assert "rank 1 (" in error["message"] and "rank 2 (" in error["message"]
            assert "did not answer agree within 3 s" in error["message"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Job]:
    """Two ranks save a DTensor state and a replicated one; rank 1 dies in a third save."""
    workdir = tmp_path_factory.mktemp("sharded")
    job = Job("save_then_die", 2, workdir, "3")
    codes = job.wait()
    assert codes[0] == 0, job.output(0)
    assert codes[1] == -signal.SIGKILL, job.output(1)
    return workdir, job


def test_a_rank_dying_mid_save_leaves_nothing_visible(saved: tuple[Path, Job]) -> None:
    workdir, job = saved
    result = job.result(0)
    assert result["error"] == "RankUnresponsive"
    assert "rank 1 (" in result["message"]
    # no partial checkpoint, no leftover temporary directory, the earlier ones intact
    assert sorted(p.name for p in workdir.iterdir()) == ["ddp", "dtensor", "rank-0.json"]
    state = worker.zeroed(worker.full_state())
    load_sharded(state, workdir / "dtensor")
    assert worker.plain(state) == worker.plain(worker.full_state())


def test_a_value_that_differs_between_ranks_is_refused(saved: tuple[Path, Job]) -> None:
    workdir, job = saved
    refused = job.result(0)["refused"]
    assert refused.startswith("UnsupportedState: 'seen' differs between rank 0 and rank 1")
    assert not (workdir / "per-rank").exists()


def test_a_sharded_checkpoint_is_json_and_safetensors(saved: tuple[Path, Job]) -> None:
    from safetensors import safe_open

    workdir, _ = saved
    manifest = json.loads((workdir / "dtensor" / "manifest.json").read_text())
    assert (manifest["step"], manifest["name"], manifest["world_size"]) == (7, "first", 2)
    assert sorted(manifest["files"]) == ["rank-00000.safetensors", "rank-00001.safetensors"]
    chunks = manifest["dcp"]["state"]["model.w"]["chunks"]
    assert chunks == [[[0, 0], [5, 6]], [[5, 0], [5, 6]]]
    assert manifest["dcp"]["state"]["optim.config.betas"] == {"kind": "bytes"}
    full = worker.full_state()
    with safe_open(str(workdir / "dtensor" / "rank-00001.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("model.w@5,0"), full["model"]["w"][5:])
    for path in (workdir / "dtensor").iterdir():
        assert b"\x80\x04" not in path.read_bytes()[:64]  # no pickle stream anywhere


def test_replicated_tensors_are_written_once_spread_over_ranks(saved: tuple[Path, Job]) -> None:
    workdir, _ = saved
    manifest = json.loads((workdir / "ddp" / "manifest.json").read_text())
    stored = [row["fqn"] for row in manifest["dcp"]["storage"]]
    assert sorted(stored) == ["model.b", "model.w", "rank0_only.step"]
    writers = {row["file"] for row in manifest["dcp"]["storage"]}
    assert len(writers) == 2  # both ranks wrote a part
    state = {"model": worker.zeroed(worker.full_state()["model"]), "rank0_only": {"step": None}}
    load_sharded(state, workdir / "ddp")
    assert worker.plain(state["model"]) == worker.plain(worker.full_state()["model"])
    assert state["rank0_only"] == {"step": 1}


def test_saved_on_two_loads_resharded_on_three(saved: tuple[Path, Job]) -> None:
    workdir, _ = saved
    job = run_job("load_resharded", 3, workdir)
    expected = worker.plain(worker.full_state())
    for rank in range(3):
        assert job.result(rank)["state"] == expected


def test_a_flipped_byte_is_caught_on_load(saved: tuple[Path, Job], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(saved[0] / "dtensor", copy)
    data = copy / "rank-00001.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-20] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        load_sharded(worker.zeroed(worker.full_state()), copy)
    manifest = copy / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"step": 7', '"step": 8'))
    with pytest.raises(CorruptCheckpoint, match="own checksum"):
        load_sharded(worker.zeroed(worker.full_state()), copy)


def test_one_process_save_refuses_what_json_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedState, match=r"'extra\.fn'"):
        save_sharded({"w": torch.ones(2), "extra": {"fn": print}}, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    save_sharded({"w": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(CheckpointExists):
        save_sharded({"w": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(StateMismatch, match="w2"):
        load_sharded({"w2": torch.zeros(2)}, tmp_path / "c")


def test_a_bad_step_or_state_is_one_typed_line(tmp_path: Path) -> None:
    from killsafe import CheckpointStore
    from killsafe.errors import ConfigError

    # a step of -1 went into a store as step--00001; "x" was a ValueError, 1.5 became 1
    with CheckpointStore(tmp_path / "store") as store:
        for step in (-1, "x", 1.5, True):
            with pytest.raises(ConfigError, match=r"must be a non-negative int"):
                save_sharded({"w": torch.ones(2)}, store, step=step)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"step=-1 must be"):
        save_sharded({"w": torch.ones(2)}, tmp_path / "c", step=-1)
    assert not list(tmp_path.rglob("step*")) and not (tmp_path / "c").exists()
    # a list was an AttributeError
    with pytest.raises(UnsupportedState, match="takes a dict of named values"):
        save_sharded([torch.ones(2)], tmp_path / "c")  # type: ignore[arg-type]
    save_sharded({"w": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(UnsupportedState, match="takes a dict of named values"):
        load_sharded([torch.ones(2)], tmp_path / "c")  # type: ignore[arg-type]


def test_pickling_planners_are_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from killsafe.distributed import ShardedReader, ShardedWriter
    from killsafe.errors import ConfigError

    tensors = {"w": torch.arange(4.0), "b": torch.ones(2, dtype=torch.int32)}
    dcp.save(tensors, storage_writer=ShardedWriter(tmp_path / "t"), no_dist=True)
    loaded = {"w": torch.zeros(4), "b": torch.zeros(2, dtype=torch.int32)}
    dcp.load(loaded, storage_reader=ShardedReader(tmp_path / "t"), no_dist=True)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    state = {"w": torch.ones(2), "step": 3}
    with pytest.raises(CheckpointException) as caught:
        dcp.save(state, storage_writer=ShardedWriter(tmp_path / "c"), no_dist=True)
    assert any(isinstance(error, ConfigError) for error, _ in caught.value.failures.values())
    assert not (tmp_path / "c").exists()
    save_sharded(state, tmp_path / "c")
    with pytest.raises(CheckpointException) as caught:
        dcp.load(state, storage_reader=ShardedReader(tmp_path / "c"), no_dist=True)
    assert any(isinstance(error, ConfigError) for error, _ in caught.value.failures.values())


def test_a_value_that_is_not_json_fails_on_every_rank_at_once(tmp_path: Path) -> None:
    # the other ranks used to wait out the timeout and report the sender as dead
    job = run_job("send_what_is_not_json", 2, tmp_path)
    results = [job.result(rank) for rank in range(2)]
    for result in results:
        assert [error[0] for error in result["errors"]] == ["ConfigError"] * 2, result
        assert all("\n" not in error[1] for error in result["errors"])
        assert result["after"] == [0, 1]  # the ranks are still in step
    assert "cannot send object" in results[0]["errors"][0][1]
    assert "rank(s) 0 is not plain JSON" in results[1]["errors"][0][1]
    assert "cannot send float" in results[1]["errors"][1][1]
    assert "rank(s) 1 is not plain JSON" in results[0]["errors"][1][1]


def test_a_timeout_that_is_not_a_positive_finite_number_is_refused(tmp_path: Path) -> None:
    # inf (no timeout, a user might think) was an OverflowError, None a TypeError
    refused = run_job("refuse_timeouts", 1, tmp_path).result(0)["refused"]
    assert sorted(refused) == sorted(["inf", "nan", "1e+300", "None", "'5'", "0", "-1.0"])
    for kind, message in refused.values():
        assert kind == "ConfigError"
        assert message.startswith("the collective timeout must be a positive number of seconds")


def test_a_hostile_manifest_is_corrupt_not_a_crash(tmp_path: Path) -> None:
    save_sharded({"w": torch.arange(6.0).reshape(2, 3), "step": 3}, tmp_path / "c")
    hostile = [
        lambda m: m["dcp"]["state"]["w"].update(chunks="x"),
        lambda m: m["dcp"]["state"]["w"].update(dtype="Tensor"),
        lambda m: m["dcp"]["storage"][0].update(end=10**12),
        lambda m: m["dcp"]["storage"][0].update(file="../../etc/passwd"),
        lambda m: m["dcp"].update(storage=[]),
        # a piece past its file: refused before its bytes are allocated, not 10 TB asked for
        lambda m: [row.update(end=10**13) for row in m["dcp"]["storage"] if row["fqn"] == "step"],
        lambda m: [row.update(header_size="x") for row in m["files"].values()],
        lambda m: [row.update(header_size=-100) for row in m["files"].values()],
        lambda m: m["dcp"]["state"]["w"].update(size=[-1, 3]),
        # chunks that do not cover the tensor would leave part of the target unfilled
        lambda m: m["dcp"]["state"]["w"].update(chunks=[]),
        lambda m: m["dcp"]["state"]["w"].update(chunks=[[[0, 0], [-2, 3]]]),
        lambda m: m["dcp"]["state"]["w"].update(chunks=[[[1, 0], [2, 3]]]),
    ]
    for _ in each_hostile_manifest(tmp_path / "c", hostile):
        with pytest.raises(CorruptCheckpoint):
            load_sharded({"w": torch.zeros(2, 3), "step": None}, tmp_path / "c")


def test_a_manifest_naming_a_file_outside_its_checkpoint_is_corrupt(tmp_path: Path) -> None:
    save_sharded({"w": torch.zeros(6)}, tmp_path / "c")
    save_sharded({"w": torch.arange(6.0)}, tmp_path / "other")
    other = json.loads((tmp_path / "other" / "manifest.json").read_text())
    outside = "../other/rank-00000.safetensors"

    def point_outside(manifest: dict[str, Any]) -> None:
        manifest["files"] = {outside: other["files"]["rank-00000.safetensors"]}
        manifest["dcp"]["storage"] = [{**row, "file": outside} for row in other["dcp"]["storage"]]

    for _ in each_hostile_manifest(tmp_path / "c", [point_outside]):
        # the reader opened ../other's file (checksums and all) and loaded it
        with pytest.raises(CorruptCheckpoint, match="rank-"):
            load_sharded({"w": torch.ones(6)}, tmp_path / "c")


def test_a_hostile_tensor_size_is_corrupt_before_anything_is_allocated(tmp_path: Path) -> None:
    from killsafe.distributed.reshard import load_shared

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    save_sharded({"opt": optimizer.state_dict()}, tmp_path / "c")
    big = [10**7, 10**7]  # 400 TB of float32, in a chunk no piece holds

    def grow(manifest: dict[str, Any]) -> None:
        manifest["dcp"]["state"]["opt.state.0.exp_avg"].update(size=big, chunks=[[[0, 0], big]])

    for _ in each_hostile_manifest(tmp_path / "c", [grow]):
        # resuming an optimizer built its target from the size: a RuntimeError from
        # the allocator, with a traceback
        with pytest.raises(CorruptCheckpoint, match="has no piece of its size"):
            load_shared(tmp_path / "c", {"opt": torch.optim.Adam(model.parameters())}, None)


def test_a_hostile_flattening_map_is_corrupt_for_a_whole_load(tmp_path: Path) -> None:
    from killsafe.distributed.sharded import load_full

    save_sharded({"m": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3}, tmp_path / "c")
    assert load_full(tmp_path / "c")["m"]["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    hostile = [
        # rebuilding the state grew a list to a billion slots (memory, then minutes)
        lambda m: m["dcp"]["paths"].update({"m.w": ["m", 10**9]}),
        lambda m: m["dcp"]["paths"].update({"m.w": ["m", -5]}),
        lambda m: m["dcp"]["paths"].update({"m.w": []}),  # an IndexError
        lambda m: m["dcp"]["paths"].update({"m.w": [0, "w"]}),
        lambda m: m["dcp"]["paths"].update({"m.w": ["m", 1.5]}),
        # a value where the map puts a tensor under it: was StateMismatch, as if the
        # caller had passed the wrong state (load_full passes none)
        lambda m: m["dcp"]["paths"].update({"step": ["m", "w", "x"]}),
    ]
    for _ in each_hostile_manifest(tmp_path / "c", hostile):
        with pytest.raises(CorruptCheckpoint):
            load_full(tmp_path / "c")
