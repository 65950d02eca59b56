"""Retention decisions as tables, without touching disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from killsafe.errors import ConfigError
from killsafe.retention import Retention


@dataclass
class Item:
    step: int
    name: str | None = None
    created: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


def steps(items: list[Any]) -> list[Any]:
    return [(i.step, i.name) if i.name else i.step for i in items]


def losses(*pairs: tuple[int, float]) -> list[Item]:
    return [Item(step, created=step, metrics={"loss": loss}) for step, loss in pairs]


@pytest.mark.parametrize(
    ("policy", "items", "deleted"),
    [
        (Retention(), [Item(1), Item(2)], []),
        (Retention(keep_last=2), [Item(3), Item(1), Item(2)], [1]),
        (Retention(keep_last=1), [Item(10), Item(9), Item(100)], [9, 10]),
        (Retention(keep_last=1), [Item(1, "best"), Item(2), Item(3)], [2]),
        (Retention(keep_last=1), [Item(5, "x"), Item(5)], []),
        (Retention(keep_last=1), [Item(2, "late")], []),
        (
            Retention(keep_last=1, best=("loss", "min")),
            losses((1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9)),
            [1, 3],
        ),
        (
            Retention(keep_last=1, keep_best=2, best=("loss", "min")),
            losses((1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9)),
            [3],
        ),
        (
            Retention(keep_last=1, best=("loss", "max")),
            losses((1, 0.5), (2, 0.1), (3, 0.7), (4, 0.9)),
            [1, 2, 3],
        ),
        (
            Retention(keep_best=1, best=("loss", "min")),
            [*losses((1, 0.3)), Item(2, metrics={"loss": float("nan")}), Item(3, metrics={})],
            [2],
        ),
        (Retention(keep_last=2), [Item(2, created=5), Item(2, created=1), Item(1)], [1]),
    ],
)
def test_retention_table(policy: Retention, items: list[Item], deleted: list[Any]) -> None:
    assert steps(policy.select_deletions(items)) == deleted


def test_steps_are_ordered_numerically_not_as_text() -> None:
    items = [Item(9), Item(10), Item(100), Item(11)]
    assert steps(Retention(keep_last=2).select_deletions(items)) == [9, 10]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_last": 0},
        {"keep_last": -1},
        {"keep_last": "3"},
        {"keep_last": True},
        {"keep_best": 2},
        {"best": ("loss", "lowest")},
        {"best": "loss"},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Retention(**kwargs)
