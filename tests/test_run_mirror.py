"""``Run(mirror=...)``: checkpoints committed locally, uploaded in the background, resumed
from the mirror on a machine whose run directory is empty."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mirror_helpers import wait_for_upload

import killsafe
from killsafe import storage
from killsafe.errors import ConfigError, SaveFailed


def quiet(directory: Path, **options: Any) -> killsafe.Run:
    return killsafe.Run(directory, progress=False, keyboard=False, report=False, **options)


def walk(
    directory: Path,
    mirror: str | None,
    total: int,
    *,
    stop_at: int | None = None,
    each_upload: bool = False,
    **options: Any,
):
    """A random walk whose every step draws from a tracked generator; returns (run, positions).

    ``each_upload``: saves are synchronous and the step after each save waits
    until the mirror has it, so no checkpoint is superseded in the upload queue.
    """
    rng = np.random.default_rng(0)
    positions: list[float] = []
    if each_upload:
        options["async_save"] = False
    with quiet(directory, total_steps=total, mirror=mirror, **options) as run:
        run.track(rng=rng, positions=positions)
        for step in run.steps():
            if each_upload and mirror and step and step % options["save_every_steps"] == 0:
                wait_for_upload(mirror, step)
            positions.append(float(rng.normal()) + (positions[-1] if positions else 0.0))
            run.log(position=positions[-1])
            if stop_at is not None and step + 1 == stop_at:
                run.stop("test")
    return run, positions


def memory_url() -> str:
    return f"memory://mirror-{uuid.uuid4().hex[:8]}/exp"


def test_every_local_checkpoint_reaches_the_mirror_with_the_run_files(tmp_path: Path) -> None:
    url = memory_url()
    run, _ = walk(
        tmp_path / "run", url, 30, save_every_steps=10, mirror_keep_last=None, each_upload=True
    )
    assert run.finished
    remote = killsafe.CheckpointStore(url)
    assert [info.step for info in remote.list()] == [10, 20, 30]
    assert remote.verify("latest").step == 30
    files = storage.open(url)
    run_json = json.loads(bytes(storage.read_bytes(files, "run/run.json")))
    assert run_json["sessions"][-1]["end_step"] == 30
    assert run_json["config"]["mirror"] == url
    history = bytes(storage.read_bytes(files, "run/history.jsonl")).decode().splitlines()
    assert len(history) == 30


def test_the_mirror_keeps_its_own_number_of_checkpoints(tmp_path: Path) -> None:
    url = memory_url()
    walk(
        tmp_path / "run",
        url,
        50,
        save_every_steps=10,
        keep_last=1,
        mirror_keep_last=3,
        each_upload=True,
    )
    assert [i.step for i in killsafe.CheckpointStore(tmp_path / "run/checkpoints").list()] == [50]
    assert [i.step for i in killsafe.CheckpointStore(url).list()] == [30, 40, 50]


def test_an_empty_run_directory_resumes_from_the_mirror_exactly(tmp_path: Path) -> None:
    url = memory_url()
    _, reference = walk(tmp_path / "reference", memory_url(), 40, save_every_steps=10)
    stopped, _ = walk(tmp_path / "first-machine", url, 40, save_every_steps=10, stop_at=17)
    assert stopped.exit_code == 75
    assert killsafe.CheckpointStore(url).latest().step == 17  # the stop's checkpoint went up
    run, positions = walk(tmp_path / "fresh-machine", url, 40, save_every_steps=10)
    assert run.finished and positions == reference
    sessions = json.loads((tmp_path / "fresh-machine/run.json").read_text())["sessions"]
    assert [(s["start_step"], s["end_step"]) for s in sessions] == [(0, 17), (17, 40)]
    history = (tmp_path / "fresh-machine/history.jsonl").read_text().splitlines()
    assert len(history) == 40  # the first machine's history came down with the checkpoint


def test_a_newer_local_checkpoint_is_kept_and_uploaded_at_the_next_start(tmp_path: Path) -> None:
    url = memory_url()
    walk(tmp_path / "run", url, 20, save_every_steps=10)
    walk(tmp_path / "run", None, 30, save_every_steps=10)  # a session whose upload never ran
    assert killsafe.CheckpointStore(url).latest().step == 20
    walk(tmp_path / "run", url, 30, save_every_steps=10)
    assert killsafe.CheckpointStore(url).latest().step == 30


def test_bad_mirror_options_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mirror_keep_last=0"):
        quiet(tmp_path, mirror=memory_url(), mirror_keep_last=0)
    with pytest.raises(ConfigError, match="mirror_grace=-1"):
        quiet(tmp_path, mirror=memory_url(), mirror_grace=-1)


def test_the_mirror_flag_reaches_the_run(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    killsafe.add_arguments(parser)
    args = parser.parse_args(["--dir", str(tmp_path), "--mirror", "s3://bucket/exp"])
    assert killsafe.Run.from_args(args)._config.mirror == "s3://bucket/exp"


SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import killsafe

    directory, mirror = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    with killsafe.Run(directory, total_steps=100_000, save_every_steps=50, mirror=mirror,
                      progress_every=3600, keyboard=False, report=False) as run:
        run.track(rng=rng, weights=np.zeros(4096))
        for step in run.steps():
            run.state["weights"] += rng.normal(size=4096)
            if step == 20:
                print("ready", flush=True)
            time.sleep(0.002)
    print("end", run.step, flush=True)
    sys.exit(run.exit_code)
    """
)


