"""resumable: make long-running Python processes safe to interrupt and cheap to resume."""

from resumable.arguments import add_arguments
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
from resumable.policy import (
    AnyOf,
    AtSteps,
    EarlyStopping,
    EveryNSeconds,
    EveryNSteps,
    OnExit,
    OnImprovement,
    OnRequest,
    TimeLimit,
)
from resumable.preflight import Preflight, PreflightResult
from resumable.progress import Progress
from resumable.run import Run

__version__ = "0.1.0"

__all__ = [
    "AnyOf",
    "AtSteps",
    "CheckpointExists",
    "CheckpointNotFound",
    "ConfigError",
    "CorruptCheckpoint",
    "EarlyStopping",
    "EveryNSeconds",
    "EveryNSteps",
    "History",
    "InvalidName",
    "OnExit",
    "OnImprovement",
    "OnRequest",
    "Preflight",
    "PreflightResult",
    "Progress",
    "ResumableError",
    "Run",
    "SaveFailed",
    "StateMismatch",
    "StoreLocked",
    "TimeLimit",
    "UnsupportedFormat",
    "UnsupportedState",
    "__version__",
    "add_arguments",
]
