"""Writes past the page cache: exact bytes, the fallbacks, errors."""

from __future__ import annotations

import array
import errno
import os
from pathlib import Path

import pytest

from killsafe import directio

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")

BOUNCE = directio._BOUNCE_BYTES


def _pieces(sizes: list[int], writable: bool = False) -> list[memoryview]:
    """Read-only buffers are copied in GIL-holding slices, writable ones by memmove."""
    return [
        memoryview(bytearray(os.urandom(size)) if writable else os.urandom(size)) for size in sizes
    ]


def _write(path: Path, buffers: list[memoryview]) -> bool:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return directio.write_direct(fd, buffers)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "sizes",
    [[], [1], [4096], [BOUNCE], [BOUNCE + 1], [17, BOUNCE - 5, 3 * 4096 + 9, 0, 2 * BOUNCE + 123]],
)
@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
def test_the_file_holds_exactly_the_bytes(tmp_path: Path, sizes: list[int], writable: bool) -> None:
    buffers = _pieces(sizes, writable)
    path = tmp_path / "data"
    assert _write(path, buffers)
    assert path.read_bytes() == b"".join(bytes(b) for b in buffers)


def test_only_writable_contiguous_buffers_are_copied_by_address() -> None:
    data = bytearray(b"abcdefgh")
    assert directio._address(memoryview(data)) is not None
    assert directio._address(memoryview(bytes(data))) is None
    assert directio._address(memoryview(data)[::2]) is None
    assert directio._address(memoryview(bytearray())) is None


def test_buffers_of_any_item_format_are_written_as_bytes(tmp_path: Path) -> None:
    doubles = array.array("d", [1.5, -2.0, 3.25])
    path = tmp_path / "data"
    assert _write(path, [memoryview(doubles)])
    assert path.read_bytes() == doubles.tobytes()


def test_the_descriptor_is_left_without_o_direct(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "data", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert directio.write_direct(fd, _pieces([10]))
        os.write(fd, b"tail")  # unaligned: fails with EINVAL if O_DIRECT stayed on
    finally:
        os.close(fd)
    assert (tmp_path / "data").stat().st_size == 14


def test_switched_off_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILLSAFE_DIRECT_IO", "0")
    path = tmp_path / "data"
    assert not _write(path, _pieces([5000]))
    assert path.read_bytes() == b""


def test_a_filesystem_that_rejects_the_writes_gets_an_empty_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, data: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(directio.os, "write", refuse)
    fd = os.open(tmp_path / "data", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert not directio.write_direct(fd, _pieces([BOUNCE + 10]))
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(fd)
    assert (tmp_path / "data").stat().st_size == 0


def test_a_failure_after_bytes_were_written_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    calls = []

    def full_after_one(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(directio.os, "write", full_after_one)
    with pytest.raises(OSError) as caught:
        _write(tmp_path / "data", _pieces([BOUNCE * 2]))
    assert caught.value.errno == errno.ENOSPC


def test_bounce_buffers_are_reused_and_bounded(tmp_path: Path) -> None:
    for index in range(5):
        assert _write(tmp_path / f"data-{index}", _pieces([100]))
    assert 1 <= len(directio._pool) <= directio._POOL_LIMIT


def test_a_checkpoint_is_the_same_file_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    from killsafe import format as fmt
    from killsafe.store import CheckpointStore

    state = {"w": torch.arange(1_000_003, dtype=torch.float32), "b": torch.ones(7)}
    files = []
    for setting in ("1", "0"):
        monkeypatch.setenv("KILLSAFE_DIRECT_IO", setting)
        store = CheckpointStore(tmp_path / f"store-{setting}")
        info = store.save(state, 1)
        store.close()
        files.append((info.path / fmt.TENSOR_FILE).read_bytes())
        assert torch.equal(CheckpointStore(tmp_path / f"store-{setting}").load()["w"], state["w"])
    assert files[0] == files[1]
