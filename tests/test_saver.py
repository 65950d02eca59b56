"""Background saves: consistent snapshots, failures surfaced, wait/skip, clean exits."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from killsafe import format as fmt
from killsafe.errors import ConfigError
from killsafe.saver import BackgroundSaver, choose_strategy
from killsafe.store import CheckpointStore

STRATEGIES = ["fork", "copy"]


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    model[1].weight = torch.nn.Parameter(model[0].weight[:8])  # a view: shared storage
    return {
        "model": model.state_dict(),
        "array": np.arange(5000, dtype=np.float64),
        "big": torch.randn(300_000),  # over 1 MiB: the multithreaded copy path
        "meta": {"epoch": 3, "tags": ("a", "b")},
    }


def _clone(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, np.ndarray):
        return tree.copy()
    return tree


def _mutate_everything(tree: Any) -> None:
    with torch.no_grad():
        for value in tree["model"].values():
            value.add_(1.0)
    tree["array"] += 1.0
    tree["big"].mul_(-2.0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_snapshot_holds_the_values_of_the_call_even_if_the_loop_changes_everything(
    tmp_path: Path, strategy: str
) -> None:
    state = _state()
    expected = _clone(state)
    with CheckpointStore(tmp_path / "ck", snapshot=strategy) as store:
        pending = store.save_async(state, 1, metrics={"loss": 0.5})
        assert pending is not None
        _mutate_everything(state)  # the very next step changes every value
        info = pending.wait()
        loaded = store.load(info.path)
    assert info.step == 1 and info.metrics == {"loss": 0.5}
    for key, value in expected["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert np.array_equal(loaded["array"], expected["array"])
    assert torch.equal(loaded["big"], expected["big"])
    assert loaded["meta"] == expected["meta"]
    w0, w1 = loaded["model"]["0.weight"], loaded["model"]["1.weight"]
    assert w1.untyped_storage().data_ptr() == w0.untyped_storage().data_ptr()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_successive_saves_reuse_the_saver_and_commit_in_order(
    tmp_path: Path, strategy: str
) -> None:
    state = {"w": torch.zeros(1000)}
    with CheckpointStore(tmp_path / "ck", keep_last=2, snapshot=strategy) as store:
        for step in range(5):
            state["w"].fill_(step)
            store.save_async(state, step)
        store.wait()
        steps = [info.step for info in store.list()]
        assert steps == [3, 4]
        assert torch.equal(store.load()["w"], torch.full((1000,), 4.0))
        info = store.save({"w": torch.ones(3)}, 9)  # a sync save after async ones
        assert info.step == 9


def test_auto_copies_and_fork_is_taken_only_when_asked() -> None:
    tree = {"w": torch.zeros(3)}
    assert choose_strategy(tree) == "copy"
    assert choose_strategy(tree, "copy") == "copy"
    if sys.platform.startswith("linux"):
        assert choose_strategy(tree, "fork") == "fork"
    with pytest.raises(ConfigError, match="unknown"):
        choose_strategy(tree, "teleport")


@pytest.mark.parametrize("strategy", ["copy", "fork"])
def test_the_environment_chooses_the_strategy(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    if strategy == "fork" and not sys.platform.startswith("linux"):
        pytest.skip("fork snapshots need Linux")
    monkeypatch.setenv("KILLSAFE_SNAPSHOT", strategy)
    assert choose_strategy({"w": torch.zeros(3)}, "auto") == strategy


class _GatedStore(CheckpointStore):
    """A real store whose background write waits for a gate: a save held in flight."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, snapshot="copy")
        self.gate = threading.Event()

    def write(self, staging: Any, encoded: fmt.Encoded, **kwargs: Any) -> dict[str, Any]:
        self.gate.wait(10)
        return super().write(staging, encoded, **kwargs)


