"""Stop requests: the run's own (``run.stop``), then signals and the keyboard."""

from __future__ import annotations

import signal

from killsafe.interrupt import StopRequests

__all__ = ["Stops"]


class Stops:
    """Stop requests: the run's own (``run.stop``) first, then signals and the keyboard."""

    __slots__ = ("asked", "interrupts")

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.asked: str | None = None
        self.interrupts = StopRequests(signals)

    def request(self, reason: str) -> None:
        if self.asked is None:
            self.asked = reason

    def pending(self) -> str | None:
        return self.asked or self.interrupts.reason
