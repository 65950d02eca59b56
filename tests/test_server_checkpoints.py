"""The checkpoint endpoints over real sockets, against a real checkpoint store."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
store_module = pytest.importorskip("killsafe.store")

from killsafe import report, rundir  # noqa: E402
from killsafe.server import ServerHandle, serve_in_thread  # noqa: E402

TIMEOUT = 10.0


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    return directory


@pytest.fixture
def server(run_dir: Path) -> Iterator[ServerHandle]:
    handle = serve_in_thread(run_dir)
    yield handle
    handle.close()


@pytest.fixture
def client(server: ServerHandle) -> Iterator[Any]:
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


def save_three(run_dir: Path, *, best: tuple[str, str] | None = None) -> list[Any]:
    """Checkpoints at steps 10, 20, 30 with losses 0.5, 0.2, 0.4 (the best is step 20)."""
    with store_module.CheckpointStore(run_dir / "checkpoints", best=best) as store:
        return [
            store.save({"w": [step]}, step, metrics={"loss": loss}, name=name, reason=reason)
            for step, loss, name, reason in [
                (10, 0.5, None, "interval"),
                (20, 0.2, "nice-one", "request"),
                (30, 0.4, None, "interval"),
            ]
        ]


def test_no_checkpoints_yet(client: Any) -> None:
    assert client.get("/api/checkpoints").json() == {"checkpoints": []}


def test_list_checkpoints_with_their_metadata(client: Any, run_dir: Path) -> None:
    infos = save_three(run_dir)
    listed = client.get("/api/checkpoints").json()["checkpoints"]
    assert [c["id"] for c in listed] == [info.path.name for info in infos]
    second = listed[1]
    assert second["step"] == 20 and second["name"] == "nice-one"
    assert second["reason"] == "request" and second["metrics"] == {"loss": 0.2}
    on_disk = sum(p.stat().st_size for p in infos[1].path.iterdir())
    assert second["size"] == on_disk == infos[1].size  # files and manifest, as everywhere
    assert second["created"] == infos[1].created
    assert second["path"] == str(infos[1].path)
    assert [c["latest"] for c in listed] == [False, False, True]
    assert not any(c["best"] for c in listed)  # the run declared no best metric


def test_the_best_comes_from_the_runs_config(client: Any, run_dir: Path) -> None:
    rundir.write_json_atomic(run_dir / "run.json", {"config": {"best": ["loss", "min"]}})
    save_three(run_dir, best=("loss", "min"))
    listed = client.get("/api/checkpoints").json()["checkpoints"]
    assert [c["best"] for c in listed] == [False, True, False]
    best_id = listed[1]["id"]
    refused = client.request("DELETE", f"/api/checkpoints/{best_id}", json={})
    assert refused.status_code == 409 and "best" in refused.json()["detail"]
    forced = client.request("DELETE", f"/api/checkpoints/{best_id}?force=true", json={})
    assert forced.status_code == 200
    assert not (run_dir / "checkpoints" / best_id).exists()


def test_delete_a_checkpoint(client: Any, run_dir: Path) -> None:
    infos = save_three(run_dir)
    target = infos[0].path.name
    answer = client.request("DELETE", f"/api/checkpoints/{target}", json={})
    assert answer.status_code == 200 and answer.json() == {"deleted": target}
    assert not infos[0].path.exists()
    listed = client.get("/api/checkpoints").json()["checkpoints"]
    assert [c["step"] for c in listed] == [20, 30]


def test_the_latest_needs_force(client: Any, run_dir: Path) -> None:
    infos = save_three(run_dir)
    latest = infos[-1].path.name
    refused = client.request("DELETE", f"/api/checkpoints/{latest}", json={})
    assert refused.status_code == 409
    assert "latest" in refused.json()["detail"] and "force=true" in refused.json()["detail"]
    assert infos[-1].path.is_dir()
    forced = client.request("DELETE", f"/api/checkpoints/{latest}?force=true", json={})
    assert forced.status_code == 200 and not infos[-1].path.exists()


@pytest.mark.parametrize("checkpoint_id", ["step-999999", "...", ".lock", "nice-one"])
def test_unknown_ids_are_404(client: Any, run_dir: Path, checkpoint_id: str) -> None:
    save_three(run_dir)
    answer = client.request("DELETE", f"/api/checkpoints/{checkpoint_id}", json={})
    assert answer.status_code == 404
    assert "GET /api/checkpoints" in answer.json()["detail"]
    assert len(client.get("/api/checkpoints").json()["checkpoints"]) == 3


def test_delete_while_a_live_run_owns_the_store_is_409(client: Any, run_dir: Path) -> None:
    infos = save_three(run_dir)
    with store_module.CheckpointStore(run_dir / "checkpoints") as writer:
        writer.save({"w": [40]}, 40)  # holds the write lock, as a live run does
        answer = client.request("DELETE", f"/api/checkpoints/{infos[0].path.name}", json={})
        assert answer.status_code == 409
        assert "live run" in answer.json()["detail"]
        assert infos[0].path.is_dir()


def test_a_run_that_saved_straight_to_its_mirror_lists_and_deletes_there(
    client: Any, run_dir: Path
) -> None:
    # A job whose nodes share no disk: rank 0's directory has the run files, no
    # checkpoints/; run.json names the mirror that holds them.
    mirror = f"memory://straight-{uuid.uuid4().hex[:8]}/exp"
    rundir.write_json_atomic(run_dir / "run.json", {"config": {"mirror": mirror}})
    with store_module.CheckpointStore(mirror) as store:
        for step in (10, 20):
            store.save({"w": [step]}, step, metrics={"loss": 1 / step})
    listed = client.get("/api/checkpoints").json()["checkpoints"]
    assert [(c["step"], c["latest"]) for c in listed] == [(10, False), (20, True)]
    assert listed[1]["path"] == f"{mirror}/step-000020"
    assert [c["step"] for c in report.list_checkpoints(run_dir)] == [10, 20]
    answer = client.request("DELETE", f"/api/checkpoints/{listed[0]['id']}", json={})
    assert answer.status_code == 200
    assert [info.step for info in store_module.CheckpointStore(mirror).list()] == [20]
    missing = client.request("DELETE", "/api/checkpoints/step-000010", json={})
    assert missing.status_code == 404 and mirror in missing.json()["detail"]


def test_names_are_sanitized_like_the_store(client: Any, run_dir: Path) -> None:
    status = {"pid": os.getpid(), "host": rundir.this_host(), "updated": time.time()}
    rundir.write_json_atomic(run_dir / "status.json", {**status, "state": "running"})
    answer = client.post("/api/checkpoints", json={"name": "val loss 0.2!"})
    assert answer.status_code == 202
    [path] = (run_dir / "control").glob("*.json")
    sent = rundir.read_json(path)["name"]
    assert sent == store_module.sanitize_name("val loss 0.2!") == "val-loss-0.2"