def test_when_busy_skip_returns_none_and_wait_waits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _GatedStore(tmp_path / "ck")
    first = store.save_async({"x": 1}, 1)
    assert first is not None and not first.done()
    with caplog.at_level("INFO", logger="killsafe.saver"):
        assert store.save_async({"x": 2}, 2, if_busy="skip") is None
    assert "skipping the save of step 2: step 1 is still being written" in caplog.text
    threading.Timer(0.05, store.gate.set).start()
    with caplog.at_level("INFO", logger="killsafe.saver"):
        second = store.save_async({"x": 3}, 3)  # waits for step 1 first
    assert "waiting for the save of step 1 before saving step 3" in caplog.text
    assert first.done()
    assert second is not None and second.wait().step == 3
    store.close()
    assert [i.step for i in store.list()] == [1, 3]


def test_bad_if_busy_and_strategy_are_config_errors(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(ConfigError, match="if_busy"):
        BackgroundSaver(store, if_busy="later")
    with pytest.raises(ConfigError, match="snapshot"):
        CheckpointStore(tmp_path / "ck2", snapshot="teleport")


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    import torch
    from killsafe.errors import SaveFailed
    from killsafe.store import CheckpointStore
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with EFBIG
    store = CheckpointStore(sys.argv[1], snapshot=sys.argv[2])
    store.save({"w": torch.zeros(10)}, 1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    big = {"w": torch.zeros(1 << 20)}
    store.save_async(big, 2)  # fails in the background; nobody waits for it
    try:
        store.save_async(big, 3)
    except SaveFailed as exc:
        print("next save raised:", exc)
    pending = store.save_async(big, 4)
    try:
        pending.wait()
    except SaveFailed as exc:
        print("wait raised:", exc)
    store.save_async(big, 5)
    try:
        store.close()
    except SaveFailed as exc:
        print("close raised:", exc)
    """
)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_background_failure_is_raised_never_lost(tmp_path: Path, strategy: str) -> None:
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck"), strategy],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "next save raised",
        "wait raised",
        "close raised",
    ]
    assert "step 2" in lines[0] and "step 4" in lines[1] and "step 5" in lines[2]
    assert "earlier checkpoints are intact" in out.stdout
    store = CheckpointStore(tmp_path / "ck")
    assert [i.step for i in store.list()] == [1]
    store.verify(1)
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".tmp")]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from killsafe.store import CheckpointStore
    store = CheckpointStore(sys.argv[1], keep_last=2, snapshot=sys.argv[2])
    latest = store.latest()
    step = latest.step + 1 if latest else 0
    state = {"w": torch.randn(2_000_000), "step": step}
    print("ready", flush=True)
    try:
        while True:
            state["w"].add_(1.0)
            state["step"] = step
            store.save_async(state, step)
            print(step, flush=True)
            step += 1
    finally:
        store.close()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_during_an_in_flight_save_the_store_stays_verifiable(
    tmp_path: Path, strategy: str, sig: signal.Signals
) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    directory = tmp_path / "ck"
    rng = random.Random(sig * 7 + len(strategy))
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(directory), strategy],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        proc.stdout.close()
        psutil.wait_procs(children, timeout=10)
        assert not [c for c in children if c.is_running() and c.status() != "zombie"]
        latest = CheckpointStore(directory).latest()
        if latest is not None:
            loaded = CheckpointStore(directory).load(latest)
            assert loaded["step"] == latest.step


def test_closing_leaves_no_thread_and_no_child_process(tmp_path: Path) -> None:
    before = {t.name for t in threading.enumerate()}
    children_before = {child.pid for child in psutil.Process(os.getpid()).children()}
    store = CheckpointStore(tmp_path / "ck", snapshot="fork")
    for step in range(3):
        store.save_async({"w": torch.randn(1000)}, step)
    store.close()
    store_copy = CheckpointStore(tmp_path / "ck2", snapshot="copy")
    store_copy.save_async({"w": torch.randn(1000)}, 0)
    store_copy.close()
    after = {t.name for t in threading.enumerate()}
    assert not {name for name in after - before if name.startswith("killsafe")}
    # Children of earlier tests (a run's plot, drawn after its exit) may still be there.
    children = psutil.Process(os.getpid()).children()
    assert [child for child in children if child.pid not in children_before] == []


def test_saving_state_that_cannot_be_saved_fails_before_anything_is_written(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(Exception, match=r"state\['fn'\]"):
        store.save_async({"fn": lambda: 1}, 1)
    store.close()
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").glob("step-*"))
