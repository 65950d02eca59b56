"""Exact resume: a deterministic CPU training run, interrupted again and again, ends bit-identical.

The child trains a small network with dropout (torch RNG), input noise from
NumPy's global RNG, a Python ``random`` coin, AdamW, a step LR schedule and a
shuffled ``ResumableLoader`` that crosses several epochs, so every piece of
state that a resume must restore changes the final parameters if it is not.
Each session is a real process forked from a forkserver that imported torch
once (``fork_helpers``), so a session does not pay torch's import.
"""

from __future__ import annotations

import json
import random
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from fork_helpers import ScriptProcess

from killsafe.rundir import read_jsonl

pytest.importorskip("torch")
pytest.importorskip("numpy")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_stray_children")]

TOTAL_STEPS = 150

TRAIN = textwrap.dedent(
    """
    import hashlib, json, random, sys, time
    from pathlib import Path

    import numpy as np
    import torch
    from torch import nn

    from killsafe.integrations.torch import ResumableLoader
    from killsafe.run import Run

    run_dir = Path(sys.argv[1])
    total = int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)

    data = torch.utils.data.TensorDataset(torch.randn(200, 8), torch.randint(0, 3, (200,)))
    loader = ResumableLoader(data, batch_size=16, shuffle=True, seed=7)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=40, gamma=0.5)

    with Run(run_dir, total_steps=total, save_every_steps=9, keep_last=2, progress=False,
             report=False) as run:
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, data=loader)
        (run_dir / "looping").write_text("")
        batches = loader.forever()
        for step in run.steps():
            inputs, labels = next(batches)
            inputs = inputs + torch.from_numpy(np.random.normal(0, 0.05, inputs.shape)).float()
            scale = 1.0 if random.random() < 0.5 else 0.5
            loss = nn.functional.cross_entropy(model(inputs), labels) * scale
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            run.log(loss=loss.item())
            time.sleep(0.004)  # slow enough to be interrupted at any moment

    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    for state in optimizer.state.values():
        for value in state.values():
            digest.update(value.numpy().tobytes())
    result = {"step": run.step, "exit_reason": run.exit_reason, "digest": digest.hexdigest()}
    (run_dir / "result.json").write_text(json.dumps(result))
    """
)


def _start(script: Path, run_dir: Path) -> ScriptProcess:
    """``python train.py RUN_DIR STEPS``, forked from the preloaded forkserver (torch imported)."""
    return ScriptProcess(script, [str(run_dir), str(TOTAL_STEPS)], run_dir.parent)


def _reference(tmp_path: Path, script: Path) -> str:
    run_dir = tmp_path / "reference"
    run_dir.mkdir()
    proc = _start(script, run_dir)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == TOTAL_STEPS
    return str(result["digest"])


# Three SIGKILLs at random moments (mid-step, mid-save, anywhere) and the two
# graceful signals, in one schedule.
SCHEDULE = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGKILL]


