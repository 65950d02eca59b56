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
from resumable.format import CheckpointInfo
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
from resumable.state import RNGState, Stateful
from resumable.store import CheckpointStore

__version__ = "0.1.0"

__all__ = [
    "AnyOf",
    "AtSteps",
    "CheckpointExists",
    "CheckpointInfo",
    "CheckpointNotFound",
    "CheckpointStore",
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
    "RNGState",
    "ResumableError",
    "Run",
    "SaveFailed",
    "StateMismatch",
    "Stateful",
    "StoreLocked",
    "TimeLimit",
    "UnsupportedFormat",
    "UnsupportedState",
    "__version__",
    "add_arguments",
]
