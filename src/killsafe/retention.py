"""Which checkpoints to keep: a pure decision over plain data (no I/O).

Rules, combined (a checkpoint is kept if any rule keeps it):

- named checkpoints are kept until deleted explicitly;
- ``keep_last=N`` keeps the N newest unnamed checkpoints (by step, then time);
- ``keep_best=K`` keeps the K best on ``best=(metric, "min"|"max")``;
- the newest checkpoint and the best one are never pruned;
- with neither ``keep_last`` nor ``keep_best`` set, everything is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from killsafe.errors import ConfigError

__all__ = ["Retention", "RetentionItem", "best_of"]


class RetentionItem(Protocol):
    """What retention looks at: ``CheckpointInfo`` satisfies it."""

    @property
    def step(self) -> int: ...

    @property
    def name(self) -> str | None: ...

    @property
    def created(self) -> float: ...

    @property
    def metrics(self) -> dict[str, Any]: ...


def _metric(item: RetentionItem, metric: str) -> float | None:
    value = item.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if math.isnan(value):
        return None
    return float(value)


def best_of(items: Sequence[RetentionItem], best: tuple[str, str]) -> list[RetentionItem]:
    """Items that have the metric, best first (ties: the newer first)."""
    metric, mode = best
    scored = [(v, item) for item in items if (v := _metric(item, metric)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda pair: (sign * pair[0], -pair[1].step, -pair[1].created))
    return [item for _, item in scored]


@dataclass(frozen=True)
class Retention:
    """A retention policy; ``select_deletions`` says what to prune."""

    keep_last: int | None = None
    keep_best: int | None = None
    best: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        for label, value in (("keep_last", self.keep_last), ("keep_best", self.keep_best)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{label}={value!r} must be an int or None")
            if value is not None and value < 1:
                raise ConfigError(f"{label}={value} must be at least 1 (or None to keep all)")
        if self.best is not None and (
            not isinstance(self.best, tuple)
            or len(self.best) != 2
            or not isinstance(self.best[0], str)
            or self.best[1] not in ("min", "max")
        ):
            raise ConfigError(f"best={self.best!r} must be (metric, 'min') or (metric, 'max')")
        if self.keep_best is not None and self.best is None:
            raise ConfigError("keep_best needs best=(metric, 'min'|'max') to rank checkpoints")

    @property
    def prunes(self) -> bool:
        """Whether this policy ever deletes anything."""
        return self.keep_last is not None or self.keep_best is not None

    def select_deletions(self, items: Sequence[RetentionItem]) -> list[RetentionItem]:
        """The items to delete, oldest first. ``items`` are the readable checkpoints."""
        if not self.prunes:
            return []
        ordered = sorted(items, key=lambda item: (item.step, item.created))
        unnamed = [item for item in ordered if item.name is None]
        keep: set[int] = set()
        if ordered:
            keep.add(id(ordered[-1]))
        if self.keep_last is not None:
            keep.update(id(item) for item in unnamed[-self.keep_last :])
        if self.best is not None:
            ranked = best_of(ordered, self.best)
            if ranked:
                keep.add(id(ranked[0]))
            if self.keep_best is not None:
                keep.update(id(item) for item in ranked[: self.keep_best])
        return [item for item in unnamed if id(item) not in keep]
