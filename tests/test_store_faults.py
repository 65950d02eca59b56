"""The store under faults: a full disk, odd paths, a killed fork writer, damaged checkpoints.

Full disks are real: a small tmpfs when this process may mount one, and
``RLIMIT_FSIZE`` in a child process (writes then fail with ``EFBIG``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import SmallDisk, damage, mounted_small_disk, one_line, open_fds

from killsafe.errors import ConfigError, KillsafeError, SaveFailed
from killsafe.format import verify_checkpoint
from killsafe.store import CheckpointStore


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    yield from mounted_small_disk(tmp_path)


# ------------------------------------------------------------ a full disk


def test_a_full_disk_at_the_first_lock_write_fails_cleanly_and_the_next_save_works(
    small_disk: SmallDisk,
) -> None:
    directory = small_disk.mount / "ckpts"
    directory.mkdir()
    store = CheckpointStore(directory)
    small_disk.fill()
    before = open_fds()
    with pytest.raises(SaveFailed) as caught:
        store.save({"n": 1}, 1)
    text = one_line(caught.value)
    assert ".lock" in text and "free" in text, text
    assert open_fds() == before  # no descriptor leaked
    small_disk.free()
    store.save({"n": 1}, 1)  # the lock is not held by a ghost of the failed try
    store.close()
    assert CheckpointStore(directory).load()["n"] == 1


FSIZE_SCRIPT = textwrap.dedent(
    """
    import os, resource, signal, sys
    from killsafe.errors import SaveFailed
    from killsafe.store import CheckpointStore
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    store = CheckpointStore(sys.argv[1])
    fds = sorted(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
    try:
        store.save({"n": 1}, 1)
    except SaveFailed as exc:
        print("SaveFailed", exc)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print("fds", sorted(os.listdir("/proc/self/fd")) == fds)
    store.save({"n": 2}, 2)
    store.close()
    print("saved", [info.step for info in CheckpointStore(sys.argv[1]).list()])
    """
)


def test_a_file_size_limit_at_the_first_lock_write_fails_cleanly_then_saves(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(tmp_path / "ckpts")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("SaveFailed") and ".lock" in lines[0], lines
    assert lines[1:] == ["fds True", "saved [2]"], lines


def test_a_full_disk_while_writing_a_checkpoint_names_the_free_space(
    small_disk: SmallDisk,
) -> None:
    store = CheckpointStore(small_disk.mount / "ckpts")
    store.save({"n": 1}, 1)
    with pytest.raises(SaveFailed) as caught:
        store.save({"blob": os.urandom(2 << 20)}, 2)
    text = one_line(caught.value)
    assert "free" in text and "step 2" in text, text
    store.close()
    assert [info.step for info in CheckpointStore(store.directory).list()] == [1]


# ------------------------------------------------------------ odd paths


def test_a_lock_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / ".lock").mkdir()
    store = CheckpointStore(tmp_path)
    before = open_fds()
    with pytest.raises(ConfigError, match="is a directory") as caught:
        store.save({"n": 1}, 1)
    assert ".lock" in one_line(caught.value)
    assert open_fds() == before


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    store_dir = tmp_path / "ckpts"
    store_dir.mkdir()
    (store_dir / ".lock").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        CheckpointStore(store_dir).save({"n": 1}, 1)
    assert target.read_text() == "keep"


def test_a_store_under_proc_is_a_typed_error(tmp_path: Path) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    for where in ("/proc/killsafe-test/ckpts", "/proc/self/ckpts"):
        with pytest.raises(KillsafeError) as caught:
            CheckpointStore(where).save({"n": 1}, 1)
        assert where in one_line(caught.value)


# ------------------------------------------------------------ a killed fork writer

FORK_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from killsafe.store import CheckpointStore
    store = CheckpointStore(sys.argv[1], keep_last=2, snapshot="fork")
    state = {"weights": np.ones(4 << 20, dtype=np.float64)}  # 32 MiB: the child writes a while
    first = step = int(sys.argv[2]) * 1000
    while True:
        step += 1
        pending = store.save_async(state, step)
        if step == first + 2:
            print("writing", flush=True)
        pending.wait()
    """
)


def test_a_restart_right_after_killing_a_fork_writer_always_gets_the_lock(
    tmp_path: Path,
) -> None:
    pytest.importorskip("numpy")
    if not hasattr(os, "fork"):
        pytest.skip("the fork snapshot needs fork()")
    directory = tmp_path / "ckpts"
    saved = []
    for attempt in range(20):
        writer = subprocess.Popen(
            [sys.executable, "-c", FORK_WRITER, str(directory), str(attempt)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        restart = CheckpointStore(directory)
        # StoreLocked naming the dead pid, before the fix: its child held the lock.
        saved.append(restart.save({"attempt": attempt}, 1_000_000 + attempt).step)
        restart.close()
    assert saved == [1_000_000 + i for i in range(20)]
    # The writer's keep_last=2 pruned the older restarts' checkpoints: the last one stays.
    assert CheckpointStore(directory).load(1_000_019)["attempt"] == 19


def test_a_forked_child_never_holds_the_parents_lock(tmp_path: Path) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("needs fork()")
    store = CheckpointStore(tmp_path / "ckpts")
    store.save({"n": 1}, 1)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        os.write(write_end, b"1" if store._lock_fd is None else b"0")
        os._exit(0)
    os.close(write_end)
    closed_in_child = os.read(read_end, 1)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert closed_in_child == b"1"
    assert store._lock_fd is not None  # the parent keeps it
    store.save({"n": 2}, 2)
    store.close()


# ------------------------------------------------------------ damaged checkpoints


def test_a_save_at_the_step_of_a_damaged_checkpoint_goes_beside_it(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    store = CheckpointStore(tmp_path, keep_last=3)
    first = store.save({"w": np.arange(8.0)}, 5)
    damaged = damage(first.path)
    second = store.save({"w": np.arange(8.0) + 1}, 5)
    assert second.path != first.path and second.path.name.startswith(first.path.name)
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == damaged
    verify_checkpoint(second.path)
    assert store.latest() == second
    assert store.load()["w"][0] == 1.0
    store.close()


def test_a_directory_with_an_unreadable_manifest_is_never_replaced(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    first = store.save({"n": 1}, 7)
    (first.path / "manifest.json").write_bytes(b"{ not json")
    info = store.save({"n": 2}, 7)
    assert info.path != first.path
    assert (first.path / "manifest.json").read_bytes() == b"{ not json"
    assert store.load(7)["n"] == 2
    store.close()
