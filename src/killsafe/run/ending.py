"""How a run ends: its exit reason and, when it failed, the error."""

from __future__ import annotations

__all__ = ["Ending"]


class Ending:
    """How the run ends: ``reason`` (``None`` while it runs) and the error, if it failed."""

    __slots__ = ("error", "reason")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.error: str | None = None

    def decided(self) -> bool:
        return self.reason is not None

    def status(self) -> str:
        """``finished``, ``failed`` or ``stopped``: the word ``run.json`` records."""
        if self.reason == "finished":
            return "finished"
        if self.reason == "error":
            return "failed"
        return "stopped"
