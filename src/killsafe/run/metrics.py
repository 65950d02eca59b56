"""The metrics a loop logs: those of the step under way, and the latest of each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LoggedMetrics", "as_float", "plain_metrics"]


class LoggedMetrics:
    """``step``: what was logged during the step under way; ``latest``: the newest of each."""

    __slots__ = ("latest", "step")

    def __init__(self) -> None:
        self.step: dict[str, Any] = {}
        self.latest: dict[str, Any] = {}

    def log(self, metrics: Mapping[str, Any]) -> None:
        self.step.update(metrics)
        self.latest.update(metrics)

    def next_step(self) -> None:
        """Start the next step's metrics (the policies keep the ones they were handed)."""
        if self.step:
            self.step = {}

    def plain(self) -> dict[str, Any]:
        """The latest numbers and strings, as a checkpoint records them."""
        return plain_metrics(self.latest)


def as_float(value: Any) -> float | None:
    """A number (Python, numpy or torch scalar) as a float; ``None`` for anything else."""
    if value is None or isinstance(value, bool):
        return None
    if hasattr(value, "item"):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return None
    return float(value) if isinstance(value, (int, float)) else None


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers as int or float, strings kept, anything else left out."""
    plain: dict[str, Any] = {}
    for name, value in metrics.items():
        number = as_float(value)
        if number is not None:
            plain[name] = int(value) if isinstance(value, int) else number
        elif isinstance(value, str):
            plain[name] = value
    return plain
