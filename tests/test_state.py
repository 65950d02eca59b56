"""State trees: capture validates and names paths; restore loads Stateful objects."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import killsafe
from killsafe.errors import StateMismatch, UnsupportedState
from killsafe.state import RNGState, Stateful, capture, restore


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state["value"]


def test_unsupported_values_are_refused_with_their_exact_path() -> None:
    optimizer = {"param_groups": [{"lr": 0.1, "fn": lambda x: x}]}
    with pytest.raises(UnsupportedState) as info:
        capture({"optimizer": optimizer})
    message = str(info.value)
    assert "state['optimizer']['param_groups'][0]['fn']" in message
    assert "function" in message and "\n" not in message


@pytest.mark.parametrize(
    "bad",
    [object(), threading.Lock(), {1.5: "float key"}, {True: "bool key"}, np.array([object()])],
)
def test_other_values_are_refused(bad: Any) -> None:
    with pytest.raises(UnsupportedState, match=r"state\['x'\]"):
        capture({"x": bad})


def test_cycles_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(UnsupportedState, match="cycle"):
        capture({"loop": loop})


def test_stateful_objects_are_captured_through_state_dict() -> None:
    counter = Counter()
    counter.value = 7
    model = torch.nn.Linear(2, 2)
    tree = capture({"counter": counter, "model": model, "t": (1, [2])})
    assert tree["counter"] == {"value": 7}
    assert tree["model"]["weight"] is not None and tree["t"] == (1, [2])
    assert isinstance(counter, Stateful)


def test_capture_does_not_copy_tensors() -> None:
    weight = torch.ones(3)
    assert capture({"w": weight})["w"] is weight


def test_restore_loads_stateful_targets_and_returns_plain_values() -> None:
    counter = Counter()
    restored = restore({"counter": counter, "epoch": 0}, {"counter": {"value": 5}, "epoch": 3})
    assert counter.value == 5 and restored["epoch"] == 3 and restored["counter"] is counter


def test_restore_reports_missing_names_and_mismatches() -> None:
    with pytest.raises(StateMismatch, match="model"):
        restore({"model": Counter()}, {})
    model = torch.nn.Linear(2, 2)
    with pytest.raises(StateMismatch, match="model"):
        restore({"model": model}, {"model": {"weight": torch.ones(3, 3)}})


def test_rng_state_restores_python_numpy_and_torch() -> None:
    rng = RNGState()
    saved = capture({"rng": rng})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    restore({"rng": rng}, saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rng_state_is_restored_after_other_targets() -> None:
    order: list[str] = []

    class Draws(Counter):
        def load_state_dict(self, state: dict[str, Any]) -> None:
            order.append("draws")
            random.random()

    rng = RNGState()
    saved = {"rng": rng.state_dict(), "draws": {"value": 0}}
    expected = random.random()
    restore({"rng": rng, "draws": Draws()}, saved)
    assert order == ["draws"] and random.random() == expected


def test_capture_never_imports_torch_or_numpy() -> None:
    code = (
        "import sys; from killsafe.state import capture; "
        "capture({'a': [1, 2.5, b'x', {3}], 'b': (None,)}); "
        "print([m for m in ('torch', 'numpy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _batches() -> Any:
    yield from range(3)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (torch.utils.data.DataLoader(list(range(8)), batch_size=2), r"run\.batches\(\)"),
        (_batches(), r"run\.batches\(\)"),
        (iter([1, 2, 3]), r"run\.batches\(\)"),
    ],
)
def test_a_loader_generator_or_iterator_is_refused_naming_a_loader_and_stateful(
    tmp_path: Path, data: Any, expected: str
) -> None:
    with killsafe.Run(tmp_path, progress=False) as run, pytest.raises(UnsupportedState) as info:
        run.track(data=data)
    message = str(info.value)
    assert re.search(expected, message), message
    assert "state['data']" in message and "state_dict()/load_state_dict()" in message
    assert "Stateful" in message and "\n" not in message
