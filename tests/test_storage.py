"""The storage contract, run against every backend: local files, memory, and a real S3 server.

Each test gets a fresh, empty backend. The ``s3`` variant talks to SeaweedFS
on 127.0.0.1 (the session's ``s3_server``) and is skipped without it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from killsafe import storage
from killsafe.errors import (
    ConfigError,
    InvalidKey,
    KeyExists,
    KeyNotFound,
    KillsafeError,
    SaveFailed,
    StorageError,
)
from killsafe.storage import Backend, LocalBackend, MemoryBackend, read_bytes, write_bytes

MiB = 1 << 20


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        opened = storage.open(tmp_path / "root")
    elif request.param == "memory":
        opened = storage.open(f"memory://contract-{uuid.uuid4().hex}/some/prefix")
    else:
        url = request.getfixturevalue("s3_url")
        opened = storage.open(url, part_size=5 * MiB, concurrency=4)
    yield opened
    opened.close()


def _payload(size: int, seed: int = 0) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[seed : seed + size]


def test_a_committed_object_reads_back_whole_and_in_ranges(backend: Backend) -> None:
    data = _payload(100_000)
    with backend.open_write("a/b/object.bin") as sink:
        sink.write(data[:40_000])
        sink.write(memoryview(data)[40_000:])
    with backend.source("a/b/object.bin") as source:
        assert source.size == len(data)
        assert bytes(source.read()) == data
        assert bytes(source.read(12_345, 678)) == data[12_345 : 12_345 + 678]
        assert bytes(source.read(99_990)) == data[99_990:]
        out = bytearray(1000)
        source.readinto(5000, memoryview(out))
        assert bytes(out) == data[5000:6000]


def test_a_large_object_goes_up_in_parts_and_reads_back(backend: Backend) -> None:
    data = os.urandom(12 * MiB + 3)
    with backend.open_write("big") as sink:
        for start in range(0, len(data), 3 * MiB):
            sink.write(memoryview(data)[start : start + 3 * MiB])
    assert read_bytes(backend, "big") == data
    assert [(info.key, info.size) for info in backend.list("big")] == [("big", len(data))]


def test_an_empty_object_is_an_object(backend: Backend) -> None:
    write_bytes(backend, "empty", b"")
    with backend.source("empty") as source:
        assert source.size == 0
        assert bytes(source.read()) == b""


def test_nothing_is_visible_before_commit_and_abort_leaves_nothing(backend: Backend) -> None:
    sink = backend.open_write("pending/x")
    sink.write(b"half of it")
    assert list(backend.list("")) == []
    with pytest.raises(KeyNotFound):
        backend.source("pending/x")
    sink.abort()
    sink.abort()
    assert list(backend.list("")) == []
    with pytest.raises(SaveFailed):
        sink.write(b"more")


def test_an_exception_inside_the_with_block_aborts(backend: Backend) -> None:
    with pytest.raises(RuntimeError), backend.open_write("k") as sink:
        sink.write(b"partial")
        raise RuntimeError("the writer failed")
    assert list(backend.list("")) == []


def test_a_commit_replaces_the_old_object_whole(backend: Backend) -> None:
    write_bytes(backend, "k", b"old contents, longer")
    write_bytes(backend, "k", b"new")
    assert read_bytes(backend, "k") == b"new"


def test_list_matches_key_prefixes_sorted_with_sizes(backend: Backend) -> None:
    for key in ("run/b/2", "run/a/1", "run/a/10", "runner/x", "other/y", "run/ab"):
        write_bytes(backend, key, key.encode())
    assert [info.key for info in backend.list("run/a")] == ["run/a/1", "run/a/10", "run/ab"]
    assert [info.key for info in backend.list("run/")] == [
        "run/a/1",
        "run/a/10",
        "run/ab",
        "run/b/2",
    ]
    assert [info.key for info in backend.list("run")][-1] == "runner/x"
    assert len(list(backend.list(""))) == 6
    assert {info.key: info.size for info in backend.list("other")} == {"other/y": 7}
    assert list(backend.list("nothing/here/")) == []


def test_delete_removes_and_a_missing_key_is_fine(backend: Backend) -> None:
    write_bytes(backend, "d/1", b"x")
    write_bytes(backend, "d/2", b"y")
    backend.delete("d/1")
    backend.delete("d/1")
    backend.delete("never/was")
    assert [info.key for info in backend.list("d/")] == ["d/2"]
    with pytest.raises(KeyNotFound):
        read_bytes(backend, "d/1")


def test_an_object_deleted_after_it_was_opened_reads_whole_or_as_not_found(
    backend: Backend,
) -> None:
    """What a reader listing a store sees when the writer's retention deletes as it reads."""
    write_bytes(backend, "step-000035/manifest.json", b"{}")
    source = backend.source("step-000035/manifest.json")
    backend.delete("step-000035/manifest.json")
    try:  # a local file or a memory object still reads as it was: also fine
        assert bytes(source.read()) == b"{}"
    except KeyNotFound:
        pass
    finally:
        source.close()


