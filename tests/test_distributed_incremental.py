"""Sharded saves into an incremental store: a real 2-process gloo job on 127.0.0.1.

The job (tests/distributed_incremental_worker.py) saves twice into a store
that holds a one-process checkpoint, rank 0 pruning after each save (the
first prune removes the one-process checkpoint, the second the first sharded
one); the second save changes a small part of a 32 MiB state. A third save
fails on rank 1. The tests check what the ranks reported and what is on disk,
then load, verify, list, consolidate and export in this process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import distributed_incremental_worker as worker  # noqa: E402
from distributed_helpers import Job, run_job  # noqa: E402
from manifest_helpers import each_hostile_manifest  # noqa: E402

from killsafe import CheckpointStore  # noqa: E402
from killsafe.cli import main as cli  # noqa: E402
from killsafe.distributed import load_sharded, save_sharded  # noqa: E402
from killsafe.errors import CorruptCheckpoint  # noqa: E402
from killsafe.format import PIECE_SUFFIX, verify_checkpoint  # noqa: E402
from killsafe.format.pieces import PIECE_SIZE  # noqa: E402
from killsafe.store.pieces import referenced_pieces  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

WORKER = Path(__file__).resolve().parent / "distributed_incremental_worker.py"
RUN_WORKER = Path(__file__).resolve().parent / "distributed_run_worker.py"
STOPPED = 75
BASE_BYTES = worker.BASE_ELEMENTS * 4
SECOND = "step-000002"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Job]:
    root = tmp_path_factory.mktemp("incremental")
    store = root / "checkpoints"
    first = CheckpointStore(store, incremental=True)
    first.save({"old": torch.arange(300_000.0)}, step=0)
    first.close()  # the job's rank 0 takes the store's lock to prune
    done = run_job("incremental_saves", 2, root / "work", str(store), worker=WORKER)
    return store, done


def expected(version: int) -> Any:
    return worker.summary(worker.incremental_state(version))


def referenced(store: Path, checkpoint: str = SECOND) -> set[str]:
    """The piece files ``checkpoint``'s manifest names."""
    manifest = json.loads((store / checkpoint / "manifest.json").read_text())
    return {digest + PIECE_SUFFIX for digest in manifest["pieces"]}


def on_disk(store: Path) -> set[str]:
    return {p.name for p in (store / "pieces").glob("*/*")}


def test_the_second_save_writes_only_the_changed_pieces(job: tuple[Path, Job]) -> None:
    result = job[1].result(0)
    added = {int(k): v for k, v in result["added"].items()}
    assert added[1] >= BASE_BYTES  # all new
    # the base's piece that changed (8 MiB) and the small entries packed with the adapter
    assert PIECE_SIZE <= added[2] < PIECE_SIZE + (64 << 10)
    first, second = (set(result["referenced"][v]) for v in ("1", "2"))
    written = set(result["pieces"]["2"]) - set(result["after_first_prune"])
    assert written == second - first and 1 <= len(written) <= 3
    assert len(first & second) >= 3  # three of the base's four pieces are shared


def test_both_checkpoints_load_on_two_processes_and_on_one(job: tuple[Path, Job]) -> None:
    store, done = job
    for rank in range(2):
        loaded = done.result(rank)["loaded"]
        assert (loaded["1"], loaded["2"]) == (expected(1), expected(2))
        assert loaded["3"] == expected(2)  # after the first was pruned
    assert done.result(0)["alone"] == expected(1)  # one process, whole tensors
    state = worker.incremental_state(1)
    state["model"] = {key: torch.zeros_like(value) for key, value in state["model"].items()}
    state["optim"] = {"step": torch.tensor(0), "config": {"lr": None, "betas": None}}
    load_sharded(state, store / SECOND)  # resharded onto this one process
    assert worker.summary(state) == expected(2)


def test_prunes_between_saves_keep_the_pieces_sharded_checkpoints_name(
    job: tuple[Path, Job],
) -> None:
    store, done = job
    result = done.result(0)
    # the first prune removed the one-process checkpoint's pieces, not the sharded one's
    assert set(result["after_first_prune"]) == set(result["referenced"]["1"])
    assert set(result["pieces"]["1"]) > set(result["referenced"]["1"])
    assert set(result["after_second_prune"]) == referenced(store)
    assert referenced_pieces(store) == {n.removesuffix(PIECE_SUFFIX) for n in referenced(store)}
    assert [info.step for info in CheckpointStore(store).list()] == [2]


