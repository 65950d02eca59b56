"""The JSON shapes of the HTTP API, as pydantic models (they make the OpenAPI document).

Fields mirror ``status.json`` and the store's ``CheckpointInfo`` (see
docs/architecture.md). Models that echo files written by a run allow extra
fields, so a newer run writing more fields never breaks an older server.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_NAME_LENGTH = 64
MAX_NOTE_LENGTH = 1000
MAX_REASON_LENGTH = 200


class ErrorOut(BaseModel):
    """Every error answer: one line saying what went wrong and what to do."""

    detail: str


class StatusOut(BaseModel):
    """The live run's progress (from ``status.json``) and whether it is attached."""

    model_config = ConfigDict(extra="allow")

    attached: bool = Field(description="a live, responsive run reads control requests")
    directory: str = Field(description="the run directory this server shows")
    state: str | None = Field(None, description="running, stopping, finished, stopped, failed")
    pid: int | None = None
    host: str | None = None
    updated: float | None = Field(None, description="when status.json was written (epoch s)")
    step: int | None = None
    start_step: int | None = None
    total_steps: int | None = None
    percent: float | None = None
    phase: str | None = None
    rate: float | None = Field(None, description="steps per second")
    elapsed: float | None = Field(None, description="seconds since this session started")
    eta: float | None = Field(None, description="seconds until total_steps")
    metrics: dict[str, Any] = Field(default_factory=dict)
    best: dict[str, Any] | None = None
    counters: dict[str, Any] = Field(default_factory=dict)
    last_checkpoint: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None
    control: bool = Field(False, description="the run accepts save and stop requests")


class CheckpointOut(BaseModel):
    """One committed checkpoint, from its manifest."""

    id: str = Field(description="the checkpoint's directory name; use it in DELETE")
    step: int
    name: str | None = None
    reason: str | None = None
    created: float = Field(description="epoch seconds")
    metrics: dict[str, Any] = Field(default_factory=dict)
    size: int = Field(description="bytes on disk, the manifest included")
    path: str
    note: str | None = None
    latest: bool = False
    best: bool = False


class CheckpointListOut(BaseModel):
    checkpoints: list[CheckpointOut]


class SaveIn(BaseModel):
    """Ask the live run for a checkpoint at its next step boundary."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=MAX_NAME_LENGTH)
    note: str | None = Field(None, max_length=MAX_NOTE_LENGTH)


class StopIn(BaseModel):
    """Ask the live run to stop gracefully (an emergency checkpoint, like SIGTERM)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=MAX_REASON_LENGTH)


class AcceptedOut(BaseModel):
    """A control request handed to the run; its answer arrives on ``/api/events``."""

    request_id: str
    action: str
    coalesced: bool = Field(
        False, description="an identical request was already pending; this is its id"
    )
    name: str | None = Field(
        None, description="for a save: the name the checkpoint will have (none: unnamed)"
    )


class DeletedOut(BaseModel):
    deleted: str


class HistoryOut(BaseModel):
    """The logged metrics, one record per ``run.log`` call: ``{"step", "time", ...}``."""

    records: list[dict[str, Any]]
    total: int = Field(description="records in history.jsonl before the limit")
    cursor: str = Field(description="pass it back as ?cursor= to get only newer records")
    reset: bool = Field(
        True, description="true: these records replace what the client had; false: append them"
    )
