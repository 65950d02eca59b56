"""What a run's checkpoint holds: the tracked objects, the run's own state, the RNG states."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from killsafe.policy import StopPolicy
from killsafe.run.best import BestTracker

__all__ = ["RNG_KEY", "RUN_KEY", "checkpoint_tree", "load_run_state", "saved_loop"]

RUN_KEY = "__run__"
RNG_KEY = "__rng__"


def checkpoint_tree(
    tracked: Mapping[str, Any],
    best: BestTracker,
    stop_policies: Sequence[StopPolicy],
    rng: Any,
    loop: Any = None,
) -> dict[str, Any]:
    """The tree a checkpoint stores: the tracked objects under their names, then ours.

    ``loop``: the ``run.epochs()`` position, kept under ``__run__["loop"]``.
    """
    tree: dict[str, Any] = dict(tracked)
    tree[RUN_KEY] = {
        "best": best.state_dict(),
        "stop_policies": [
            policy.state_dict() if hasattr(policy, "state_dict") else None
            for policy in stop_policies
        ],
    }
    if loop is not None:
        tree[RUN_KEY]["loop"] = loop
    tree[RNG_KEY] = rng
    return tree


def load_run_state(saved: Any, best: BestTracker, stop_policies: Sequence[StopPolicy]) -> None:
    """Restore the best values and the stop policies' counters from a checkpoint's tree."""
    if not isinstance(saved, Mapping):
        return
    best.load_state_dict(saved.get("best") or {})
    states = list(saved.get("stop_policies") or [])
    for policy, state in zip(stop_policies, states, strict=False):
        if state is not None and hasattr(policy, "load_state_dict"):
            policy.load_state_dict(state)


def saved_loop(saved: Any) -> Mapping[str, Any] | None:
    """The ``run.epochs()`` position in a checkpoint's run state, if it has one."""
    if not isinstance(saved, Mapping):
        return None
    loop = saved.get("loop")
    return loop if isinstance(loop, Mapping) else None


def completed_epochs(loop: Mapping[str, Any] | None) -> int | None:
    """The epoch count a checkpoint's ``run.epochs()`` loop had run to its end, else None.

    None also for a loop saved mid-way, and for checkpoints that predate the
    count being kept.
    """
    if loop is None:
        return None
    count, epoch = loop.get("epochs"), loop.get("epoch")
    if type(count) is int and type(epoch) is int and epoch >= count:
        return count
    return None
