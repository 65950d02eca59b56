"""Writers to a real S3 server (SeaweedFS) SIGKILLed at random moments, and racing writers.

Each writer is a real process (forked from the session's preloaded
forkserver, ``fork_helpers``, so a hundred of them start fast), saving
small states in a loop until it is killed. After every kill: no partial
checkpoint is listed, ``latest()`` loads and verifies, and the step never
goes back past a committed one. The next writer takes the dead writer's
lease over and sweeps what the killed attempts left.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import fork_helpers
import pytest

from killsafe import CheckpointStore, storage
from killsafe.storage.testserver import LocalS3Server

KILLS = 110

pytestmark = pytest.mark.usefixtures("no_stray_children")


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _wait_for(path: Path, count: int, child: Any) -> list[str]:
    """The report's lines once it has ``count`` of them (the child must stay alive)."""
    deadline = time.monotonic() + 60
    while len(lines := _lines(path)) < count:
        assert child.is_alive() or len(_lines(path)) >= count, "the writer died"
        assert time.monotonic() < deadline, "the writer never answered"
        time.sleep(0.002)
    return lines


def _attempts_named(url: str) -> tuple[set[str], set[str]]:
    """(attempt prefixes present, attempt prefixes some manifest names)."""
    backend = storage.open(url)
    present = {"/".join(i.key.split("/")[:2]) for i in backend.list() if i.key.count("/") >= 2}
    present = {p for p in present if p.startswith("step-")}
    named = set()
    for info in CheckpointStore(url).list():
        manifest = json.loads(storage.read_bytes(backend, f"{info.path}/manifest.json"))
        if manifest["files"]:
            named.add(f"{info.path}/{manifest['attempt']}")
    return present, named


def test_sigkill_at_random_moments_on_s3(
    s3_server: LocalS3Server, s3_url: str, tmp_path: Path
) -> None:
    import object_writers

    context = fork_helpers.context()
    env = s3_server.environment()
    rng = random.Random(4321)
    committed = -1
    reader = CheckpointStore(s3_url)
    for kill in range(KILLS):
        report = tmp_path / f"writer-{kill}"
        child = context.Process(
            target=object_writers.save_forever,
            args=(s3_url, env, str(report), rng.choice([100, 5000, 60_000]), 5.0),
        )
        child.start()
        _wait_for(report, 1, child)
        child.join(rng.uniform(0, 0.15))
        child.kill()  # SIGKILL, unless it ended on its own meanwhile
        child.join()
        lines = _lines(report)
        steps = [int(line) for line in lines if line.isdigit()]
        committed = max([committed, *steps])
        infos = reader.list()
        for info in infos:
            reader.verify(info)  # nothing partial is ever listed
        latest = reader.latest()
        if committed < 0:
            continue
        assert latest is not None, f"kill {kill}: nothing loadable after step {committed}"
        assert latest.step >= committed, f"kill {kill}: step {latest.step} < {committed}"
        assert reader.load()["step"] == latest.step
    assert committed > 0
    # One more writer takes the dead one's lease over and sweeps every orphan.
    with CheckpointStore(s3_url, sweep_after=0.0) as store:
        store.save({"step": committed + 100}, step=committed + 100)
    present, named = _attempts_named(s3_url)
    assert present == named


def test_two_writers_race_for_the_lease(
    s3_server: LocalS3Server, s3_url: str, tmp_path: Path
) -> None:
    import object_writers

    context = fork_helpers.context()
    start, hold = context.Event(), context.Event()
    report = tmp_path / "race"
    writers = [
        context.Process(
            target=object_writers.race_for_the_lease,
            args=(s3_url, s3_server.environment(), start, hold, str(report)),
        )
        for _ in range(2)
    ]
    for writer in writers:
        writer.start()
    start.set()
    lines = _wait_for(report, 2, writers[0])
    hold.set()
    for writer in writers:
        writer.join(60)
    assert sorted(lines) == ["locked", "saved"]
    assert len(CheckpointStore(s3_url).list()) == 1