def test_create_if_absent_creates_once_and_names_the_conflict(backend: Backend) -> None:
    backend.create_if_absent("manifest.json", b'{"attempt": 1}')
    with pytest.raises(KeyExists, match=r"manifest\.json already exists"):
        backend.create_if_absent("manifest.json", b'{"attempt": 2}')
    assert read_bytes(backend, "manifest.json") == b'{"attempt": 1}'
    # The same bytes again is what a retried request whose first attempt landed sees.
    backend.create_if_absent("manifest.json", b'{"attempt": 1}')


def test_racing_creators_have_exactly_one_winner(backend: Backend) -> None:
    outcomes: list[str] = []
    lock = threading.Lock()

    def create(n: int) -> None:
        try:
            backend.create_if_absent("race", f"writer {n}".encode())
            result = f"won {n}"
        except KeyExists:
            result = "lost"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 5
    assert read_bytes(backend, "race") == f"writer {winners[0].split()[1]}".encode()


def test_reads_outside_the_object_are_refused(backend: Backend) -> None:
    write_bytes(backend, "small", b"0123456789")
    with backend.source("small") as source, pytest.raises(StorageError, match="outside"):
        source.read(5, 10)


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "..", "a//b", "./a", "a/", "a\\b", "a\x00b", ".ks-partial-1"]
)
def test_unusable_keys_are_refused_in_one_line(backend: Backend, key: str) -> None:
    for operation in (
        lambda: backend.open_write(key),
        lambda: backend.source(key),
        lambda: backend.delete(key),
        lambda: backend.create_if_absent(key, b"x"),
    ):
        with pytest.raises(InvalidKey) as caught:
            operation()
        assert "\n" not in str(caught.value) and "relative path" in str(caught.value)
    with pytest.raises(InvalidKey):
        list(backend.list("/abs"))


def test_the_url_opens_the_same_objects(backend: Backend) -> None:
    write_bytes(backend, "shared/key", b"seen from both")
    again = storage.open(backend.url)
    try:
        assert read_bytes(again, "shared/key") == b"seen from both"
        assert type(again.capabilities) is type(backend.capabilities)
    finally:
        again.close()


# Local backend specifics


