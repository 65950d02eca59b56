"""resumable: make long-running Python processes safe to interrupt and cheap to resume."""

from resumable.errors import (
    CheckpointExists,
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    InvalidName,
    ResumableError,
    SaveFailed,
    StateMismatch,
    StoreLocked,
    UnsupportedFormat,
    UnsupportedState,
)
from resumable.history import History
from resumable.preflight import Preflight, PreflightResult
from resumable.progress import Progress

__version__ = "0.1.0"

__all__ = [
    "CheckpointExists",
    "CheckpointNotFound",
    "ConfigError",
    "CorruptCheckpoint",
    "History",
    "InvalidName",
    "Preflight",
    "PreflightResult",
    "Progress",
    "ResumableError",
    "SaveFailed",
    "StateMismatch",
    "StoreLocked",
    "UnsupportedFormat",
    "UnsupportedState",
    "__version__",
]