def test_a_rank_whose_write_fails_commits_nothing(job: tuple[Path, Job], tmp_path: Path) -> None:
    store, done = job
    for rank in range(2):
        assert done.result(rank)["third"].startswith("SaveFailed: ")
    assert "rank 1 could not write its pieces" in done.result(1)["third"]
    assert done.result(1)["temporary"] == []  # rank 1 removed what it had begun
    # no checkpoint, no temporary directory left
    assert sorted(p.name for p in store.iterdir()) == [".lock", "pieces", SECOND]
    # rank 0's new piece is in place but named by no manifest: the next sweep removes it
    copy = tmp_path / "checkpoints"
    shutil.copytree(store, copy)
    assert on_disk(copy) > referenced(copy)
    later = CheckpointStore(copy, incremental=True)
    later.delete(later.save({"x": torch.ones(1)}, step=9), force=True)
    assert on_disk(copy) == referenced(copy)
    assert later.verify(SECOND).step == 2
    later.close()


def test_verify_list_inspect_and_export(
    job: tuple[Path, Job], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = job[0]
    assert cli(["verify", str(store)]) == 0
    assert capsys.readouterr().out.count(": ok") == 1
    assert cli(["list", "--json", str(store)]) == 0
    (listed,) = json.loads(capsys.readouterr().out)["checkpoints"]
    assert (listed["world_size"], listed["size"] > BASE_BYTES) == (2, True)
    assert listed["added"] < PIECE_SIZE + (64 << 10)
    assert cli(["inspect", str(store / SECOND)]) == 0
    shown = capsys.readouterr().out
    assert "world size 2, shared pieces; added by rank 0" in shown
    assert "written by this save" in shown

    exported = tmp_path / "all.safetensors"
    assert cli(["export", str(store / SECOND), str(exported)]) == 0
    from safetensors.torch import load_file

    tensors = load_file(exported)
    whole = worker.incremental_state(2)["model"]["base"]
    rows = BASE_BYTES // 4 // 2
    assert torch.equal(torch.cat([tensors["model.base@0"], tensors[f"model.base@{rows}"]]), whole)


def test_a_damaged_piece_fails_verify_and_load(job: tuple[Path, Job], tmp_path: Path) -> None:
    copy = tmp_path / "checkpoints"
    shutil.copytree(job[0], copy)
    named = [p for p in (copy / "pieces").glob("*/*") if p.name in referenced(copy)]
    piece = max(named, key=lambda p: p.stat().st_size)
    raw = bytearray(piece.read_bytes())
    raw[-5] ^= 0xFF
    piece.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        CheckpointStore(copy).verify(SECOND)
    state = worker.incremental_state(1)
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        load_sharded(state, copy / SECOND)


@pytest.fixture(scope="module")
def run_jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Job, Job]:
    """A 2-rank DDP ``Run(incremental=True)`` stopped by a SIGTERM to rank 1 during step 3
    (it saves at steps 3 and 5), then resumed to the end (step 8)."""
    root = tmp_path_factory.mktemp("incremental-run")
    run_dir = root / "run"

    def train(work: str, *events: str, expect: int = 0) -> Job:
        args = (str(run_dir), *events)
        return run_job("train-incremental", 2, root / work, *args, expect=expect, worker=RUN_WORKER)

    stopped = train("stopped", "1:3:term", expect=STOPPED)
    shutil.copytree(run_dir / "checkpoints", root / "at-stop")
    return root, stopped, train("resumed")


def test_a_run_saves_incrementally_and_resumes(run_jobs: tuple[Path, Job, Job]) -> None:
    root, stopped, resumed = run_jobs
    for rank in range(2):
        assert stopped.result(rank)["step"] == 5
        restored = resumed.result(rank)["restored"]
        assert restored == stopped.result(rank)["weights"]  # bit for bit, as saved at step 5
        assert resumed.result(rank)["seen"][:5] == stopped.result(rank)["seen"]
        assert (resumed.result(rank)["step"], resumed.result(rank)["exit_code"]) == (8, 0)
    infos = CheckpointStore(root / "run" / "checkpoints").list()
    assert [i.step for i in infos] == [5, 6, 8]
    for info in infos:
        manifest = json.loads((info.path / "manifest.json").read_text())
        assert info.sharded and not manifest["files"] and len(manifest["shards"]) == 2
        assert info.added is not None and info.added <= info.size + 4096


