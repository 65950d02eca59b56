"""killsafe: make any long-running Python job safe to kill and exact to resume.

Formerly published as ``resumable``: ``ResumableError`` is kept as an alias of
``KillsafeError``, and checkpoints written under that name still load.
"""

from killsafe.arguments import add_arguments
from killsafe.errors import (
    CheckpointExists,
    CheckpointNotFound,
    ConfigError,
    CorruptCheckpoint,
    InvalidName,
    KillsafeError,
    RankUnresponsive,
    ResumableError,
    SaveFailed,
    StateMismatch,
    StoreLocked,
    UnsupportedFormat,
    UnsupportedState,
)
from killsafe.format import CheckpointInfo
from killsafe.history import History
from killsafe.policy import (
    AnyOf,
    AtSteps,
    EarlyStopping,
    EveryNEpochs,
    EveryNSeconds,
    EveryNSteps,
    OnExit,
    OnImprovement,
    OnRequest,
    TimeLimit,
)
from killsafe.preflight import Preflight, PreflightResult
from killsafe.progress import Progress
from killsafe.run import Run
from killsafe.saver import BackgroundSaver
from killsafe.state import RNGState, Stateful
from killsafe.store import CheckpointStore, register_saver

# The composition root: the store never imports the saver; save_async uses this one.
register_saver(BackgroundSaver)

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
    "EveryNEpochs",
    "EveryNSeconds",
    "EveryNSteps",
    "History",
    "InvalidName",
    "KillsafeError",
    "OnExit",
    "OnImprovement",
    "OnRequest",
    "Preflight",
    "PreflightResult",
    "Progress",
    "RNGState",
    "RankUnresponsive",
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
