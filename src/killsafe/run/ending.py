"""How a run ends: its exit reason and, when it failed, the error."""

from __future__ import annotations

__all__ = ["EXIT_FAILED", "EXIT_STOPPED", "Ending"]

EXIT_STOPPED = 75
"""The exit status of a run stopped before its end (EX_TEMPFAIL): run the same command again."""
EXIT_FAILED = 1
"""The exit status of a run that failed with an error."""


class Ending:
    """How the run ends: ``reason`` (``None`` while it runs) and the error, if it failed."""

    __slots__ = ("error", "reason")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.error: str | None = None

    def decided(self) -> bool:
        return self.reason is not None

    def exit_code(self) -> int | None:
        """0 finished (or early-stopped), 75 stopped before its end, 1 failed, None running."""
        if self.reason is None:
            return None
        if self.reason in ("finished", "early-stop"):
            return 0
        return EXIT_FAILED if self.reason == "error" else EXIT_STOPPED

    def status(self) -> str:
        """``finished``, ``failed`` or ``stopped``: the word ``run.json`` records."""
        if self.reason == "finished":
            return "finished"
        if self.reason == "error":
            return "failed"
        return "stopped"
