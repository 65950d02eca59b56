"""The exception tree of resumable.

Every error the library raises on purpose derives from ``ResumableError``, so
``except resumable.ResumableError`` catches them all::

    ResumableError(Exception)
    ├── CheckpointNotFound     no checkpoint matches a reference, or a path is missing
    ├── CorruptCheckpoint      files fail their checksum, are truncated or malformed
    ├── UnsupportedFormat      written by a newer format version than this one reads
    ├── UnsupportedState       a value in the state cannot be saved (path and type named)
    ├── StateMismatch          a checkpoint does not fit the objects it is loaded into
    ├── StoreLocked            another live process writes to this store
    ├── CheckpointExists       a save would overwrite an existing checkpoint
    ├── InvalidName            a user-given checkpoint name is unusable
    ├── SaveFailed             writing a checkpoint failed (disk full, I/O error)
    └── ConfigError            an argument or option has a bad value

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
    "ResumableError",
    "SaveFailed",
    "StateMismatch",
    "StoreLocked",
    "UnsupportedFormat",
    "UnsupportedState",
]


class ResumableError(Exception):
    """Base class of every error raised by resumable."""


class CheckpointNotFound(ResumableError):
    """No checkpoint matches the reference, or the path does not exist."""


class CorruptCheckpoint(ResumableError):
    """A checkpoint's files are truncated, fail their checksum or are malformed."""


class UnsupportedFormat(ResumableError):
    """The checkpoint was written by a newer format version than this one reads."""


class UnsupportedState(ResumableError):
    """A value in the state tree cannot be saved."""


class StateMismatch(ResumableError):
    """A checkpoint's state does not fit the objects it is restored into."""


class StoreLocked(ResumableError):
    """Another live process holds the store's write lock."""


class CheckpointExists(ResumableError):
    """A save would overwrite an existing checkpoint."""


class InvalidName(ResumableError):
    """A user-given checkpoint name is empty, too long or unsafe."""


class SaveFailed(ResumableError):
    """Writing a checkpoint failed; earlier checkpoints are untouched."""


class ConfigError(ResumableError):
    """An argument or option has a bad value."""
