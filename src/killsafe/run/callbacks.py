"""The user's callbacks: ``on_save``, ``on_stop``, ``on_finish``, ``on_error``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from killsafe.run.config import Callback

__all__ = ["Callbacks"]

logger = logging.getLogger("killsafe")


class Callbacks:
    """Calls ``callback(run, *args)``; a failing callback is logged, never raised."""

    def __init__(self, run: Any, callbacks: Mapping[str, Callback | None]) -> None:
        self._run = run
        self._callbacks = dict(callbacks)

    def call(self, which: str, *args: Any) -> None:
        callback = self._callbacks.get(which)
        if callback is None:
            return
        try:
            callback(self._run, *args)
        except Exception:
            logger.exception("%s callback failed; the run goes on", which)
