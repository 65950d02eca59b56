"""The fault-injecting wrapper: armed failures surface as typed errors and leave nothing behind."""

from __future__ import annotations

import uuid

import pytest

from killsafe import storage
from killsafe.errors import KeyNotFound, SaveFailed, StorageError
from killsafe.storage import Backend, read_bytes, write_bytes
from killsafe.storage.faults import FaultyBackend


@pytest.fixture
def faulty() -> FaultyBackend:
    return FaultyBackend(storage.open(f"memory://faults-{uuid.uuid4().hex}"))


def test_the_wrapper_is_a_backend(faulty: FaultyBackend) -> None:
    assert isinstance(faulty, Backend)
    assert faulty.url == faulty.inner.url and faulty.capabilities == faulty.inner.capabilities


@pytest.mark.parametrize("arm", ["fail", "drop"])
def test_a_write_failing_mid_part_leaves_no_object(faulty: FaultyBackend, arm: str) -> None:
    write_bytes(faulty, "old", b"an earlier object")
    if arm == "fail":
        faulty.fail_writes(after_bytes=100)
    else:
        faulty.drop_writes(after_bytes=100)
    sink = faulty.open_write("new")
    sink.write(b"x" * 60)
    with pytest.raises(SaveFailed) as caught:
        sink.write(b"y" * 60)
    message = str(caught.value)
    assert "\n" not in message and "memory://" in message and "new" in message
    assert ("503" in message) == (arm == "fail")
    assert [info.key for info in faulty.list("")] == ["old"]
    write_bytes(faulty, "new", b"the retry of the caller works")
    assert read_bytes(faulty, "new") == b"the retry of the caller works"
    assert faulty.calls["write"] == 3


def test_a_write_armed_past_its_size_fails_at_commit(faulty: FaultyBackend) -> None:
    faulty.fail_writes(after_bytes=1 << 20)
    with pytest.raises(SaveFailed), faulty.open_write("k") as sink:
        sink.write(b"small")
    with pytest.raises(KeyNotFound):
        faulty.source("k")


def test_failed_creates_and_reads_are_typed_and_counted(faulty: FaultyBackend) -> None:
    faulty.fail_creates(2)
    for _ in range(2):
        with pytest.raises(SaveFailed, match="HTTP 503"):
            faulty.create_if_absent("manifest.json", b"{}")
    assert list(faulty.list("")) == []
    faulty.create_if_absent("manifest.json", b"{}")
    faulty.fail_reads(1, status=500)
    with pytest.raises(StorageError, match="HTTP 500"):
        read_bytes(faulty, "manifest.json")
    assert read_bytes(faulty, "manifest.json") == b"{}"
    assert faulty.calls["create"] == 3 and faulty.calls["read"] == 2
