"""Where the loop is: the steps completed, where this session began, whether a step is open."""

from __future__ import annotations

__all__ = ["Position"]


class Position:
    """The loop's position, shared by the parts of a ``Run`` that need it.

    ``step`` counts the steps completed in all sessions; a checkpoint taken at
    step ``n`` holds the state after ``n`` steps, so a resumed loop's first
    step is ``n``. ``in_step`` is true while the body of a step runs.
    ``total`` is the step count to reach (``None``: until stopped; ``Run``'s
    ``total_steps``, which a script may still change). ``epoch`` and
    ``batch_index`` stay ``None`` until ``run.epochs()`` counts them: the
    epoch whose end code has not run yet, and the batches of it done (inside
    a batch: its 0-based index). ``epochs`` is the epoch count to reach.
    """

    __slots__ = ("batch_index", "epoch", "epochs", "in_step", "session_start", "step", "total")

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.step = 0
        self.session_start = 0
        self.in_step = False
        self.epoch: int | None = None
        self.batch_index: int | None = None
        self.epochs: int | None = None

    @property
    def ran(self) -> int:
        """Steps completed in this session."""
        return self.step - self.session_start

    @property
    def reached_total(self) -> bool:
        return self.total is not None and self.step >= self.total

    @property
    def reached_end(self) -> bool:
        """The loop has nothing left: ``total`` steps, or every epoch of ``run.epochs()``."""
        if self.epochs is not None and self.epoch is not None and self.epoch >= self.epochs:
            return True
        return self.reached_total

    @property
    def open_ended(self) -> bool:
        """Neither a step count nor an epoch count to reach: any exit is a finish."""
        return self.total is None and self.epochs is None

    def logged_step(self) -> int:
        """The step a metric logged now belongs to: the open one, else the last one."""
        return self.step + 1 if self.in_step else self.step

    def close_open_step(self) -> None:
        """Count a step left with ``break``: its work is done."""
        if self.in_step:
            self.in_step = False
            self.step += 1
