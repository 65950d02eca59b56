"""The first lines of a run: where it starts from, where and when it saves, how to stop it.

::

    killsafe: resumed from step-000500 at step 500 (epoch 3)
    killsafe: saving to runs/exp1/checkpoints every 500 steps, every 10 min and on exit
    killsafe: Ctrl+C or q + Enter to stop with a checkpoint

The last line only on an interactive terminal; ``q`` only while the keyboard
is watched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from killsafe.policy import SavePolicy, describe_save_policy

if TYPE_CHECKING:
    from killsafe.format import CheckpointInfo

__all__ = ["start_lines"]

PREFIX = "killsafe: "


def start_lines(
    info: CheckpointInfo | None,
    *,
    step: int,
    epoch: Any,
    store_dir: Path,
    save_policy: SavePolicy,
    epochs: bool | None = None,
    mirror: str | None = None,
    straight_to_mirror: bool = False,
    keyboard: bool,
    terminal: bool,
) -> list[str]:
    """The start lines of a session resumed from ``info`` (``None``: a fresh start).

    ``epoch``: the restored epoch, when the loop counts epochs; otherwise the
    checkpoint's own record of it (``metadata["epoch"]``) is shown, if any.
    ``epochs``: whether the loop is ``run.epochs()``, when known (it decides
    what the default policy does). ``mirror``: where checkpoints are uploaded;
    ``straight_to_mirror``: saved there directly (a job whose nodes share no disk).
    ``keyboard``: ``q`` + Enter is watched; ``terminal``: a person can press Ctrl+C.
    """
    lines = [PREFIX + _origin(info, step, epoch, store_dir)]
    where = f"{store_dir} (mirrored to {mirror})" if mirror else str(store_dir)
    if straight_to_mirror:
        where = f"{mirror} (straight from every rank: the nodes share no disk)"
    when = describe_save_policy(save_policy, epochs=epochs)
    lines.append(f"{PREFIX}saving to {where} {when}")
    if keyboard:
        lines.append(PREFIX + "Ctrl+C or q + Enter to stop with a checkpoint")
    elif terminal:
        lines.append(PREFIX + "Ctrl+C to stop with a checkpoint")
    return lines


def _origin(info: CheckpointInfo | None, step: int, epoch: Any, store_dir: Path) -> str:
    if info is None:
        return "fresh start"
    # A checkpoint among the run's own is named; one from elsewhere by its path.
    name = info.path.name if info.path.parent == store_dir else str(info.path)
    if epoch is None:
        epoch = info.metadata.get("epoch")
    known = isinstance(epoch, int) and not isinstance(epoch, bool)
    return f"resumed from {name} at step {step}" + (f" (epoch {epoch})" if known else "")
