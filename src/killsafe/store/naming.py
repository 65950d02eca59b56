"""Checkpoint names: what a user may call a checkpoint, and its directory's name."""

from __future__ import annotations

import re
from typing import Any

from killsafe.errors import InvalidName

__all__ = ["MAX_NAME_LENGTH", "TMP_PREFIX", "checkpoint_dirname", "sanitize_name"]

TMP_PREFIX = ".tmp-"
"""A directory being written or deleted: never read, swept by the next writer."""
MAX_NAME_LENGTH = 64
_RESERVED = {"latest", "best"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_name(name: Any) -> str:
    """Return a safe checkpoint name or raise ``InvalidName``.

    Path separators, NUL, ``.``/``..``, hidden names (leading dot), names
    made of digits only (they read as steps) and the reserved ``latest`` and
    ``best`` are refused; runs of other unsafe characters become ``-``.
    """
    if not isinstance(name, str):
        raise InvalidName(f"checkpoint name {name!r} must be a str")
    text = name.strip()
    if any(sep in text for sep in ("/", "\\", "\0")):
        raise InvalidName(
            f"checkpoint name {name!r} contains a path separator; use letters, digits, . _ -"
        )
    if text.startswith("."):
        raise InvalidName(
            f"checkpoint name {name!r} starts with a dot; hidden names are not allowed"
        )
    clean = _UNSAFE.sub("-", text).strip("-")
    if not clean or clean in (".", ".."):
        raise InvalidName(
            f"checkpoint name {name!r} is empty once sanitized; use letters or digits"
        )
    if len(clean) > MAX_NAME_LENGTH:
        raise InvalidName(f"checkpoint name {name!r} is longer than {MAX_NAME_LENGTH} characters")
    if clean.isdigit() or clean.lower() in _RESERVED:
        raise InvalidName(f"checkpoint name {name!r} reads as a step or reference; add a letter")
    return clean


def checkpoint_dirname(step: int, name: str | None, attempt: int = 1) -> str:
    """``step-000500``, ``step-000500--name``; ``.2``, ``.3``... beside a damaged one."""
    base = f"step-{step:06d}" + (f"--{name}" if name else "")
    return base if attempt == 1 else f"{base}.{attempt}"
