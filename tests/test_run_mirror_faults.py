"""A run's mirror when things go wrong: a server that fails mid-upload, a second live run
on the same mirror (refused at its start), the same run resumed on a new node while the
lost node's lease lives on, and SIGKILL at random moments during uploads to a real S3
server."""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mirror_helpers import wait_for_upload

import killsafe
import killsafe.store
from killsafe import storage
from killsafe.errors import StoreLocked
from killsafe.lease import Lease
from killsafe.storage.faults import FaultyBackend


def memory_url() -> str:
    return f"memory://mirror-faults-{uuid.uuid4().hex[:8]}/exp"


def mirror_through(
    monkeypatch: pytest.MonkeyPatch, url: str, backend: storage.Backend
) -> Callable[[storage.Backend], None]:
    """Open the run's mirror at ``url`` on ``backend``; returns how to switch backends."""
    real = killsafe.store.CheckpointStore
    current = {"backend": backend}

    def store(location: Any, **options: Any) -> Any:
        return real(current["backend"] if location == url else location, **options)

    monkeypatch.setattr(killsafe.store, "CheckpointStore", store)
    return lambda replacement: current.update(backend=replacement)


def counting_run(
    directory: Path, url: str, total: int, on_step: Callable[[int], None] | None = None
) -> killsafe.Run:
    """A run saving every 10 steps whose state records the steps it did.

    Its saves are synchronous, so that each checkpoint is handed to the mirror
    before the next step (a test waiting in a step waits for uploads, not saves).
    """
    with killsafe.Run(
        directory,
        total_steps=total,
        save_every_steps=10,
        mirror=url,
        mirror_keep_last=None,
        async_save=False,
        progress=False,
        keyboard=False,
        report=False,
    ) as run:
        # An array as well: the checkpoint has a data file whatever else is imported.
        done = run.track(done=[], weights=np.zeros(64))["done"]
        for step in run.steps():
            if on_step is not None:
                on_step(step)
            done.append(step)
    return run


def wait_for(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (what the background uploads do); fails after a minute."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, "the mirror's uploads did not get there"
        time.sleep(0.01)


def steps_in(location: Any) -> list[int]:
    return [info.step for info in killsafe.CheckpointStore(location).list()]


def mirror_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "killsafe: mirror " in r.getMessage()]


def test_a_mirror_failing_mid_upload_costs_the_run_nothing_and_the_next_save_uploads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = memory_url()
    faulty = FaultyBackend(storage.open(url))
    switch = mirror_through(monkeypatch, url, faulty)

    def failed(step: int) -> bool:
        return any(f"upload of step {step} " in r.getMessage() for r in caplog.records)

    def faults(step: int) -> None:
        # The uploads run behind the loop: each fault waits for the upload before it.
        if step == 5:
            faulty.fail_writes(1, after_bytes=10, keys="step-")  # step 10 dies mid-write
        if step == 15:
            wait_for(lambda: failed(10))
        if step == 25:
            wait_for(lambda: steps_in(url) == [20])
            faulty.drop_writes(1, after_bytes=10, keys="step-")  # and step 30's

    run = counting_run(tmp_path / "run", url, 30, faults)
    assert run.finished and run.exit_code == 0
    local = killsafe.CheckpointStore(tmp_path / "run/checkpoints")
    assert [info.step for info in local.list()] == [10, 20, 30]
    assert local.load(30)["done"] == list(range(30))  # the local tier is whole
    assert steps_in(url) == [20]  # step 10 failed, 20 went up after it
    assert killsafe.CheckpointStore(url).verify("latest").step == 20
    (line,) = mirror_lines(caplog)
    assert "newest step 20, 1 uploaded this session" in line
    assert "last upload failed (step 30: could not write" in line

    # The server is back: the next session uploads the step the last one could not.
    switch(storage.open(url))
    caplog.clear()

    def step_30_first(step: int) -> None:  # before step 40 could supersede it at the end
        if step == 35:
            wait_for_upload(url, 30)

    run = counting_run(tmp_path / "run", url, 40, step_30_first)
    assert run.finished and steps_in(url) == [20, 30, 40]
    assert killsafe.CheckpointStore(url).load("latest")["done"] == list(range(40))
    (line,) = mirror_lines(caplog)
    assert "newest step 40, 2 uploaded this session" in line and "failed" not in line


