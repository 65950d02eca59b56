"""CheckpointStore on object media: memory:// for the protocol, s3:// on a real SeaweedFS.

The commit is the manifest, written last and create-only; each attempt's
data lives under its own prefix; the lease keeps one writer; faults come
from storage.faults.FaultyBackend around the real backend.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from killsafe import CheckpointStore, storage
from killsafe import format as fmt
from killsafe.errors import (
    CheckpointExists,
    ConfigError,
    CorruptCheckpoint,
    SaveFailed,
    StoreLocked,
)
from killsafe.storage.faults import FaultyBackend
from killsafe.storage.memory import MemoryBackend
from killsafe.store.manifest_commit import new_attempt

MiB = 1 << 20


@pytest.fixture(params=["memory", "s3"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh store URL on each medium (s3: the session's SeaweedFS server)."""
    if request.param == "memory":
        name = uuid.uuid4().hex
        yield f"memory://{name}/checkpoints"
        MemoryBackend.clear(name)
    else:
        yield request.getfixturevalue("s3_url")


def _state(step: int, size: int = 1000) -> dict[str, object]:
    return {"w": np.arange(size, dtype=np.float32) * step, "step": step, "name": f"s{step}"}


def _keys(url: str) -> list[str]:
    return [info.key for info in storage.open(url).list()]


def test_save_load_list_latest_best_verify_delete(url: str) -> None:
    with CheckpointStore(url, best=("loss", "min")) as store:
        for step in range(4):
            info = store.save(_state(step), step=step, metrics={"loss": abs(step - 1)})
            assert info.location == f"{store.location}step-{step:06d}"
        assert [info.step for info in store.list()] == [0, 1, 2, 3]
        loaded = store.load()
        assert loaded["step"] == 3 and np.array_equal(loaded["w"], _state(3)["w"])
        assert store.latest().step == 3  # type: ignore[union-attr]
        assert store.best().step == 1  # type: ignore[union-attr]
        assert store.verify(2).step == 2
        assert store.get(store.list()[0].location).step == 0
        assert np.array_equal(store.load(2, subtree="w"), _state(2)["w"])
        store.delete(0)
        assert [info.step for info in store.list()] == [1, 2, 3]
        assert not any(key.startswith("step-000000/") for key in _keys(url))


def test_retention_keeps_last_and_best_and_deletes_their_data(url: str) -> None:
    with CheckpointStore(url, keep_last=2, keep_best=1, best=("loss", "min")) as store:
        for step in range(6):
            store.save(_state(step), step=step, metrics={"loss": abs(step - 1)})
        assert [info.step for info in store.list()] == [1, 4, 5]
    prefixes = {key.split("/")[0] for key in _keys(url) if key.startswith("step-")}
    assert prefixes == {"step-000001", "step-000004", "step-000005"}


def test_save_async_and_zstd(url: str) -> None:
    with CheckpointStore(url, compression="zstd") as store:
        pending = store.save_async(_state(7, 300_000), step=7)
        assert pending is not None
        assert pending.wait().step == 7
        assert np.array_equal(store.load(7)["w"], _state(7, 300_000)["w"])


def test_an_existing_checkpoint_is_not_replaced(url: str) -> None:
    with CheckpointStore(url) as store:
        store.save(_state(1), step=1)
        with pytest.raises(CheckpointExists):
            store.save(_state(2), step=1)
        assert store.load(1)["step"] == 1


def test_the_manifest_is_the_commit_and_is_written_last(url: str) -> None:
    backend = FaultyBackend(storage.open(url))
    with CheckpointStore(backend) as store:
        staging = store.begin(5)
        store.write(staging, fmt.encode(_state(5)))
        assert store.list() == []  # data uploaded, no manifest: no checkpoint
        assert any(key.startswith("step-000005/") for key in _keys(url))
        store.commit(staging)
        assert [info.step for info in store.list()] == [5]


def test_a_failed_upload_is_save_failed_and_leaves_earlier_checkpoints(url: str) -> None:
    backend = FaultyBackend(storage.open(url))
    with CheckpointStore(backend) as store:
        store.save(_state(1), step=1)
        backend.fail_writes(1, after_bytes=100, status=503)
        with pytest.raises(SaveFailed, match=r"HTTP 503"):
            store.save(_state(2), step=2)
        backend.drop_writes(1, after_bytes=10)
        with pytest.raises(SaveFailed, match="connection closed"):
            store.save(_state(3), step=3)
        backend.fail_creates(1)
        with pytest.raises(SaveFailed):
            store.save(_state(4), step=4)
        assert [info.step for info in store.list()] == [1]
        assert store.load()["step"] == 1
        assert {key.split("/")[0] for key in _keys(url) if key.startswith("step-")} == {
            "step-000001"
        }
        store.save(_state(2), step=2)  # the next save works
        assert store.latest().step == 2  # type: ignore[union-attr]


def test_a_second_writer_is_refused_naming_host_and_pid(url: str) -> None:
    first = CheckpointStore(url)
    first.save(_state(1), step=1)
    second = CheckpointStore(url)
    with pytest.raises(StoreLocked, match=r"locked by pid \d+ on "):
        second.save(_state(2), step=2)
    assert second.load()["step"] == 1  # readers never lock
    first.close()
    second.save(_state(2), step=2)
    second.close()


def test_orphaned_attempts_are_swept_after_the_grace_period_only(url: str) -> None:
    backend = storage.open(url)
    old = f"step-000003/{new_attempt(time.time() - 3600)}/tensors.safetensors"
    young = f"step-000004/{new_attempt()}/tensors.safetensors"
    for key in (old, young):
        storage.write_bytes(backend, key, b"partial")
    with CheckpointStore(url, sweep_after=600) as store:
        store.save(_state(1), step=1)
        keys = _keys(url)
        assert old not in keys and young in keys
        assert [info.step for info in store.list()] == [1]


