"""Environment variables of killsafe, and the names they had before the rename.

Every variable is read through :func:`getenv`. Until the next release the
``RESUMABLE_`` name of each one still works, with a one-line warning that
names the ``KILLSAFE_`` variable to set instead.
"""

from __future__ import annotations

import logging
import os

__all__ = ["getenv"]

logger = logging.getLogger("killsafe")

_PREFIX = "KILLSAFE_"
_OLD_PREFIX = "RESUMABLE_"
_warned: set[str] = set()


def getenv(name: str, default: str | None = None) -> str | None:
    """The value of ``KILLSAFE_<name>``, else of the deprecated ``RESUMABLE_<name>``.

    ``name`` is given without the prefix (``"RESUME"``). A set ``KILLSAFE_``
    variable wins over the old one.
    """
    value = os.environ.get(_PREFIX + name)
    if value is not None:
        return value
    old = os.environ.get(_OLD_PREFIX + name)
    if old is None:
        return default
    if name not in _warned:
        _warned.add(name)
        logger.warning(
            "%s%s is deprecated and will stop working in the next release: set %s%s instead",
            _OLD_PREFIX,
            name,
            _PREFIX,
            name,
        )
    return old
