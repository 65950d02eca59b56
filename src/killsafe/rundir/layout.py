"""The names of a run directory's files and folders, defined once.

```
runs/exp1/
  run.json  status.json  history.jsonl  events.jsonl  metrics.csv
  report.txt  report.json  report.png
  control/        requests from other processes (control.py)
  checkpoints/    the run's CheckpointStore
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_FILE = "run.json"
STATUS_FILE = "status.json"
HISTORY_FILE = "history.jsonl"
EVENTS_FILE = "events.jsonl"
CSV_FILE = "metrics.csv"
REPORT_TXT = "report.txt"
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
CONTROL_DIR = "control"
CHECKPOINTS_DIR = "checkpoints"

RUN_MARKERS = (RUN_FILE, STATUS_FILE, HISTORY_FILE, CHECKPOINTS_DIR)
"""Any of these in a directory makes it a run directory."""


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory's files."""

    root: Path

    @property
    def run(self) -> Path:
        return self.root / RUN_FILE

    @property
    def status(self) -> Path:
        return self.root / STATUS_FILE

    @property
    def history(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def events(self) -> Path:
        return self.root / EVENTS_FILE

    @property
    def control(self) -> Path:
        return self.root / CONTROL_DIR

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def report_json(self) -> Path:
        return self.root / REPORT_JSON

    def is_run_dir(self) -> bool:
        """Whether the directory holds any of a run directory's files."""
        return any((self.root / name).exists() for name in RUN_MARKERS)