def test_a_second_live_run_on_the_same_mirror_is_refused_at_its_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = memory_url()
    refused: list[str] = []

    def second_run(step: int) -> None:
        if step == 5:  # the first run holds the mirror's lease from its start
            with pytest.raises(StoreLocked) as caught:
                counting_run(tmp_path / "second", url, 30)
            refused.append(str(caught.value))
        if step == 15:  # step 10 goes up before step 20 could supersede it at the end
            wait_for_upload(url, 10)

    first = counting_run(tmp_path / "first", url, 20, second_run)
    (message,) = refused
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
    assert message.startswith(url)
    assert first.finished and steps_in(url) == [10, 20]  # the first run never noticed
    assert not (tmp_path / "second/checkpoints").exists()  # refused before any step
    # Once the first run has ended, the second starts and uploads.
    second = counting_run(tmp_path / "second", url, 10)
    assert second.finished and steps_in(url) == [10, 20]  # its step 10 exists there already


def test_the_same_run_directory_resumed_on_a_new_node_takes_over_the_lost_nodes_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = memory_url()
    directory = tmp_path / "run"
    counting_run(directory, url, 10)
    # The node that ran it is lost while holding the lease (another host: its
    # pid cannot be checked, and the lease has a minute left).
    lost = Lease(
        storage.open(url), ttl=60.0, host="lost-node", pid=4242, owner=str(directory.resolve())
    )
    lost.acquire()
    with pytest.raises(StoreLocked, match="pid 4242 on lost-node"):
        counting_run(tmp_path / "another-run", url, 20)
    shutil.rmtree(directory)  # the new node starts with an empty directory of the same path
    run = counting_run(directory, url, 20)
    assert run.finished and run.resumed_from is not None and steps_in(url) == [10, 20]
    assert any("taking over the lease" in r.getMessage() for r in caplog.records)
    with pytest.raises(StoreLocked):
        lost.check()  # the lost node, were it still running, would commit nothing more


KILLED_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import killsafe

    directory, mirror = sys.argv[1], sys.argv[2]
    with killsafe.Run(directory, total_steps=10**9, save_every_steps=5, mirror=mirror,
                      mirror_keep_last=3, progress_every=3600, keyboard=False,
                      report=False) as run:
        state = run.track(rng=np.random.default_rng(0), weights=np.zeros(1 << 16), done=[])
        print("start", run.step, flush=True)
        for step in run.steps():
            state["weights"] += state["rng"].normal(size=1 << 16)
            state["done"].append(step)
            time.sleep(0.002)
    """
)


def wait_for_a_step_past(url: str, step: int, child: subprocess.Popen[str]) -> None:
    """Wait until the mirror at ``url`` commits a step after ``step`` (or the child ends)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        latest = killsafe.CheckpointStore(url).latest()
        if latest is not None and latest.step > step:
            return
        time.sleep(0.02)


def test_sigkill_during_uploads_never_shows_a_partial_checkpoint_and_a_fresh_node_resumes(
    tmp_path: Path, s3_url: str
) -> None:
    script = tmp_path / "train.py"
    script.write_text(KILLED_SCRIPT)
    chance = random.Random(18)
    newest = 0
    resumed_from_mirror = 0
    advanced = 0
    for kill in range(14):
        node = tmp_path / f"node-{kill}"  # every start is a fresh machine
        child = subprocess.Popen(
            [sys.executable, str(script), str(node), s3_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        first = child.stdout.readline().split()
        assert first[:1] == ["start"], child.communicate()
        start = int(first[1])
        assert start == newest  # resumed from the mirror's newest checkpoint
        resumed_from_mirror += start > 0
        # The kill lands at a random moment after this start's first upload
        # committed, while later uploads are under way.
        wait_for_a_step_past(s3_url, newest, child)
        time.sleep(chance.uniform(0.0, 0.4))
        child.kill()
        child.communicate()
        remote = killsafe.CheckpointStore(s3_url)
        for info in remote.list():  # only committed checkpoints are listed, each whole
            remote.verify(info)
        latest = remote.latest(verify=True)
        assert latest is not None or newest == 0
        if latest is not None:  # it loads, and holds every step before it
            assert latest.step >= newest  # the mirror never goes back past a committed step
            state = remote.load(latest)
            assert state["done"] == list(range(latest.step))
            advanced += latest.step > newest
            newest = latest.step
    # Every start took over the killed writer's lease and committed a newer step.
    assert advanced == 14 and resumed_from_mirror == 13
