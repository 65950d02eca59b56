"""Two training scripts as their authors write them, on ``run.epochs()``/``run.batches()``.

``python epochs_script.py mnist|keras RUN_DIR``: ``mnist`` is in the style of
pytorch/examples' MNIST ``main.py`` (``train()``/``test()``, Adadelta, StepLR,
a shuffled DataLoader, synthetic data); ``keras`` is Keras's
BackupAndRestore scenario (``fit(epochs=...)`` with callbacks, a list of
batches, a NumPy model: no torch import, so it starts fast). Each epoch's
end code appends ``[epoch, test_loss]`` to a tracked list, sleeps a little
and, when ``EPOCHS_MARKS`` names a directory, first drops
``end-<epoch>-<pid>`` there so a test can signal it inside the end code
(each batch drops ``batch-<pid>``). ``EPOCHS_FAIL_AT=E`` raises in epoch E's
end code (once: a marker in the run directory remembers it). A finished run
prints one ``result:`` line: a digest of the model, the optimizer's (and
scheduler's) state and the log of the end codes that ran, and the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from killsafe.run import Run

EPOCHS = 4
END_SECONDS = 0.15
BATCH_SECONDS = 0.004


def digest(*objects: Any) -> str:
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if hasattr(value, "detach"):  # a torch tensor
            h.update(value.detach().contiguous().numpy().tobytes())
        elif isinstance(value, np.ndarray):
            h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                h.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        else:
            h.update(repr(value).encode())

    for item in objects:
        feed(item.state_dict() if hasattr(item, "state_dict") else item)
    return h.hexdigest()[:20]


def batch_done() -> None:
    """Each batch takes a little time; the first of a session drops its marker."""
    time.sleep(BATCH_SECONDS)
    marks = os.environ.get("EPOCHS_MARKS")
    if marks:
        (Path(marks) / f"batch-{os.getpid()}").touch()


def end_code(run_dir: Path, epoch: int, log: list[Any], test_loss: float) -> None:
    """The epoch's end code: a test a signal can land in; an exception when asked."""
    marks = os.environ.get("EPOCHS_MARKS")
    if marks:
        (Path(marks) / f"end-{epoch}-{os.getpid()}").write_text("")
    time.sleep(END_SECONDS)
    failed_once = run_dir / f"failed-{epoch}"
    if os.environ.get("EPOCHS_FAIL_AT") == str(epoch) and not failed_once.exists():
        failed_once.write_text("")
        raise RuntimeError(f"interrupted in the end code of epoch {epoch}")
    log.append([epoch, round(test_loss, 12)])


def mnist(run_dir: Path) -> dict[str, Any] | None:
    import torch
    from torch import nn

    torch.manual_seed(1)
    images = torch.randn(192, 1, 8, 8)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long() + (images[:, 0, 0, 0] > 0).long()
    train_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images[:160], labels[:160]), batch_size=16, shuffle=True
    )
    test_set = (images[160:], labels[160:])
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.25), nn.Flatten(), nn.Linear(144, 3)
    )
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    log: list[Any] = []

    def train(data: Any, target: Any) -> None:
        model.train()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(data), target)
        loss.backward()
        optimizer.step()
        batch_done()

    def test() -> float:
        model.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(test_set[0]), test_set[1]))

    with Run(run_dir, progress=False, keyboard=False, report=False) as run:
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, log=log)
        for epoch in run.epochs(EPOCHS):
            for data, target in run.batches(train_loader):
                train(data, target)
            end_code(run_dir, epoch, log, test())
            scheduler.step()
    return outcome(run, model, optimizer, scheduler, log)


def keras(run_dir: Path) -> dict[str, Any] | None:
    np.random.seed(2)
    x, y = np.random.randn(120, 6), np.random.randn(120, 1)
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, 120, 10)]
    # A linear model and SGD with momentum, in NumPy: the weights and the
    # velocity are plain arrays, tracked in place.
    weights = {"w": np.random.randn(6, 1) * 0.1, "b": np.zeros(1)}
    velocity = {"w": np.zeros((6, 1)), "b": np.zeros(1)}
    log: list[Any] = []

    def train_on_batch(inputs: Any, targets: Any) -> None:
        error = inputs @ weights["w"] + weights["b"] - targets
        grads = {"w": inputs.T @ error / len(inputs), "b": error.mean(axis=0)}
        for key in weights:
            velocity[key] *= 0.9
            velocity[key] += grads[key]
            weights[key] -= 0.05 * velocity[key]
        batch_done()

    class BackupAndRestore:
        """What the Keras callback does, on a Run: the run directory is the backup."""

        def __init__(self, directory: Path) -> None:
            self.run = Run(directory, progress=False, keyboard=False, report=False)

    def fit(epochs: int, callbacks: list[BackupAndRestore]) -> Run:
        with callbacks[0].run as run:
            run.track(weights=weights, velocity=velocity, log=log)
            for epoch in run.epochs(epochs):
                for inputs, targets in run.batches(batches):
                    train_on_batch(inputs, targets)
                loss = float(((x @ weights["w"] + weights["b"] - y) ** 2).mean())
                end_code(run_dir, epoch, log, loss)
        return run

    run = fit(EPOCHS, callbacks=[BackupAndRestore(run_dir)])
    return outcome(run, weights, velocity, log)


def outcome(run: Run, *state: Any) -> dict[str, Any] | None:
    """A finished run's digest of ``state`` and its end-code log (the last of ``state``)."""
    if not run.finished:
        return None
    return {"digest": digest(*state), "log": state[-1], "exit_code": run.exit_code}


def main() -> None:
    kind, run_dir = sys.argv[1], Path(sys.argv[2])
    if kind == "mnist":
        import torch

        torch.set_num_threads(1)
    run_result, code = run_script(kind, run_dir)
    if run_result is not None:
        print("result: " + json.dumps(run_result), flush=True)
    sys.exit(code)


def run_script(kind: str, run_dir: Path) -> tuple[dict[str, Any] | None, int]:
    """Run one script in this process: its result (None unless finished) and exit code."""
    found = {"mnist": mnist, "keras": keras}[kind](run_dir)
    return found, 0 if found is not None else 75


if __name__ == "__main__":
    main()
