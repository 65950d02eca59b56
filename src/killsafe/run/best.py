"""The best value of each watched metric, and the step that logged it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from killsafe.policy import is_better
from killsafe.progress import metric_direction
from killsafe.run.metrics import as_float

__all__ = ["BestTracker"]


class BestTracker:
    """Tracks the best of ``best=``, of the ``OnImprovement`` metrics, and of any
    metric whose name says which way is better (loss, acc...), as the report does.

    ``records`` maps a metric to ``{"value", "step"}`` (shown in progress, the
    summary and ``status.json``, saved with each checkpoint). Policies see the
    best values *before* the step's own metrics (``for_policies``, kept as
    an attribute: it is read after every step), so that a
    step that improves a metric can be recognised as an improvement.
    """

    def __init__(self, watched: Mapping[str, str]) -> None:
        self._watched = dict(watched)
        self._undirected: set[str] = set()  # logged metrics whose names tell no direction
        self.records: dict[str, dict[str, Any]] = {}
        self._values: dict[str, float] = {}
        self._before_step: dict[str, float] | None = None
        # The best values as they were before the step under way logged anything.
        self.for_policies: Mapping[str, float] = self._values

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Take the metrics logged at ``step`` into account."""
        if self._before_step is None:
            self._before_step = self.for_policies = dict(self._values)
        self._learn_directions(metrics)
        for name, mode in self._watched.items():
            value = as_float(metrics.get(name))
            if value is None:
                continue
            current = self.records.get(name)
            if current is None or is_better(value, current["value"], mode):
                self.records[name] = {"value": value, "step": step}
                self._values[name] = value

    def next_step(self) -> None:
        self._before_step = None
        self.for_policies = self._values

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self.records.items()}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.records = {k: dict(v) for k, v in saved.items()}
        self._values = {k: v["value"] for k, v in self.records.items()}
        if self._before_step is None:
            self.for_policies = self._values

    def _learn_directions(self, metrics: Mapping[str, Any]) -> None:
        for name in metrics:
            if name not in self._watched and name not in self._undirected:
                direction = metric_direction(name)
                if direction is None:
                    self._undirected.add(name)
                else:
                    self._watched[name] = direction