def test_a_committed_attempt_is_never_swept(url: str) -> None:
    with CheckpointStore(url, sweep_after=0) as store:
        store.save(_state(1), step=1)
    with CheckpointStore(url, sweep_after=0) as store:
        store.save(_state(2), step=2)
        assert store.verify(1).step == 1


def test_fork_snapshot_is_refused_on_object_stores(url: str) -> None:
    with pytest.raises(ConfigError, match="local directory"):
        CheckpointStore(url, snapshot="fork")
    with pytest.raises(ConfigError, match="not a local directory"):
        _ = CheckpointStore(url).directory


def test_a_large_state_goes_up_in_parts(s3_url: str) -> None:
    backend = storage.open(s3_url, part_size=5 * MiB, concurrency=4)
    state = {"w": np.random.default_rng(0).random(3 * MiB)}  # 24 MiB
    with CheckpointStore(backend) as store:
        store.save(state, step=1)
        assert np.array_equal(store.load()["w"], state["w"])
        store.verify(1)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_import_from_copies_a_local_checkpoint_up_and_back(
    url: str, tmp_path: Path, compression: str | None
) -> None:
    local = CheckpointStore(tmp_path / "local", compression=compression)
    local.save(_state(3, 50_000), step=3, metrics={"loss": 0.5}, name="warm")
    with CheckpointStore(url, keep_last=1) as remote:
        copied = remote.import_from(local, "warm")
        assert (copied.step, copied.name, copied.metrics) == (3, "warm", {"loss": 0.5})
        remote.verify(copied)
        assert np.array_equal(remote.load("warm")["w"], _state(3, 50_000)["w"])
    back = CheckpointStore(tmp_path / "back")
    back.import_from(CheckpointStore(url), 3)
    back.verify(3)
    assert back.load()["name"] == "s3"
    local.close()
    back.close()


def test_import_from_refuses_a_corrupt_source_and_commits_nothing(url: str, tmp_path: Path) -> None:
    local = CheckpointStore(tmp_path / "local")
    info = local.save(_state(1, 10_000), step=1)
    local.close()
    tensors = info.path / fmt.TENSOR_FILE
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with CheckpointStore(url) as remote:
        with pytest.raises(CorruptCheckpoint, match="does not match its checksum"):
            remote.import_from(local, 1)
        assert remote.list() == []
    assert not [key for key in _keys(url) if key.startswith("step-")]


def test_a_fork_snapshot_asked_for_by_the_environment_copies_instead(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KILLSAFE_SNAPSHOT", "fork")
    with CheckpointStore(url) as store:
        pending = store.save_async(_state(2), step=2)
        assert pending is not None and pending.wait().step == 2
        assert store.load()["step"] == 2


class _PagedListing(MemoryBackend):
    """A memory area listed a page at a time, each page fetched after the one before, as
    S3 lists (1000 keys a page): not a snapshot. ``between`` runs once, as soon as a page
    ends among the checkpoints (the pieces, which sort first, all listed)."""

    def __init__(self, name: str, between: Callable[[], None]) -> None:
        super().__init__(name)
        self.between: Callable[[], None] | None = between

    def list(self, prefix: str = "") -> Iterator[storage.ObjectInfo]:
        after = ""
        while True:
            page = [info for info in super().list(prefix) if info.key > after][:1]
            yield from page
            if not page:
                return
            after = page[-1].key
            if self.between is not None and after.startswith("step-"):
                between, self.between = self.between, None
                between()


def test_a_checkpoint_committed_while_the_listing_pages_is_not_called_corrupt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = uuid.uuid4().hex
    writer = CheckpointStore(f"memory://{name}", incremental=True)
    writer.save(_state(1), step=1)
    reader = CheckpointStore(
        _PagedListing(name, between=lambda: writer.save(_state(2), step=2)), incremental=True
    )
    try:
        assert [info.step for info in reader.list()] == [1, 2]
        assert "skipping" not in caplog.text  # its new pieces were listed before they existed
        latest = reader.latest()
        assert latest is not None and latest.step == 2
    finally:
        writer.close()
        MemoryBackend.clear(name)


def test_a_lost_node_still_running_never_takes_its_lease_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = uuid.uuid4().hex
    url = f"memory://{name}/exp"
    monkeypatch.setattr("killsafe.lease.socket.gethostname", lambda: "lost-node")
    lost = CheckpointStore(url, lease_owner="/runs/exp")
    lost.save(_state(1), step=1)
    monkeypatch.setattr("killsafe.lease.socket.gethostname", lambda: "new-node")
    resumed = CheckpointStore(url, lease_owner="/runs/exp")
    resumed.save(_state(2), step=2)  # the same run on a new node takes the lease over at once
    try:
        for step in (3, 4):  # the lost node's next saves, and every one after, are refused
            with pytest.raises(StoreLocked, match="new-node"):
                lost.save(_state(step), step=step)
        resumed.save(_state(5), step=5)
        assert [info.step for info in resumed.list()] == [1, 2, 5]
    finally:
        resumed.close()
        lost.close()
        MemoryBackend.clear(name)


def test_a_url_of_an_unknown_scheme_is_refused_not_made_a_local_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unknown storage scheme 'gcs'") as caught:
        CheckpointStore("gcs://bucket/exp")  # gcsfs's spelling of gs://
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no directory "gcs:" beside the job
    with CheckpointStore(f"file://{tmp_path}/store") as store:  # a file:// URL is a directory
        store.save(_state(1), step=1)
    assert store.directory == tmp_path / "store" and (tmp_path / "store/step-000001").is_dir()
