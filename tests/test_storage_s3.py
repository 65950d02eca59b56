"""The object-store backend against a real S3 server (SeaweedFS on 127.0.0.1).

Faults come from a proxy between the client and the server: throttling
(503 SlowDown), connections dropped mid-part, answers lost after the server
acted. Every test is skipped when the server or obstore is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from s3_proxy import FaultProxy

from killsafe import storage
from killsafe.errors import KeyExists, SaveFailed
from killsafe.storage import read_bytes, write_bytes
from killsafe.storage.testserver import LocalS3Server

MiB = 1 << 20


@pytest.fixture
def proxy(
    s3_server: LocalS3Server, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FaultProxy]:
    """A fault proxy that the AWS variables point at (the server stays reachable directly)."""
    faulty = FaultProxy(urlsplit(s3_server.endpoint).port or 0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty.endpoint)
    yield faulty
    faulty.close()


def _direct(s3_server: LocalS3Server, url: str, monkeypatch: pytest.MonkeyPatch) -> storage.Backend:
    """A backend that bypasses the proxy, to see what really reached the server."""
    with monkeypatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
        return storage.open(url)


def _upload(backend: storage.Backend, key: str, data: bytes) -> None:
    with backend.open_write(key) as sink:
        for start in range(0, len(data), 2 * MiB):
            sink.write(memoryview(data)[start : start + 2 * MiB])


def test_throttled_parts_are_retried_with_backoff(
    s3_server: LocalS3Server, s3_url: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.inject("slowdown", target="partNumber=", count=3)
    backend = storage.open(s3_url, part_size=5 * MiB, concurrency=2, backoff=0.02)
    data = os.urandom(12 * MiB)
    _upload(backend, "tensors", data)
    assert proxy.actions("slowdown") == 3
    assert read_bytes(_direct(s3_server, s3_url, monkeypatch), "tensors") == data


def test_parts_go_up_in_parallel(s3_url: str, proxy: FaultProxy) -> None:
    backend = storage.open(s3_url, part_size=5 * MiB, concurrency=4)
    _upload(backend, "tensors", os.urandom(20 * MiB + 1))
    parts = [target for method, target, _ in proxy.seen if "partNumber=" in target]
    assert len(parts) == 5
    assert proxy.most_in_flight >= 2


def test_a_connection_dropped_mid_part_is_retried(
    s3_server: LocalS3Server, s3_url: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.inject("drop", target="partNumber=", count=2)
    backend = storage.open(s3_url, part_size=5 * MiB, concurrency=2, backoff=0.02)
    data = os.urandom(11 * MiB)
    _upload(backend, "tensors", data)
    assert proxy.actions("drop") == 2
    assert read_bytes(_direct(s3_server, s3_url, monkeypatch), "tensors") == data


def test_a_throttled_small_put_and_read_are_retried(s3_url: str, proxy: FaultProxy) -> None:
    backend = storage.open(s3_url, backoff=0.02)
    proxy.inject("slowdown", method="PUT", count=2)
    write_bytes(backend, "small.json", b'{"ok": true}')
    proxy.inject("slowdown", method="GET", count=2)
    assert read_bytes(backend, "small.json") == b'{"ok": true}'
    assert proxy.actions("slowdown") == 4


def test_a_create_whose_answer_was_lost_still_counts_as_created(
    s3_url: str, proxy: FaultProxy
) -> None:
    backend = storage.open(s3_url, backoff=0.02)
    proxy.inject("drop_response", method="PUT", target="manifest.json")
    backend.create_if_absent("manifest.json", b'{"attempt": "a1"}')
    assert proxy.actions("drop_response") == 1
    assert read_bytes(backend, "manifest.json") == b'{"attempt": "a1"}'
    with pytest.raises(KeyExists):
        backend.create_if_absent("manifest.json", b'{"attempt": "a2"}')


def test_a_server_that_keeps_failing_raises_save_failed_and_leaves_no_object(
    s3_server: LocalS3Server, s3_url: str, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.inject("slowdown", method="PUT", count=10_000)
    backend = storage.open(s3_url, part_size=5 * MiB, max_retries=2, backoff=0.01)
    with pytest.raises(SaveFailed) as caught:
        _upload(backend, "tensors", os.urandom(11 * MiB))
    message = str(caught.value)
    assert "\n" not in message
    assert f"{s3_url}/tensors" in message and "HTTP 503" in message and "after 2 retries" in message
    with pytest.raises(SaveFailed, match="HTTP 503"):
        backend.create_if_absent("manifest.json", b"{}")
    assert list(_direct(s3_server, s3_url, monkeypatch).list("")) == []


def test_wrong_credentials_raise_a_one_line_save_failed(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    backend = storage.open(s3_url, max_retries=0)
    with pytest.raises(SaveFailed) as caught:
        write_bytes(backend, "k", b"x")
    message = str(caught.value)
    assert "\n" not in message and "HTTP 403" in message and "credentials" in message


def test_credentials_region_and_endpoint_come_from_the_shared_aws_files(
    s3_server: LocalS3Server, s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = s3_server.environment()
    for name in env:
        monkeypatch.delenv(name)
    (tmp_path / "credentials").write_text(
        "[trial]\n"
        f"aws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    (tmp_path / "config").write_text(
        f"[profile trial]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "trial")
    backend = storage.open(s3_url)
    write_bytes(backend, "from-profile", b"written with the profile's keys")
    assert read_bytes(backend, "from-profile") == b"written with the profile's keys"