def test_a_run_checkpoint_of_an_incremental_store_consolidates(
    run_jobs: tuple[Path, Job, Job], tmp_path: Path
) -> None:
    root, stopped, _ = run_jobs
    out = tmp_path / "one-process"
    assert cli(["consolidate", str(root / "at-stop" / "step-000005"), str(out)]) == 0
    state = CheckpointStore(tmp_path).load(out)
    weights = stopped.result(0)["weights"]
    assert [state["model"]["weight"].tolist(), state["model"]["bias"].tolist()] == weights


def test_a_hostile_shard_table_is_corrupt_not_a_crash(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / "c"
    checkpoint.parent.mkdir()
    save_sharded({"w": torch.arange(6.0), "step": 3}, checkpoint, incremental=True)
    (digest,) = json.loads((checkpoint / "manifest.json").read_text())["pieces"]

    def rows(m: dict[str, Any]) -> dict[str, Any]:
        return dict(m["shards"]["rank-00000.safetensors"]["entries"])

    hostile = [
        lambda m: rows(m)["w"].update(pieces=[[digest, 10**6, 24]]),  # outside its piece
        lambda m: rows(m)["w"].update(size=48),  # spans do not add up
        lambda m: m["pieces"].update({digest: 1}),
        lambda m: m["shards"]["rank-00000.safetensors"].update(rank=1),
        lambda m: m["dcp"]["storage"][0].update(key="nowhere"),
        lambda m: m.update(added=None),
    ]
    for _ in each_hostile_manifest(checkpoint, hostile):
        with pytest.raises(CorruptCheckpoint):
            load_sharded({"w": torch.zeros(6), "step": None}, checkpoint)
    verify_checkpoint(checkpoint)
    state = load_sharded({"w": torch.zeros(6), "step": None}, checkpoint)
    assert state["w"].tolist() == list(range(6)) and state["step"] == 3


def test_one_process_loads_in_batches_of_bounded_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import killsafe.distributed.incremental as incremental

    state = {f"t{i}": torch.arange(float(i * 10), float(i * 10 + 7)) for i in range(5)}
    state["empty"] = torch.zeros(0)
    checkpoint = tmp_path / "checkpoints" / "c"
    checkpoint.parent.mkdir()
    save_sharded(state, checkpoint, incremental=True)
    monkeypatch.setattr(incremental, "READ_BATCH", 40)  # about one entry per batch
    loaded = load_sharded({key: torch.ones_like(value) for key, value in state.items()}, checkpoint)
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_import_from_copies_the_pieces_through_an_object_store(tmp_path: Path) -> None:
    """What a run's mirror does: up to an object store and back, only the pieces."""
    local = tmp_path / "local"
    local.mkdir()
    state = {"w": torch.randn(300_000), "b": torch.ones(3)}
    save_sharded(state, local / "step-000001", step=1, incremental=True)
    remote = CheckpointStore(f"memory://{tmp_path.name}-mirror", incremental=True)
    uploaded = remote.import_from(CheckpointStore(local, incremental=True), 1)
    assert uploaded.sharded and uploaded.added is not None
    assert remote.verify("latest").step == 1
    back = CheckpointStore(tmp_path / "back", incremental=True)
    assert back.import_from(remote, "latest").step == 1
    back.verify(1)
    target = {"w": torch.zeros(300_000), "b": torch.zeros(3)}
    loaded = load_sharded(target, tmp_path / "back" / "step-000001")
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])


def test_rank_0_holds_the_lock_of_an_incremental_store_from_the_first_save(
    tmp_path: Path,
) -> None:
    """No other process sweeps (``killsafe prune``) while the job may be writing pieces."""
    from killsafe.distributed import LocalCoordinator
    from killsafe.errors import StoreLocked
    from killsafe.run.group import GroupStore, RunGroup

    other = CheckpointStore(tmp_path, incremental=True)
    other.acquire()
    job_store = GroupStore(
        CheckpointStore(tmp_path, incremental=True), RunGroup(LocalCoordinator())
    )
    with pytest.raises(StoreLocked):
        job_store.save({"w": torch.ones(3)}, 1)
    other.close()
    assert job_store.save({"w": torch.ones(3)}, 1).sharded
    with pytest.raises(StoreLocked):  # as `killsafe prune` or `delete` would
        CheckpointStore(tmp_path, incremental=True).acquire()
    job_store.close()
    after = CheckpointStore(tmp_path, incremental=True)
    after.acquire()
    after.close()
