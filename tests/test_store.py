"""CheckpointStore: references, names, retention on disk, locks, corruption, full disk."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from killsafe import format as fmt
from killsafe.errors import (
    CheckpointExists,
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    InvalidName,
    StoreLocked,
)
from killsafe.store import CheckpointStore, sanitize_name


def state(n: int) -> dict[str, object]:
    return {"w": torch.full((16,), float(n)), "n": n}


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    s = CheckpointStore(tmp_path / "ckpts")
    yield s
    s.close()


def test_save_list_latest_load(store: CheckpointStore) -> None:
    for step in (5, 10, 100, 20):
        info = store.save(state(step), step, metrics={"loss": 1 / step}, reason="periodic")
        assert info.step == step and info.reason == "periodic" and info.path.is_dir()
    assert [i.step for i in store.list()] == [5, 10, 20, 100]
    assert store.latest().step == 100
    assert store.load()["n"] == 100
    assert store.load(20)["n"] == 20
    assert store.load("20")["n"] == 20
    assert store.load(store.list()[0])["n"] == 5
    assert store.load(str(store.list()[1].path))["n"] == 10
    assert store.get(10).metrics == {"loss": 0.1}


def test_nothing_to_load(tmp_path: Path) -> None:
    empty = CheckpointStore(tmp_path / "missing")
    assert empty.list() == [] and empty.latest() is None
    with pytest.raises(CheckpointNotFound):
        empty.load()
    with pytest.raises(CheckpointNotFound):
        empty.load(3)


def test_a_step_with_an_unnamed_checkpoint_is_never_overwritten(store: CheckpointStore) -> None:
    store.save(state(1), 1)
    with pytest.raises(CheckpointExists, match="step 1"):
        store.save(state(2), 1)
    assert store.load(1)["n"] == 1
    store.save(state(3), 1, name="milestone")
    assert store.load("milestone")["n"] == 3
    assert store.load(1)["n"] == 1
    with pytest.raises(CheckpointExists, match="milestone"):
        store.save(state(4), 2, name="milestone")
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "../up", "a/b", "a\\b", ".hidden", "x" * 65, "123", "latest", "best", "\0", 5],
)
def test_bad_names_are_refused(store: CheckpointStore, bad: object) -> None:
    with pytest.raises(InvalidName):
        store.save(state(1), 1, name=bad)  # type: ignore[arg-type]
    assert store.list() == []


def test_names_are_sanitized() -> None:
    assert sanitize_name("my best run!") == "my-best-run"
    assert sanitize_name("epoch_3.v2") == "epoch_3.v2"


@pytest.mark.parametrize("step", [-1, 1.5, "3", True, None])
def test_bad_steps_are_refused(store: CheckpointStore, step: object) -> None:
    with pytest.raises(ConfigError):
        store.save(state(1), step)  # type: ignore[arg-type]


def test_retention_keeps_last_best_and_named(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, best=("loss", "min"))
    losses = {1: 0.9, 2: 0.1, 3: 0.5, 4: 0.6, 5: 0.7, 6: 0.8}
    for step, loss in losses.items():
        store.save(state(step), step, metrics={"loss": loss})
        if step == 3:
            store.save(state(step), step, name="keep-me", metrics={"loss": 0.95})
    assert [(i.step, i.name) for i in store.list()] == [
        (2, None),
        (3, "keep-me"),
        (5, None),
        (6, None),
    ]
    assert store.best().step == 2
    store.close()


def test_prune_dry_run_and_delete(tmp_path: Path) -> None:
    writer = CheckpointStore(tmp_path)
    for step in range(1, 6):
        writer.save(state(step), step)
    writer.close()
    pruning = CheckpointStore(tmp_path, keep_last=2)
    assert [i.step for i in pruning.prune(dry_run=True)] == [1, 2, 3]
    assert len(pruning.list()) == 5
    assert [i.step for i in pruning.prune()] == [1, 2, 3]
    assert [i.step for i in pruning.list()] == [4, 5]
    with pytest.raises(ConfigError, match="force=True"):
        pruning.delete("latest")
    pruning.delete(4)
    pruning.delete(5, force=True)
    assert pruning.list() == []
    pruning.close()


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_latest_skips_a_corrupt_checkpoint_and_never_deletes_it(
    store: CheckpointStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.save(state(1), 1)
    newest = store.save(state(2), 2)
    flip_last_byte(newest.path / fmt.TENSOR_FILE)
    with caplog.at_level(logging.WARNING, logger="killsafe.store"):
        assert store.latest().step == 1
        assert store.load()["n"] == 1
    assert "corrupt" in caplog.text
    with pytest.raises(CorruptCheckpoint):
        store.verify(2)
    with pytest.raises(CorruptCheckpoint):
        store.load(2)
    store.save(state(3), 3)
    assert newest.path.exists()


def test_partial_checkpoint_directory_is_skipped(store: CheckpointStore) -> None:
    store.save(state(1), 1)
    (store.directory / "step-000009").mkdir()
    (store.directory / ".tmp-step-000010-1-abc").mkdir()
    assert [i.step for i in store.list()] == [1]
    assert store.load()["n"] == 1
    with pytest.raises(CheckpointNotFound, match="not a checkpoint"):
        store.load(store.directory / "step-000009")


def test_leftover_temporary_directories_are_swept_when_writing_starts(tmp_path: Path) -> None:
    leftover = tmp_path / ".tmp-step-000003-999-deadbeef"
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    reader = CheckpointStore(tmp_path)
    assert reader.list() == [] and leftover.exists()
    reader.save(state(1), 1)
    assert not leftover.exists()
    reader.close()


def test_subtree_and_mmap_loading(store: CheckpointStore) -> None:
    store.save({"model": {"w": torch.ones(4)}, "opt": {"m": torch.zeros(4)}}, 1)
    assert set(store.load(subtree="model")) == {"w"}
    mapped = store.load(mmap=True)
    mapped["model"]["w"].mul_(3)
    assert torch.equal(store.load()["model"]["w"], torch.ones(4))


def test_compressed_store(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, compression="zstd")
    store.save({"z": torch.zeros(50_000)}, 1)
    assert (store.latest().path / fmt.TENSOR_FILE_ZSTD).exists()
    assert torch.equal(store.load()["z"], torch.zeros(50_000))
    store.close()


def test_store_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError):
        CheckpointStore(tmp_path / "file")


# ------------------------------------------------------------ processes

HOLD = textwrap.dedent(
    """
    import os, sys
    from killsafe.store import CheckpointStore
    from killsafe.errors import StoreLocked
    directory, go = sys.argv[1], sys.argv[2]
    store = CheckpointStore(directory)
    while not os.path.exists(go):
        pass
    try:
        store.save({"pid": os.getpid()}, os.getpid())
        print("won", os.getpid(), flush=True)
    except StoreLocked as exc:
        print("locked", exc, flush=True)
    sys.stdin.readline()
    """
)


def test_two_processes_race_for_the_lock(tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD, str(tmp_path / "ckpts"), str(go)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    go.write_text("")
    lines = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
    for p in procs:
        p.communicate("\n", timeout=30)
    winners = [line for line in lines if line.startswith("won")]
    losers = [line for line in lines if line.startswith("locked")]
    assert len(winners) == 1 and len(losers) == 1, lines
    winner_pid = winners[0].split()[1]
    assert f"pid {winner_pid} on host {os.uname().nodename}" in losers[0]
    assert [i.step for i in CheckpointStore(tmp_path / "ckpts").list()] == [int(winner_pid)]


def test_a_second_store_in_the_same_process_is_locked_out(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path)
    first.save(state(1), 1)
    second = CheckpointStore(tmp_path)
    with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
        second.save(state(2), 2)
    assert second.load()["n"] == 1  # readers need no lock
    first.close()
    second.save(state(2), 2)
    second.close()


def test_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    code = (
        "import sys, os, signal; from killsafe.store import CheckpointStore; "
        "s = CheckpointStore(sys.argv[1]); s.save({'a': 1}, 1); "
        "print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL
    dead_pid = int(proc.stdout.strip())
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == dead_pid
    store = CheckpointStore(tmp_path)
    store.save({"a": 2}, 2)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    store.close()


FULL_DISK = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    from killsafe.store import CheckpointStore
    from killsafe.errors import SaveFailed
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    store = CheckpointStore(sys.argv[1])
    store.save({"small": b"x" * 1000}, 1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    try:
        store.save({"big": os.urandom(1 << 20)}, 2)
        print(json.dumps({"error": None}))
    except SaveFailed as exc:
        print(json.dumps({"error": str(exc)}))
    """
)


def test_a_full_disk_fails_clearly_and_leaves_earlier_checkpoints(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error and "step 2" in error and "disk" in error and "\n" not in error
    store = CheckpointStore(tmp_path)
    assert [i.step for i in store.list()] == [1]
    assert store.load()["small"] == b"x" * 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_staged_commit_from_a_background_thread_with_a_snapshot(store: CheckpointStore) -> None:
    import threading

    from killsafe.state import capture

    weights = torch.ones(8)
    encoded = fmt.encode(capture({"w": weights}), copy=True)
    weights.add_(1)  # the live tensor moves on; the snapshot must not
    staging = store.begin(7, name="async")
    result: list[object] = []

    def background() -> None:
        store.write(staging, encoded, metrics={"loss": 0.5}, reason="periodic")
        result.append(store.commit(staging))

    thread = threading.Thread(target=background)
    thread.start()
    thread.join()
    info = result[0]
    assert info.step == 7 and info.name == "async" and info.metrics == {"loss": 0.5}
    assert torch.equal(store.load("async")["w"], torch.ones(8))


def test_abort_leaves_nothing_behind(store: CheckpointStore) -> None:
    staging = store.begin(3)
    store.abort(staging)
    assert store.list() == []
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".tmp-")]
