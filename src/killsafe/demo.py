"""``killsafe demo``: a real PyTorch training run that can be stopped and resumed.

A small multilayer perceptron learns a synthetic classification task: points
drawn from a Gaussian, labelled by a fixed random "teacher" network. Every
training batch is drawn fresh from a generator seeded with the step, so the
data never runs out (the validation loss keeps falling instead of the network
memorizing a small set), nothing is downloaded, and a resumed run sees exactly
the batches an uninterrupted one would have seen.

The run checkpoints the model, optimizer and learning-rate scheduler, shows
live progress, serves the dashboard when the server is installed, and writes
the report at the end. Ctrl+C stops it gracefully after the current step with
a checkpoint; running the same command again continues from there.

This module imports torch at the top: import it only once torch is known to
be available (the command line does so inside ``killsafe demo``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from killsafe.run import Run
from killsafe.rundir import REPORT_TXT

DEFAULT_DIRECTORY = Path("runs/demo")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs; the defaults take about two minutes on two CPU cores."""

    steps: int = 40_000
    seed: int = 0
    features: int = 32
    classes: int = 10
    teacher_hidden: int = 16
    hidden: int = 256
    val_size: int = 5_000
    batch_size: int = 256
    learning_rate: float = 2e-3
    eval_every: int = 200
    save_every_steps: int = 4_000
    save_every_seconds: float = 30.0

    @classmethod
    def for_steps(cls, steps: int) -> DemoConfig:
        """A config for ``steps`` steps, with saves and evaluations spaced to match."""
        return cls(
            steps=steps,
            eval_every=max(10, min(200, steps // 30)),
            save_every_steps=max(10, min(4_000, steps // 10)),
        )


class SyntheticTask:
    """Gaussian inputs labelled by a fixed random teacher network; endless training data."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        generator = torch.Generator().manual_seed(config.seed)
        scale = 1.5 / config.features**0.5  # tanh neither linear nor saturated
        self._teacher_in = scale * torch.randn(
            config.teacher_hidden, config.features, generator=generator
        )
        self._teacher_out = torch.randn(config.classes, config.teacher_hidden, generator=generator)
        self.val_inputs = torch.randn(config.val_size, config.features, generator=generator)
        self.val_labels = self.label(self.val_inputs)

    def label(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(inputs @ self._teacher_in.T)
        return (hidden @ self._teacher_out.T).argmax(dim=1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of ``step``: a pure function of the seed and the step."""
        generator = torch.Generator().manual_seed((self.config.seed + 1) * 1_000_003 + step)
        inputs = torch.randn(self.config.batch_size, self.config.features, generator=generator)
        return inputs, self.label(inputs)


def build_model(config: DemoConfig) -> nn.Module:
    torch.manual_seed(config.seed)
    return nn.Sequential(
        nn.Linear(config.features, config.hidden),
        nn.ReLU(),
        nn.Linear(config.hidden, config.hidden),
        nn.ReLU(),
        nn.Linear(config.hidden, config.classes),
    )


def evaluate(model: nn.Module, task: SyntheticTask) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model(task.val_inputs)
        loss = nn.functional.cross_entropy(logits, task.val_labels).item()
        accuracy = (logits.argmax(dim=1) == task.val_labels).float().mean().item()
    model.train()
    return {"val_loss": loss, "val_accuracy": accuracy}


def train(
    directory: Path, config: DemoConfig, *, serve: bool | int = True, **run_options: Any
) -> Run:
    """Train (or continue training) the demo network in ``directory``; returns the ended Run."""
    task = SyntheticTask(config)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    run = Run(
        directory,
        total_steps=config.steps,
        save_every_steps=config.save_every_steps,
        save_every_seconds=config.save_every_seconds,
        keep_last=3,
        best=("val_loss", "min"),
        resume="auto",
        serve=serve,
        **run_options,
    )
    with run:
        run.track(model=model, optimizer=optimizer, scheduler=scheduler)
        for step in run.steps():
            inputs, labels = task.batch(step)
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            metrics: dict[str, float] = {
                "loss": loss.item(),
                "lr": float(scheduler.get_last_lr()[0]),
            }
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                metrics.update(evaluate(model, task))
            run.log(**metrics)
    return run


def next_steps(directory: Path, finished: bool) -> str:
    """What to try next, with the real directory in every command."""
    where = str(directory)
    again = (
        ("killsafe demo DIR", f"a fresh run elsewhere ({where} is finished)")
        if finished
        else (f"killsafe demo {where}", "run it again: it continues where it stopped")
    )
    rows = [
        again,
        (f"killsafe list {where}", "the checkpoints it kept"),
        (f"killsafe report {where}", "the report of the run"),
        (f"killsafe serve {where}", "the dashboard"),
        (f"killsafe run -- killsafe demo {where}", "restart it whenever it crashes"),
    ]
    width = max(len(command) for command, _ in rows)
    return "\n".join(["Try next:", *(f"  {command.ljust(width)}  {why}" for command, why in rows)])


def run_demo(directory: Path, config: DemoConfig, *, serve: bool | int, stream: TextIO) -> int:
    """The ``killsafe demo`` command: train, then say what to try next."""
    # One thread: a network this small gains little from two, and on a busy
    # machine OpenMP threads that wait on each other make it many times slower.
    torch.set_num_threads(1)
    run = train(directory, config, serve=serve)
    finished = run.exit_reason == "finished"
    report = directory / REPORT_TXT  # written by the run as it ended
    if report.exists():
        stream.write("\n" + report.read_text().rstrip("\n") + "\n")
    stream.write("\n" + next_steps(directory, finished) + "\n")
    stream.flush()
    return 0