def test_a_sigterm_waits_for_the_emergency_upload_to_a_real_s3_server(
    tmp_path: Path, s3_url: str
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "node-a"), s3_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 75, err[-2000:]
    stopped_at = int(out.split()[-1])
    assert f"mirror {s3_url}: newest step {stopped_at}" in err
    remote = killsafe.CheckpointStore(s3_url)
    assert remote.verify("latest").step == stopped_at
    local = killsafe.CheckpointStore(tmp_path / "node-a/checkpoints").load("latest")
    # A second machine with an empty directory starts from the mirror's checkpoint.
    with quiet(tmp_path / "node-b", total_steps=stopped_at, mirror=s3_url) as run:
        restored = run.track(rng=np.random.default_rng(1), weights=np.zeros(4096))
        assert run.step == stopped_at
    np.testing.assert_array_equal(restored["weights"], local["weights"])


def test_an_upload_gives_way_while_the_loop_takes_a_snapshot(tmp_path: Path) -> None:
    import threading

    from killsafe.run.mirror import Mirror

    local = killsafe.CheckpointStore(tmp_path / "local")
    local.save({"w": np.zeros(1 << 20)}, 1)
    mirror = Mirror(killsafe.CheckpointStore(memory_url()), local, tmp_path)
    paced: list[int] = []
    mirror.remote.import_from(local, "latest", pace=lambda: paced.append(1))
    assert paced  # asked before every chunk it copies
    mirror.hold()
    waiting = threading.Thread(target=mirror._pace)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # held while the snapshot is taken
    mirror.release()
    waiting.join(10)
    assert not waiting.is_alive()
    mirror.close()
    local.close()


def test_an_upload_waits_for_the_local_write_of_the_save_in_flight(tmp_path: Path) -> None:
    import threading

    from killsafe.run.mirror import Mirror
    from killsafe.saver import PendingSave

    local = killsafe.CheckpointStore(tmp_path / "local")
    mirror = Mirror(killsafe.CheckpointStore(memory_url()), local, tmp_path)
    writing = PendingSave(2, None, "policy")
    mirror.hold()
    mirror.release(after=writing)  # the snapshot is taken; its write goes on
    waiting = threading.Thread(target=mirror._pace)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # the local checkpoint is written first
    writing._finish(None, SaveFailed("disk full"))  # finished, even by failing, lets it go
    waiting.join(10)
    assert not waiting.is_alive()
    assert writing.error is not None and not writing._reported  # the loop still collects it
    mirror._pace()  # nothing in flight any more: returns at once
    mirror.close()
    local.close()


