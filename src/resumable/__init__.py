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
from resumable.format import CheckpointInfo
from resumable.history import History
from resumable.preflight import Preflight, PreflightResult
from resumable.progress import Progress
from resumable.state import RNGState, Stateful
from resumable.store import CheckpointStore

__version__ = "0.1.0"

__all__ = [
    "CheckpointExists",
    "CheckpointInfo",
    "CheckpointNotFound",
    "CheckpointStore",
    "ConfigError",
    "CorruptCheckpoint",
    "History",
    "InvalidName",
    "Preflight",
    "PreflightResult",
    "Progress",
    "RNGState",
    "ResumableError",
    "SaveFailed",
    "StateMismatch",
    "Stateful",
    "StoreLocked",
    "UnsupportedFormat",
    "UnsupportedState",
    "__version__",
]