def test_local_rename_moves_a_whole_prefix_atomically(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    write_bytes(backend, ".tmp-1/manifest.json", b"{}")
    write_bytes(backend, ".tmp-1/tensors", b"t")
    backend.rename(".tmp-1", "step-1")
    assert [info.key for info in backend.list("")] == ["step-1/manifest.json", "step-1/tensors"]
    write_bytes(backend, ".tmp-2/manifest.json", b"{}")
    with pytest.raises(KeyExists):
        backend.rename(".tmp-2", "step-1")
    with pytest.raises(KeyNotFound):
        backend.rename("missing", "elsewhere")
    assert backend.capabilities.rename and backend.capabilities.mmap


@pytest.mark.parametrize("direct", [True, False])
def test_local_write_buffers_stores_their_concatenation(tmp_path: Path, direct: bool) -> None:
    backend = LocalBackend(tmp_path)
    pieces = [os.urandom(9 * MiB + 5), b"", bytearray(b"tail"), memoryview(os.urandom(4097))]
    backend.write_buffers("tensors", pieces, direct=direct)
    assert backend.path("tensors").read_bytes() == b"".join(bytes(p) for p in pieces)
    assert backend.capabilities.direct_io
    assert [p.name for p in tmp_path.iterdir()] == ["tensors"]


def test_local_partial_files_of_a_killed_writer_are_never_listed(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path)
    sink = backend.open_write("dir/obj")
    sink.write(b"never committed")  # the process dies here: no abort runs
    write_bytes(backend, "dir/other", b"ok")
    assert [info.key for info in backend.list("")] == ["dir/other"]
    assert any(p.name.startswith(".ks-partial-") for p in (tmp_path / "dir").iterdir())
    assert backend.path("dir/other").read_bytes() == b"ok"
    assert backend.remove_partials(older_than=3600) == 0
    hour_ago = time.time() - 3601
    for partial in (tmp_path / "dir").glob(".ks-partial-*"):
        os.utime(partial, (hour_ago, hour_ago))
    assert backend.remove_partials(older_than=3600) == 1
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["other"]


def test_local_delete_removes_emptied_directories(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path / "root")
    write_bytes(backend, "a/b/c", b"x")
    backend.delete("a/b/c")
    assert list((tmp_path / "root").iterdir()) == []


def test_local_write_failure_is_a_one_line_save_failed(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory should be")
    backend = LocalBackend(tmp_path)
    with pytest.raises(SaveFailed, match=r"could not write .*blocker/x") as caught:
        backend.open_write("blocker/x")
    assert "\n" not in str(caught.value)


# Memory backend specifics


def test_memory_areas_are_shared_by_name_and_cleared() -> None:
    name = f"area-{uuid.uuid4().hex}"
    first, second = storage.open(f"memory://{name}"), storage.open(f"memory://{name}/")
    write_bytes(first, "k", b"v")
    assert read_bytes(second, "k") == b"v"
    under_prefix = storage.open(f"memory://{name}/p")
    assert list(under_prefix.list("")) == []
    MemoryBackend.clear(name)
    assert list(storage.open(f"memory://{name}").list("")) == []


# open()


def test_open_maps_paths_and_urls_to_backends(tmp_path: Path) -> None:
    assert isinstance(storage.open(tmp_path), LocalBackend)
    assert isinstance(storage.open(str(tmp_path)), LocalBackend)
    local = storage.open(tmp_path.as_uri())
    assert isinstance(local, LocalBackend) and local.root == tmp_path
    assert isinstance(storage.open("memory://x/y"), MemoryBackend)
    assert storage.is_url("s3://b/p") and storage.is_url("memory://x")
    assert not storage.is_url(tmp_path) and not storage.is_url("relative/dir")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/dir",
        "memory://",
        "file://otherhost/dir",
        "memory://x/../y",
        "s3://bucket/a/../b",
    ],
)
def test_open_refuses_unusable_urls_in_one_line(url: str) -> None:
    if url.startswith("s3"):
        pytest.importorskip("obstore")
    with pytest.raises(KillsafeError) as caught:
        storage.open(url)
    assert "\n" not in str(caught.value)


def test_object_store_options_are_refused_for_local_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidKey, match="object-store URLs only"):
        storage.open(tmp_path, part_size=8 * MiB)


def test_importing_storage_does_not_import_the_object_store_client() -> None:
    code = "import sys, killsafe, killsafe.storage; print('obstore' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


_SLOW_WRITER = """
import sys
from killsafe import storage
url = sys.argv[1]
backend = storage.open(url, **({"part_size": 5 << 20} if url.startswith("s3") else {}))
with backend.open_write("victim") as sink:
    for n in range(64):
        sink.write(bytes([n]) * (1 << 20))
        print(n, flush=True)
"""


def test_a_writer_killed_mid_object_leaves_no_object(backend: Backend) -> None:
    if isinstance(backend, MemoryBackend):
        pytest.skip("a memory area lives in one process")
    rng = random.Random(18)
    for _ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", _SLOW_WRITER, backend.url], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None
        stop_after = rng.randrange(1, 40)
        for line in writer.stdout:
            if int(line) >= stop_after:
                break
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert list(backend.list("")) == []
    write_bytes(backend, "victim", b"written whole afterwards")
    assert [info.key for info in backend.list("")] == ["victim"]


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [
        ("http://127.0.0.1:8333", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000", True),
        ("https://127.0.0.1:8333", False),
        ("http://minio.example.com:9000", False),
        ("", False),
    ],
)
def test_plain_http_is_allowed_for_loopback_endpoints_only(
    endpoint: str, allowed: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("obstore")
    from killsafe.storage import objects

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert objects._allow_http("s3://bucket/prefix") is allowed


@pytest.mark.parametrize(
    "content",
    [
        b"garbage\n[default]\nregion = us-east-1\n",  # no section header first
        b"[default]\nregion = us-east-1\n=x\n",  # a line that is no option
        "[default]\nregion = us-east-1\n".encode("utf-16"),  # saved by a Windows editor
    ],
    ids=["no-section", "no-option", "utf-16"],
)
def test_a_malformed_aws_config_file_fails_in_one_line(
    content: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("obstore")
    config = tmp_path / "config"
    config.write_bytes(content)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError) as caught:
        storage.open("s3://bucket/prefix")
    message = str(caught.value)
    assert str(config) in message and "\n" not in message
