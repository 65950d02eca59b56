"""Jobs whose nodes share no disk: sharded checkpoints straight into an object store.

Real gloo jobs of 2 and 3 processes and a real S3 server (SeaweedFS). Each
rank of a ``nodisk`` job (``tests/distributed_run_worker.py``) gets a run
directory of its own, as nodes with local disks would: with a mirror the
checkpoints go there (each rank uploads its file, rank 0 commits), and a
job on fresh, empty directories resumes from it bit-identical to a job
never interrupted; without one the job refuses to start.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import distributed_worker as worker  # noqa: E402
from conftest import S3_TEST_BUCKET  # noqa: E402
from distributed_helpers import Job, run_job  # noqa: E402

from killsafe import CheckpointStore, storage  # noqa: E402
from killsafe.cli import main as cli  # noqa: E402
from killsafe.distributed import load_sharded  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

RUN_WORKER = Path(__file__).resolve().parent / "distributed_run_worker.py"
STOPPED = 75
STOP_STEP = 5  # SIGTERM during step 3: flagged at boundary 4, agreed at boundary 5


@pytest.fixture(scope="module")
def s3_env(s3_server: Any) -> Iterator[str]:
    """The S3 server's variables for the whole module (jobs are module fixtures); a prefix."""
    unset = ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_UNSIGNED_PAYLOAD", "AWS_SESSION_TOKEN")
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    with mock.patch.dict(os.environ, {**environment, **s3_server.environment()}, clear=True):
        yield f"s3://{S3_TEST_BUCKET}/nodisk-{os.getpid()}"


def nodisk(
    workdir: Path,
    run_root: Path,
    *events: str,
    mirror: str | None,
    expect: int = 0,
    scenario: str = "nodisk",
) -> Job:
    """A 2-rank job; rank R runs in ``run_root/node-R``, saving to ``mirror``."""
    variables = {"KILLSAFE_TEST_MIRROR": mirror} if mirror else {}
    with mock.patch.dict(os.environ, variables):
        return run_job(
            scenario, 2, workdir, str(run_root), *events, expect=expect, worker=RUN_WORKER
        )


