"""What HTTP requests may make a run create: a frozen policy, validated at construction.

No I/O and no web framework here: ``Run`` takes it without importing the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from killsafe.errors import ConfigError

__all__ = ["ServeLimits"]


@dataclass(frozen=True)
class ServeLimits:
    """Caps on the checkpoints that save requests over HTTP can create.

    Args:
        saves_per_minute: save requests that reach the run in any 60 s
            (requests coalesced into a pending one do not count); ``None``: no cap.
        named_saves_kept: checkpoints named by save requests that may exist at
            once (retention never removes named checkpoints); ``None``: no cap.

    A request over either cap is answered 429 with a one-line reason.
    """

    saves_per_minute: int | None = 10
    named_saves_kept: int | None = 20

    def __post_init__(self) -> None:
        _check("saves_per_minute", self.saves_per_minute, minimum=1)
        _check("named_saves_kept", self.named_saves_kept, minimum=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "saves_per_minute": self.saves_per_minute,
            "named_saves_kept": self.named_saves_kept,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServeLimits:
        return cls(
            saves_per_minute=data.get("saves_per_minute"),
            named_saves_kept=data.get("named_saves_kept"),
        )


def _check(label: str, value: Any, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"ServeLimits({label}={value!r}): use a whole number >= {minimum}, or None for no cap"
        )
