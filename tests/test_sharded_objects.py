"""Sharded checkpoints in an object store, in one process (``memory://`` and faults).

The multi-process jobs on a real S3 server are in test_distributed_nodisk.py;
here the same code path runs on one process: the rank file goes under the
save attempt's prefix, the manifest names the attempt and is put last, and
a failed upload commits nothing and leaves no object.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.checkpoint")

from killsafe import CheckpointStore, storage  # noqa: E402
from killsafe.distributed import load_sharded, save_sharded  # noqa: E402
from killsafe.distributed.objects import StoredCheckpoint  # noqa: E402
from killsafe.errors import (  # noqa: E402
    CheckpointExists,
    ConfigError,
    CorruptCheckpoint,
    SaveFailed,
)
from killsafe.storage.faults import FaultyBackend  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def state() -> dict[str, object]:
    return {"model": {"w": torch.arange(12.0).reshape(3, 4)}, "step": 5, "lr": [0.1, 0.2]}


def empty() -> dict[str, object]:
    return {"model": {"w": torch.zeros(3, 4)}, "step": 0, "lr": [0.0, 0.0]}


@pytest.fixture
def memory_url() -> str:
    return f"memory://sharded-{uuid.uuid4().hex}"


def test_a_sharded_save_commits_its_manifest_last_naming_the_attempt(memory_url: str) -> None:
    store = CheckpointStore(memory_url)
    path = save_sharded(state(), store, step=7, name="first run", metrics={"loss": 0.5})
    assert path == Path("step-000007--first-run")
    keys = sorted(info.key for info in store.backend.list("step-"))
    manifest = json.loads(storage.read_bytes(store.backend, f"{path}/manifest.json"))
    assert keys == [f"{path}/{manifest['attempt']}/rank-00000.safetensors", f"{path}/manifest.json"]
    [info] = store.list()
    assert (info.step, info.name, info.sharded, info.world_size) == (7, "first-run", True, 1)
    assert store.verify(info).metrics == {"loss": 0.5}
    loaded = load_sharded(empty(), "first-run", store=store)
    assert torch.equal(loaded["model"]["w"], torch.arange(12.0).reshape(3, 4))  # type: ignore[index]
    assert (loaded["step"], loaded["lr"]) == (5, [0.1, 0.2])
    with pytest.raises(CheckpointExists, match="first-run"):
        save_sharded(state(), store, step=7, name="first run")


def test_a_failed_upload_commits_nothing_and_leaves_no_object(memory_url: str) -> None:
    faulty = FaultyBackend(storage.open(memory_url))
    store = CheckpointStore(faulty)
    save_sharded(state(), store, step=1)
    faulty.fail_writes(1, after_bytes=10, keys="step-000002/")
    with pytest.raises(SaveFailed, match="injected fault"):
        save_sharded(state(), store, step=2)
    assert [info.step for info in store.list()] == [1]  # the earlier one stands
    assert not list(faulty.list("step-000002/"))  # the attempt was removed
    load_sharded(empty(), "latest", store=store)


def test_a_flipped_byte_in_a_rank_file_fails_verify_and_load(memory_url: str) -> None:
    store = CheckpointStore(memory_url)
    path = save_sharded(state(), store, step=3)
    [key] = [i.key for i in store.backend.list(f"{path}/") if i.key.endswith(".safetensors")]
    raw = bytearray(storage.read_bytes(store.backend, key))
    raw[-3] ^= 0xFF
    storage.write_bytes(store.backend, key, bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        store.verify(3)
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        load_sharded(empty(), StoredCheckpoint(store.backend, str(path)))


def test_a_url_is_refused_with_the_way_to_pass_a_store(memory_url: str) -> None:
    with pytest.raises(ConfigError, match=r"pass store=CheckpointStore\(URL\)"):
        save_sharded(state(), f"{memory_url}/step-000001")
    with pytest.raises(ConfigError, match=r"pass store=CheckpointStore\(URL\)"):
        load_sharded(empty(), f"{memory_url}/step-000001")


def test_the_attempt_of_a_save_whose_writer_died_is_swept_by_the_next_writer(
    memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from killsafe.distributed.objects import StoreTarget

    store = CheckpointStore(memory_url)
    save_sharded(state(), store, step=1)
    # rank 0 dies after the ranks uploaded, before it commits or removes anything
    monkeypatch.setattr(StoreTarget, "commit", lambda self, *args: _die())
    monkeypatch.setattr(StoreTarget, "discard", lambda self: None)
    with pytest.raises(SaveFailed, match="died"):
        save_sharded(state(), store, step=2)
    assert list(store.backend.list("step-000002/"))  # the orphaned attempt
    assert [info.step for info in store.list()] == [1]  # never visible
    store.close()
    monkeypatch.undo()
    with CheckpointStore(memory_url, sweep_after=0) as next_writer:
        next_writer.acquire()  # the next lease holder sweeps what no manifest names
        assert not list(next_writer.backend.list("step-000002/"))
        assert [info.step for info in next_writer.list()] == [1]


def _die() -> None:
    raise SaveFailed("rank 0 died (test)")


def test_an_incremental_object_store_keeps_shards_as_shared_pieces(memory_url: str) -> None:
    store = CheckpointStore(memory_url, incremental=True)
    big = torch.arange(8 << 20, dtype=torch.float32)  # 32 MiB: four pieces
    first = save_sharded({"model": {"w": big}}, store, step=1, incremental=True)
    changed = big.clone()
    changed[:10] = -1.0  # one region
    second = save_sharded({"model": {"w": changed}}, store, step=2, incremental=True)
    assert [i.key for i in store.backend.list(f"{first}/")] == [f"{first}/manifest.json"]
    manifests = [
        json.loads(storage.read_bytes(store.backend, f"{path}/manifest.json"))
        for path in (first, second)
    ]
    assert manifests[0]["added"] >= big.nbytes
    assert 0 < manifests[1]["added"] < big.nbytes // 3  # only the changed piece went up
    for info in store.list():
        store.verify(info)
    target = {"model": {"w": torch.zeros_like(big)}}
    assert torch.equal(load_sharded(target, "latest", store=store)["model"]["w"], changed)  # type: ignore[index]
    store.delete(store.list()[0], force=True)  # the first; its pieces the second needs stay
    target = {"model": {"w": torch.zeros_like(big)}}
    assert torch.equal(load_sharded(target, "latest", store=store)["model"]["w"], changed)  # type: ignore[index]