def test_at_the_end_an_older_unnamed_upload_gives_way_to_the_newest(tmp_path: Path) -> None:
    import threading

    from killsafe.run.mirror import Mirror

    local = killsafe.CheckpointStore(tmp_path / "local")
    older = local.save({"w": np.zeros(1 << 20)}, 1)
    newest = local.save({"w": np.ones(1 << 20)}, 2)
    remote = killsafe.CheckpointStore(memory_url())
    mirror = Mirror(remote, local, tmp_path)
    mirror.hold()  # the upload of step 1 starts and waits before its first chunk
    mirror.submit(older)
    mirror.submit(newest)  # arrives while step 1 is being uploaded
    summary: list[str] = []
    draining = threading.Thread(target=lambda: summary.append(mirror.drain(stopping=False)))
    draining.start()
    while not mirror._draining:
        time.sleep(0.01)
    mirror.release()
    draining.join(30)
    assert summary == [f"killsafe: mirror {mirror.url}: newest step 2, 1 uploaded this session"]
    assert [info.step for info in remote.list()] == [2]
    mirror.close()
    local.close()


def test_during_the_session_every_upload_finishes_however_many_queue_up(tmp_path: Path) -> None:
    from killsafe.run.mirror import Mirror

    local = killsafe.CheckpointStore(tmp_path / "local")
    infos = [local.save({"w": np.full(1 << 18, step)}, step) for step in (1, 2)]
    remote = killsafe.CheckpointStore(memory_url())
    mirror = Mirror(remote, local, tmp_path)
    mirror.hold()
    mirror.submit(infos[0])
    while mirror._uploading is None:  # step 1's upload started
        time.sleep(0.01)
    mirror.submit(infos[1])
    mirror.release()
    deadline = time.monotonic() + 60
    while len(remote.list()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [info.step for info in remote.list()] == [1, 2]
    assert mirror.drain(stopping=False).endswith("newest step 2, 2 uploaded this session")
    mirror.close()
    local.close()


def test_an_upload_failing_with_an_unexpected_error_leaves_the_worker_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from killsafe.run.mirror import Mirror

    local = killsafe.CheckpointStore(tmp_path / "local")
    infos = [local.save({"w": np.full(4, step)}, step) for step in (1, 2)]
    remote = killsafe.CheckpointStore(memory_url())
    mirror = Mirror(remote, local, tmp_path)
    real_import = remote.import_from
    calls = []

    def import_once_failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")  # a local read failing, not ours
        return real_import(*args, **kwargs)

    monkeypatch.setattr(remote, "import_from", import_once_failing)
    mirror.submit(infos[0])
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    mirror.submit(infos[1])  # the worker still takes it
    summary = mirror.drain(stopping=False)  # returned: nothing hangs
    assert [info.step for info in remote.list()] == [2]
    assert "newest step 2" in summary
    mirror.close()
    local.close()


class _CommitBlocks(storage.MemoryBackend):
    """A memory area whose checkpoint commits (manifest puts) hang until ``go`` is set,
    as a mirror that stopped answering does."""

    def __init__(self, name: str) -> None:
        import threading

        super().__init__(name)
        self.entered = threading.Event()
        self.go = threading.Event()

    def create_if_absent(self, key: str, data: bytes) -> None:
        if key.endswith("manifest.json"):
            self.entered.set()
            self.go.wait()
        super().create_if_absent(key, data)


def test_a_stopping_run_leaves_a_hung_upload_after_its_grace(tmp_path: Path) -> None:
    import threading

    from killsafe.run.mirror import Mirror

    local = killsafe.CheckpointStore(tmp_path / "local")
    info = local.save({"w": np.zeros(4)}, 1)
    backend = _CommitBlocks(f"hung-{uuid.uuid4().hex[:8]}")
    mirror = Mirror(killsafe.CheckpointStore(backend), local, tmp_path, grace=0.1)
    mirror.remote.acquire()
    mirror.submit(info)
    assert backend.entered.wait(30)  # the upload commits, holding the store, and hangs
    summary: list[str] = []

    def stop() -> None:
        summary.append(mirror.drain(stopping=True))
        mirror.close()

    stopping = threading.Thread(target=stop)
    stopping.start()
    stopping.join(10)
    try:
        assert not stopping.is_alive()  # SIGTERM's path ends within its grace, not the upload's
        assert "uploads still running after 0.1 s were left" in summary[0]
    finally:
        backend.go.set()
        stopping.join(30)
        local.close()


class _WritesBlock(storage.MemoryBackend):
    """A memory area whose writes hang until ``go`` is set (a network gone at SIGTERM)."""

    def __init__(self, name: str) -> None:
        import threading

        super().__init__(name)
        self.go = threading.Event()

    def open_write(self, key: str) -> storage.Sink:
        self.go.wait()
        return super().open_write(key)


def test_a_stopping_run_uploads_its_last_run_files_within_its_grace(tmp_path: Path) -> None:
    import threading

    from killsafe.run.mirror import Mirror

    local = killsafe.CheckpointStore(tmp_path / "local")
    url = memory_url()
    mirror = Mirror(killsafe.CheckpointStore(url), local, tmp_path, grace=0.1)
    mirror.submit(local.save({"w": np.zeros(4)}, 1))
    wait_for_upload(url, 1)
    assert mirror._wait_idle(None)  # every upload done; then the network goes
    (tmp_path / "run.json").write_text("{}")
    hung = _WritesBlock(f"gone-{uuid.uuid4().hex[:8]}")
    mirror._files = hung
    stopping = threading.Thread(target=lambda: (mirror.drain(stopping=True), mirror.close()))
    stopping.start()
    stopping.join(10)
    try:
        assert not stopping.is_alive()  # SIGTERM's path ends within its grace
    finally:
        hung.go.set()
        stopping.join(30)
        local.close()


def test_a_run_started_over_starts_its_mirror_over_too(tmp_path: Path) -> None:
    url = memory_url()
    options: dict[str, Any] = {"save_every_steps": 10, "mirror_keep_last": None}
    walk(tmp_path / "old-node", url, 30, each_upload=True, **options)
    with pytest.raises(ConfigError, match=r"resume='never' but the mirror"):
        walk(tmp_path / "new-node", url, 20, resume="never", **options)
    run, _ = walk(
        tmp_path / "run", url, 20, each_upload=True, resume="never", clear=True, **options
    )
    assert run.finished
    assert [info.step for info in killsafe.CheckpointStore(url).list()] == [10, 20]
    resumed, _ = walk(tmp_path / "fresh-node", url, 20, **options)  # not the old run's step 30
    assert resumed.resumed_from is not None and resumed.resumed_from.step == 20


def test_a_run_resumed_from_an_older_checkpoint_replaces_the_abandoned_ones_in_the_mirror(
    tmp_path: Path,
) -> None:
    url = memory_url()
    options: dict[str, Any] = {"save_every_steps": 10, "mirror_keep_last": None}
    walk(tmp_path / "run", url, 30, each_upload=True, **options)
    walk(tmp_path / "run", url, 30, resume=10, **options)  # rolled back: 20 and 30 saved again
    local = {
        i.step: i.created for i in killsafe.CheckpointStore(tmp_path / "run/checkpoints").list()
    }
    mirrored = {i.step: i.created for i in killsafe.CheckpointStore(url).list()}
    assert mirrored[30] == local[30]  # not the abandoned continuation's step 30
