"""The exception tree of killsafe.

Every error the library raises on purpose derives from ``KillsafeError``, so
``except killsafe.KillsafeError`` catches them all::

    KillsafeError(Exception)
    ├── CheckpointNotFound     no checkpoint matches a reference, or a path is missing
    ├── CorruptCheckpoint      files fail their checksum, are truncated or malformed
    ├── UnsupportedFormat      written by a newer format version than this one reads
    ├── UnsupportedState       a value in the state cannot be saved (path and type named)
    ├── StateMismatch          a checkpoint does not fit the objects it is loaded into
    ├── StoreLocked            another live process writes to this store
    ├── CheckpointExists       a save would overwrite an existing checkpoint
    ├── InvalidName            a user-given checkpoint name is unusable
    ├── SaveFailed             writing a checkpoint failed (disk full, I/O error)
    ├── ConfigError            an argument or option has a bad value
    └── RankUnresponsive       another process of a distributed job died or hangs

``ResumableError`` is the same class under the project's former name, kept so
that code written for ``resumable`` keeps catching it.

Messages are one line: what went wrong, where, and what to do about it.
Lower-level errors (``OSError``, ``json.JSONDecodeError``) are translated where
they happen and chained with ``raise ... from exc``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointExists",
    "CheckpointNotFound",
    "ConfigError",
    "CorruptCheckpoint",
    "InvalidName",
    "KillsafeError",
    "RankUnresponsive",
    "ResumableError",
    "SaveFailed",
    "StateMismatch",
    "StoreLocked",
    "UnsupportedFormat",
    "UnsupportedState",
]


class KillsafeError(Exception):
    """Base class of every error raised by killsafe."""


ResumableError = KillsafeError
"""The root error under the project's former name (``resumable``): an alias."""


class CheckpointNotFound(KillsafeError):
    """No checkpoint matches the reference, or the path does not exist."""


class CorruptCheckpoint(KillsafeError):
    """A checkpoint's files are truncated, fail their checksum or are malformed."""


class UnsupportedFormat(KillsafeError):
    """The checkpoint was written by a newer format version than this one reads."""


class UnsupportedState(KillsafeError):
    """A value in the state tree cannot be saved."""


class StateMismatch(KillsafeError):
    """A checkpoint's state does not fit the objects it is restored into."""


class StoreLocked(KillsafeError):
    """Another live process holds the store's write lock."""


class CheckpointExists(KillsafeError):
    """A save would overwrite an existing checkpoint (``path``, when known)."""

    def __init__(self, message: str, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class InvalidName(KillsafeError):
    """A user-given checkpoint name is empty, too long or unsafe."""


class SaveFailed(KillsafeError):
    """Writing a checkpoint failed; earlier checkpoints are untouched."""


class ConfigError(KillsafeError):
    """An argument or option has a bad value."""


class RankUnresponsive(KillsafeError):
    """Ranks of a distributed job did not answer a collective within its timeout.

    ``ranks`` lists the ranks that did not answer (empty when they could not
    be told apart) and ``hosts`` their host names, in the same order.
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = (), hosts: tuple[str, ...] = ()):
        super().__init__(message)
        self.ranks = ranks
        self.hosts = hosts
