"""history.jsonl: append, truncate after a resume, torn lines, CSV and TensorBoard."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from killsafe.errors import ConfigError
from killsafe.history import History, read_history, write_csv


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_append_writes_one_flat_json_line_per_call(tmp_path: Path) -> None:
    history = History(tmp_path / "run")
    history.append(1, {"loss": 0.5})
    history.append(2, {"loss": 0.25, "phase": "train"})
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 1 and first["loss"] == 0.5 and isinstance(first["time"], float)
    assert [r["step"] for r in history.records()] == [1, 2]
    assert history.records()[1]["phase"] == "train"


def test_reserved_metric_names_are_refused(tmp_path: Path) -> None:
    history = History(tmp_path)
    with pytest.raises(ConfigError, match="'step' is reserved"):
        history.append(1, {"step": 3})
    with pytest.raises(ConfigError, match="cannot log"):
        history.append(1, {"model": object()})
    assert history.records() == []


def test_truncate_after_drops_later_steps_and_keeps_the_rest_verbatim(tmp_path: Path) -> None:
    history = History(tmp_path)
    for step in range(1, 8):
        history.append(step, {"loss": 1.0 / step})
    before = (tmp_path / "history.jsonl").read_text().splitlines()
    assert history.truncate_after(4) == 3
    after = (tmp_path / "history.jsonl").read_text().splitlines()
    assert after == before[:4]
    # The resumed session continues: no step appears twice.
    for step in range(5, 9):
        history.append(step, {"loss": 0.0})
    assert [r["step"] for r in history.records()] == list(range(1, 9))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_truncate_after_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 1, "time": 1.0, "loss": 1}\n{"step": 2, "time": 2.0, "lo')
    history = History(tmp_path)
    assert history.truncate_after(10) == 1
    assert path.read_text() == '{"step": 1, "time": 1.0, "loss": 1}\n'


def test_append_after_a_crash_does_not_glue_onto_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 1, "time": 1.0}\n{"step": 2, "ti')
    History(tmp_path).append(3, {"loss": 0.1})
    assert [r["step"] for r in read_history(tmp_path)] == [1, 3]
    assert path.read_text().endswith("\n")


def test_a_crash_while_appending_from_a_real_process_leaves_a_readable_history(
    tmp_path: Path,
) -> None:
    code = (
        "import os, sys\n"
        "from killsafe.history import History\n"
        "h = History(sys.argv[1])\n"
        "for step in range(1, 51):\n"
        "    h.append(step, {'loss': 1.0 / step})\n"
        'os.write(os.open(h.path, os.O_WRONLY | os.O_APPEND), b\'{"step": 51, "ti\')\n'
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert len(read_history(tmp_path)) == 50
    history = History(tmp_path)
    history.truncate_after(40)
    assert [r["step"] for r in history.records()] == list(range(1, 41))


def test_to_csv_has_step_time_then_metrics_in_first_seen_order(tmp_path: Path) -> None:
    history = History(tmp_path)
    history.append(1, {"loss": 0.5})
    history.append(2, {"acc": 0.9, "loss": 0.4})
    history.append(3, {"note": "a,b", "loss": None})
    out = history.to_csv(tmp_path / "export.csv")
    rows = read_csv(out)
    assert rows[0] == ["step", "time", "loss", "acc", "note"]
    assert rows[1][0] == "1" and rows[1][2] == "0.5" and rows[1][3] == ""
    assert rows[2][2:4] == ["0.4", "0.9"]
    assert rows[3][2:] == ["", "", "a,b"]


def test_metrics_csv_follows_the_run_and_its_truncation(tmp_path: Path) -> None:
    history = History(tmp_path, csv=True)
    history.append(1, {"loss": 0.5})
    history.append(2, {"loss": 0.4})
    assert read_csv(tmp_path / "metrics.csv")[0] == ["step", "time", "loss"]
    history.append(3, {"loss": 0.3, "val_loss": 0.35})  # a new column rewrites the header
    rows = read_csv(tmp_path / "metrics.csv")
    assert rows[0] == ["step", "time", "loss", "val_loss"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    assert rows[1][3] == "" and rows[3][3] == "0.35"

    resumed = History(tmp_path, csv=True)
    resumed.truncate_after(1)
    resumed.append(2, {"loss": 0.45})
    rows = read_csv(tmp_path / "metrics.csv")
    assert rows[0] == ["step", "time", "loss"]
    assert [r[0] for r in rows[1:]] == ["1", "2"]
    assert rows[2][2] == "0.45"
    exported = read_csv(resumed.to_csv(tmp_path / "x.csv"))
    assert read_csv(tmp_path / "metrics.csv") == exported


def test_write_csv_of_no_records_has_only_the_header(tmp_path: Path) -> None:
    assert read_csv(write_csv([], tmp_path / "empty.csv")) == [["step", "time"]]


def test_scalar_tensors_and_arrays_are_logged_as_numbers(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    history = History(tmp_path)
    history.append(1, {"loss": np.float32(0.5), "count": np.int64(3)})
    record = history.records()[0]
    assert record["loss"] == 0.5 and record["count"] == 3


HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_without_the_package_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        History(tmp_path, tensorboard=True)


def test_tensorboard_missing_message_names_the_pip_line(tmp_path: Path) -> None:
    # Hide the package from a fresh interpreter to exercise the missing-package path
    # whether or not it is installed here.
    code = (
        "import sys\n"
        "sys.modules['tensorboard'] = None\n"
        "import importlib.util\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'tensorboard' else real(n, *a)\n"
        "from killsafe.history import History\n"
        "from killsafe.errors import ConfigError\n"
        "try:\n"
        "    History(sys.argv[1], tensorboard=True)\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert "pip install tensorboard" in out.stdout


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_scalars_continue_across_a_resume(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = History(tmp_path, tensorboard=True)
    for step in range(1, 6):
        first.append(step, {"loss": float(step), "name": "text is not a scalar"})
    first.close()

    resumed = History(tmp_path, tensorboard=True)
    resumed.truncate_after(3)
    for step in range(4, 7):
        resumed.append(step, {"loss": 10.0 * step})
    resumed.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["loss"]
    points = [(e.step, e.value) for e in events.Scalars("loss")]
    assert points == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_the_tensorboard_mirror_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from killsafe.history import History\n"
        "h = History(sys.argv[1], tensorboard=True)\n"
        "h.append(1, {'loss': 0.5})\n"
        "h.close()\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