def test_interrupted_training_ends_bit_identical(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    expected = _reference(tmp_path, script)
    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    moments = random.Random(20261122)
    sessions = 0
    for sig in [*SCHEDULE, None]:
        (run_dir / "looping").unlink(missing_ok=True)
        proc = _start(script, run_dir)
        sessions += 1
        if sig is None:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            break
        deadline = time.monotonic() + 60
        while not (run_dir / "looping").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(moments.uniform(0.0, 0.15))  # a random moment of the loop
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if sig != signal.SIGKILL:
            assert proc.returncode == 0, err
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == TOTAL_STEPS
    assert result["exit_reason"] == "finished"
    assert result["digest"] == expected
    steps = [r["step"] for r in read_jsonl(run_dir / "history.jsonl")]
    assert steps == list(range(1, TOTAL_STEPS + 1))
    sessions_recorded = json.loads((run_dir / "run.json").read_text())["sessions"]
    assert len(sessions_recorded) == sessions
    # Every interruption landed inside the loop: no session but the last finished it.
    assert [s["start_step"] < TOTAL_STEPS for s in sessions_recorded] == [True] * sessions


class CountingDataset:
    """A map-style dataset that counts the samples actually read."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.reads = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        self.reads += 1
        return index


def _indices(batches: list[Any]) -> list[int]:
    return [int(i) for batch in batches for i in batch]


def test_the_loader_resumes_mid_epoch_without_reading_the_skipped_batches() -> None:
    from killsafe.integrations.torch import ResumableLoader

    reference = _indices(list(ResumableLoader(CountingDataset(50), batch_size=4, seed=3)))
    assert sorted(reference) == list(range(50))

    first = ResumableLoader(CountingDataset(50), batch_size=4, seed=3)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(5)]
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 5

    dataset = CountingDataset(50)
    resumed = ResumableLoader(dataset, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert _indices(seen) + _indices(rest) == reference
    assert dataset.reads == 50 - 20  # only the samples it handed out
    assert resumed.state_dict()["epoch"] == 1


def test_len_is_the_whole_epoch_also_inside_a_resumed_one() -> None:
    from killsafe.integrations.torch import ResumableLoader

    first = ResumableLoader(CountingDataset(6000), batch_size=64, seed=1)
    iterator = iter(first)
    for _ in range(80):
        next(iterator)
    resumed = ResumableLoader(CountingDataset(6000), batch_size=64, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert len(resumed) == 94  # ceil(6000 / 64), not the 14 batches left
    lines = []
    for batch_idx, data in enumerate(resumed, start=80):  # the classic MNIST progress print
        lines.append(
            f"[{batch_idx * len(data)}/{len(resumed.dataset)} "
            f"({100.0 * batch_idx / len(resumed):.0f}%)]"
        )
        assert len(resumed) == 94
    assert len(lines) == 14 and lines[0] == "[5120/6000 (85%)]"
    assert len(ResumableLoader(CountingDataset(6000), batch_size=64, drop_last=True)) == 93


def test_a_huge_skip_is_immediate() -> None:
    from killsafe.integrations.torch import ResumableLoader

    dataset = CountingDataset(1_000_000)
    loader = ResumableLoader(dataset, batch_size=1, seed=0)
    loader.load_state_dict(
        {"epoch": 4, "batches": 999_990, "seed": 0, "length": 1_000_000, "batch_size": 1}
    )
    assert len(list(loader)) == 10
    assert dataset.reads == 10
    assert loader.state_dict()["epoch"] == 5


def test_prefetching_workers_never_make_a_resume_skip_samples() -> None:
    from killsafe.integrations.torch import ResumableLoader

    kwargs: dict[str, Any] = dict(batch_size=3, seed=11, num_workers=2, prefetch_factor=4)
    reference = _indices(list(ResumableLoader(CountingDataset(40), batch_size=3, seed=11)))
    first = ResumableLoader(CountingDataset(40), **kwargs)
    iterator = iter(first)
    seen = [next(iterator) for _ in range(4)]  # the workers have read ahead by now
    state = first.state_dict()
    del iterator
    resumed = ResumableLoader(CountingDataset(40), **kwargs)
    resumed.load_state_dict(state)
    assert _indices(seen) + _indices(list(resumed)) == reference


def test_forever_crosses_epochs_with_a_new_order_each_time() -> None:
    from killsafe.integrations.torch import ResumableLoader

    loader = ResumableLoader(CountingDataset(6), batch_size=4, seed=0)
    batches = loader.forever()
    epochs = [_indices([next(batches), next(batches)]) for _ in range(3)]
    assert all(sorted(e) == list(range(6)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]


def test_a_loader_that_does_not_fit_the_saved_position_is_a_mismatch() -> None:
    from killsafe.errors import StateMismatch
    from killsafe.integrations.torch import ResumableLoader

    state = ResumableLoader(CountingDataset(10), batch_size=2, seed=0).state_dict()
    with pytest.raises(StateMismatch) as err:
        ResumableLoader(CountingDataset(12), batch_size=2, seed=0).load_state_dict(state)
    assert "length" in str(err.value)