@pytest.fixture(scope="module")
def jobs(s3_env: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted job; one stopped by SIGTERM to rank 1, then resumed on fresh nodes."""
    root = tmp_path_factory.mktemp("nodisk")
    whole = nodisk(root / "whole", root / "whole-run", mirror=f"{s3_env}/whole")
    mirror = f"{s3_env}/stopped"
    stopped = nodisk(root / "stopped", root / "first", "1:3:term", mirror=mirror, expect=STOPPED)
    listed = CheckpointStore(mirror).list()
    resumed = nodisk(root / "resumed", root / "fresh", mirror=mirror)
    return {
        "root": root,
        "mirror": mirror,
        "whole": whole,
        "stopped": stopped,
        "stopped-listed": listed,
        "resumed": resumed,
    }


def test_a_job_without_a_shared_disk_saves_its_shards_to_the_mirror(
    jobs: dict[str, Any],
) -> None:
    infos = jobs["stopped-listed"]
    assert [(i.step, i.reason) for i in infos] == [(3, "periodic"), (STOP_STEP, "signal:SIGTERM")]
    assert all(i.sharded and i.world_size == 2 for i in infos)
    for rank in range(2):
        assert jobs["stopped"].result(rank)["step"] == STOP_STEP
    shown = jobs["stopped"].output(0)
    assert f"saving to {jobs['mirror']} (straight from every rank" in shown
    node_0 = jobs["root"] / "first" / "node-0"
    assert not (node_0 / "checkpoints").exists()  # nothing saved on the local disks
    assert (node_0 / "run.json").exists()  # rank 0 keeps the records locally
    report = json.loads((node_0 / "report.json").read_text())  # it lists the mirror's
    assert [c["step"] for c in report["checkpoints"]] == [3, STOP_STEP]
    assert not [p for p in (jobs["root"] / "first" / "node-1").iterdir()]


def test_stopped_and_resumed_on_fresh_nodes_ends_bit_identical(jobs: dict[str, Any]) -> None:
    for rank in range(2):
        whole, stopped, resumed = (jobs[k].result(rank) for k in ("whole", "stopped", "resumed"))
        assert resumed["restored"] == stopped["weights"]
        assert resumed["weights"] == whole["weights"]
        assert resumed["seen"] == whole["seen"]  # per-rank data and random streams
        assert resumed["next_random"] == whole["next_random"]
        assert (resumed["exit_code"], resumed["step"]) == (0, 8)
    run_json = json.loads((jobs["root"] / "fresh" / "node-0" / "run.json").read_text())
    assert len(run_json["sessions"]) == 2  # the run's files came down from the mirror
    steps = [i.step for i in CheckpointStore(jobs["mirror"]).list()]
    assert steps[-1] == 8


def test_an_incremental_job_puts_only_pieces_into_the_mirror(
    jobs: dict[str, Any], s3_env: str
) -> None:
    mirror = f"{s3_env}/incremental"
    root = jobs["root"]
    job = nodisk(
        root / "incremental", root / "incremental-run", mirror=mirror, scenario="nodisk-incremental"
    )
    for rank in range(2):
        assert job.result(rank)["weights"] == jobs["whole"].result(rank)["weights"]
    store = CheckpointStore(mirror, incremental=True)
    infos = store.list()
    assert [i.step for i in infos] == [3, 6, 8]
    for info in infos:
        manifest = json.loads(storage.read_bytes(store.backend, f"{info.path}/manifest.json"))
        assert (manifest["files"], sorted(manifest["shards"])) == (
            {},
            ["rank-00000.safetensors", "rank-00001.safetensors"],
        )
        assert store.verify(info).world_size == 2
    assert not [i.key for i in store.backend.list("step-") if "safetensors" in i.key]


def test_a_failed_upload_on_one_rank_commits_nothing(s3_env: str, tmp_path: Path) -> None:
    mirror = f"{s3_env}/failed"
    (tmp_path / "work").mkdir()
    with mock.patch.dict(os.environ, {"KILLSAFE_TEST_MIRROR": mirror}):
        job = Job(
            "nodisk",
            2,
            tmp_path / "work",
            str(tmp_path / "run"),
            "1:6:failupload",
            worker=RUN_WORKER,
        )
    codes = job.wait(timeout=120)
    assert codes == [1, 1], job.output(0)
    results = [job.result(rank) for rank in range(2)]
    assert [r["error"] for r in results] == ["SaveFailed", "SaveFailed"]
    assert "503 SlowDown (test)" in results[1]["message"]
    store = CheckpointStore(mirror)
    assert [i.step for i in store.list()] == [3]  # never committed; step 3 stands
    assert store.verify(3).world_size == 2
    assert not list(store.backend.list("step-000006/"))  # the attempt was removed


def test_without_a_shared_disk_or_a_mirror_every_rank_refuses_to_start(tmp_path: Path) -> None:
    job = nodisk(tmp_path / "work", tmp_path / "run", mirror=None, expect=1)
    for rank in range(2):
        result = job.result(rank)
        assert result["error"] == "ConfigError"
        assert "rank(s) 1 of the job do not see rank 0's run directory" in result["message"]
        assert "mirror=URL" in result["message"]
        assert "\n" not in result["message"]


def test_saved_on_two_ranks_into_s3_loads_on_one_and_on_three(
    s3_env: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{s3_env}/sharded"
    saved = run_job("save_to_store", 2, tmp_path / "save", url)
    assert [saved.result(rank)["path"] for rank in range(2)] == ["step-000007"] * 2
    store = CheckpointStore(url)
    [info] = store.list()
    assert (info.step, info.sharded, info.world_size) == (7, True, 2)
    expected = worker.plain(worker.full_state())
    state = worker.zeroed(worker.full_state())
    load_sharded(state, "latest", store=store)  # one process, every piece
    assert worker.plain(state) == expected
    loaded = run_job("load_from_store", 3, tmp_path / "load", url)
    for rank in range(3):
        assert loaded.result(rank)["state"] == expected
    assert cli(["verify", url]) == 0
    assert capsys.readouterr().out.count(": ok") == 1
    assert cli(["list", "--json", url]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(c["step"], c["world_size"]) for c in listed] == [(7, 2)]
    assert cli(["inspect", f"{url}/step-000007"]) == 0
    shown = capsys.readouterr().out
    assert "world size 2" in shown and "rank-00001.safetensors" in shown
