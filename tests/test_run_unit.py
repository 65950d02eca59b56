"""``Run`` in-process: tracking, restoring, policies at boundaries, records, callbacks, flags."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from killsafe.arguments import add_arguments, options_from_args
from killsafe.errors import CheckpointNotFound, ConfigError, StateMismatch, UnsupportedState
from killsafe.policy import EarlyStopping, EveryNSteps, OnImprovement
from killsafe.run import Run
from killsafe.rundir import read_jsonl


class Counter:
    """A tiny Stateful object."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


def _manifests(run_dir: Path) -> list[dict[str, Any]]:
    root = run_dir / "checkpoints"
    found = [json.loads((p / "manifest.json").read_text()) for p in root.glob("step-*")]
    return sorted(found, key=lambda m: m["step"])


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["kind"] == kind]


def test_steps_yield_from_the_restored_step_and_state_comes_back(tmp_path: Path) -> None:
    counter, values = Counter(), {"seen": []}
    with Run(tmp_path, total_steps=5, save_every_steps=2, progress=False) as run:
        run.track(counter=counter, values=values)
        for step in run.steps():
            counter.value += 1
            values["seen"].append(step)
            if step == 2:
                run.stop("test")
    assert run.step == 3
    assert run.exit_reason == "test"
    assert [m["step"] for m in _manifests(tmp_path)] == [2, 3]
    assert _manifests(tmp_path)[-1]["reason"] == "test"

    counter2, values2 = Counter(), {"seen": []}
    with Run(tmp_path, total_steps=5, progress=False) as run:
        restored = run.track(counter=counter2, values=values2)
        assert restored["values"] is values2  # a dict is restored in place
        assert run.resumed_from is not None and run.resumed_from.step == 3
        assert counter2.value == 3
        assert list(run.steps()) == [3, 4]
    assert values2["seen"] == [0, 1, 2]
    assert run.exit_reason == "finished"


def test_plain_values_are_read_and_updated_through_run_state(tmp_path: Path) -> None:
    with Run(tmp_path, total_steps=3, progress=False) as run:
        run.track(best_score=0.0)
        for step in run.steps():
            run.state["best_score"] = float(step)
    with Run(tmp_path, total_steps=4, progress=False) as run:
        assert run.track(best_score=-1.0) == {"best_score": 2.0}
        assert run.state["best_score"] == 2.0


def test_an_unsaveable_value_fails_at_track(tmp_path: Path) -> None:
    with Run(tmp_path, progress=False) as run, pytest.raises(UnsupportedState):
        run.track(config={"callback": lambda: None})


def test_a_checkpoint_that_does_not_fit_is_a_state_mismatch(tmp_path: Path) -> None:
    with Run(tmp_path, total_steps=2, progress=False) as run:
        run.track(counter=Counter())
        for _ in run.steps():
            pass
    with Run(tmp_path, total_steps=4, progress=False) as run, pytest.raises(StateMismatch) as err:
        run.track(other=Counter())
    assert "other" in str(err.value) and "counter" in str(err.value)


def test_reserved_names_are_refused(tmp_path: Path) -> None:
    with Run(tmp_path, progress=False) as run, pytest.raises(ConfigError):
        run.track(__rng__=1)


def test_a_missing_explicit_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound), Run(tmp_path, resume=42, progress=False):
        pass


def test_no_duplicate_checkpoint_when_a_periodic_save_lands_on_the_last_step(
    tmp_path: Path,
) -> None:
    with Run(tmp_path, total_steps=6, save_every_steps=3, progress=False) as run:
        for _ in run.steps():
            pass
    assert [(m["step"], m["reason"]) for m in _manifests(tmp_path)] == [
        (3, "periodic"),
        (6, "finished"),
    ]
    assert len(_events(tmp_path, "saved")) == 2


def test_save_inside_the_loop_happens_at_the_boundary_and_outside_at_once(
    tmp_path: Path,
) -> None:
    with Run(tmp_path, total_steps=4, save_on_exit=False, progress=False) as run:
        run.track(counter=Counter())
        for step in run.steps():
            if step == 1:
                run.save(name="warm")
                assert _manifests(tmp_path) == []
        run.save()
    manifests = _manifests(tmp_path)
    assert [(m["step"], m["name"], m["reason"]) for m in manifests] == [
        (2, "warm", "request"),
        (4, None, "request"),
    ]


def test_save_on_improvement_and_best_are_tracked_across_a_resume(tmp_path: Path) -> None:
    losses = [5.0, 4.0, 4.5, 3.0, 3.5]
    kwargs: dict[str, Any] = dict(
        save=OnImprovement("loss"), keep_last=None, save_on_exit=False, progress=False
    )
    with Run(tmp_path, total_steps=2, **kwargs) as run:
        for step in run.steps():
            run.log(loss=losses[step])
    with Run(tmp_path, total_steps=5, **kwargs) as run:
        for step in run.steps():
            run.log(loss=losses[step])
    assert [(m["step"], m["reason"]) for m in _manifests(tmp_path)] == [
        (1, "best"),
        (2, "best"),
        (4, "best"),
    ]


def test_early_stopping_keeps_its_patience_across_a_resume(tmp_path: Path) -> None:
    values = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9]

    def run_until(total: int) -> Run:
        stopper = EarlyStopping("val", patience=3)
        with Run(tmp_path, total_steps=total, stop_policy=stopper, progress=False) as run:
            for step in run.steps():
                run.log(val=values[step])
        return run

    first = run_until(4)  # two evaluations without improvement so far
    assert first.exit_reason == "finished"
    second = run_until(6)
    assert second.exit_reason == "early-stop"
    assert second.step == 5
    assert _manifests(tmp_path)[-1]["reason"] == "early-stop"


def test_history_is_truncated_after_the_resumed_step(tmp_path: Path) -> None:
    with Run(tmp_path, total_steps=10, save_every_steps=4, progress=False) as run:
        for step in run.steps():
            run.log(x=step)
            if step == 5:
                break
    # Simulate a crash after the checkpoint at 6: drop it, keep the history.
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "step-000006")
    with Run(tmp_path, total_steps=7, progress=False) as run:
        assert run.step == 4
        for step in run.steps():
            run.log(x=step)
    steps = [r["step"] for r in read_jsonl(tmp_path / "history.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


def test_callbacks_are_called_and_a_failing_one_is_only_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def failing(run: Run, *args: Any) -> None:
        calls.append("stop")
        raise RuntimeError("notification service down")

    with (
        caplog.at_level(logging.ERROR, logger="killsafe"),
        Run(
            tmp_path,
            total_steps=3,
            save_every_steps=1,
            progress=False,
            on_save=lambda run, info: calls.append(f"save {info.step}"),
            on_stop=failing,
            on_finish=lambda run: calls.append("finish"),
        ) as run,
    ):
        for step in run.steps():
            if step == 1:
                run.stop("enough")
    assert calls == ["save 1", "save 2", "stop"]
    assert "on_stop callback failed" in caplog.text

    errors: list[str] = []
    with (
        pytest.raises(ValueError),
        Run(
            tmp_path / "b", on_error=lambda run, exc: errors.append(str(exc)), progress=False
        ) as run,
    ):
        for _ in run.steps():
            raise ValueError("bad batch")
    assert errors == ["bad batch"]


def test_summary_phase_and_counters_reach_the_run_files(tmp_path: Path) -> None:
    with Run(tmp_path, total_steps=2, progress=False, config={"lr": 0.1}) as run:
        run.set_phase("warmup")
        run.count("episodes", 7, total=10)
        for _ in run.steps():
            pass
        run.summary(accuracy=0.9)
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["summary"] == {"accuracy": 0.9}
    assert data["config"]["user"] == {"lr": 0.1}
    assert data["config"]["total_steps"] == 2
    assert data["sessions"][0]["cpu_seconds"] > 0
    assert data["sessions"][0]["peak_rss_bytes"] > 0
    assert "accuracy" in (tmp_path / "report.txt").read_text()  # written at exit
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["phase"] == "warmup"
    assert status["counters"]["episodes"]["value"] == 7
    assert status["state"] == "finished"


def test_signal_handlers_are_restored_and_no_thread_is_left(tmp_path: Path) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = set(threading.enumerate())
    with Run(tmp_path, total_steps=3, signals=["SIGUSR2"], progress=True) as run:
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
        for _ in run.steps():
            pass
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    assert set(threading.enumerate()) <= threads


def test_the_loop_can_be_left_with_break(tmp_path: Path) -> None:
    with Run(tmp_path, progress=False) as run:
        for step in run.steps():
            if step == 4:
                break
    assert run.step == 5
    assert run.exit_reason == "finished"  # no step count to reach
    assert _manifests(tmp_path)[-1]["step"] == 5
    with Run(tmp_path / "counted", total_steps=10, progress=False) as run:
        for step in run.steps():
            if step == 2:
                break
    assert run.exit_reason == "exit"
    assert _manifests(tmp_path / "counted")[-1]["reason"] == "exit"
    data = json.loads((tmp_path / "counted" / "run.json").read_text())
    assert data["status"] == "stopped"


def test_a_run_is_used_inside_its_with_block(tmp_path: Path) -> None:
    run = Run(tmp_path)
    with pytest.raises(ConfigError):
        run.log(loss=1.0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"total_steps": -1}, ConfigError),
        ({"best": ("loss", "lowest")}, ConfigError),
        ({"save": "every 5"}, ConfigError),
        ({"stop_after": "soon"}, ConfigError),
        ({"save_every_steps": 0}, ConfigError),
    ],
)
def test_bad_options_fail_when_the_run_is_built(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Run(tmp_path, **kwargs)


def test_add_arguments_and_from_args(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--dir",
            str(tmp_path),
            "--resume",
            "never",
            "--save-every",
            "5",
            "--save-every-seconds",
            "10m",
            "--save-every-epochs",
            "2",
            "--keep-last",
            "2",
            "--stop-after",
            "3h50m",
            "--progress-every",
            "5",
            "--serve",
            "--clear",
        ]
    )
    options = options_from_args(args, total_steps=100, save_every_steps=50)
    assert options == {
        "directory": str(tmp_path),
        "resume": "never",
        "save_every_steps": 5,
        "save_every_seconds": 600.0,
        "save_every_epochs": 2,
        "keep_last": 2,
        "stop_after": 13800.0,
        "progress_every": 5.0,
        "serve": True,
        "clear": True,
        "total_steps": 100,
    }
    run = Run.from_args(parser.parse_args(["--dir", str(tmp_path)]), total_steps=7)
    assert run.total_steps == 7
    assert run.directory == tmp_path


def test_flags_not_given_leave_the_script_defaults(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, directory=str(tmp_path / "default"))
    args = parser.parse_args(["--serve", "8123"])
    options = options_from_args(args, save_every_steps=50, resume="ask")
    assert options == {
        "directory": str(tmp_path / "default"),
        "save_every_steps": 50,
        "resume": "ask",
        "serve": 8123,
    }


@pytest.mark.parametrize(
    "argv", [["--save-every", "0"], ["--stop-after", "soon"], ["--serve", "http"]]
)
def test_bad_flags_are_usage_errors(argv: list[str], tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, directory=str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2


def test_the_dir_flag_is_required_without_a_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_every_n_steps_policy_object_can_be_passed(tmp_path: Path) -> None:
    with Run(
        tmp_path, total_steps=4, save=EveryNSteps(2), save_on_exit=False, progress=False
    ) as run:
        for _ in run.steps():
            pass
    assert [m["step"] for m in _manifests(tmp_path)] == [2, 4]


def test_a_model_of_another_shape_is_a_state_mismatch_naming_it(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with Run(tmp_path, total_steps=1, progress=False, report=False) as run:
        run.track(model=torch.nn.Linear(2, 3))
        for _ in run.steps():
            pass
    with (
        Run(tmp_path, total_steps=2, progress=False, report=False) as run,
        pytest.raises(StateMismatch) as err,
    ):
        run.track(model=torch.nn.Linear(2, 4))
    message = str(err.value)
    assert "model.weight shape (3, 2) in the checkpoint, (4, 2) now" in message
    assert "model.bias shape (3,) in the checkpoint, (4,) now" in message
    assert "\n" not in message


def test_a_model_with_other_keys_lists_them(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    with Run(tmp_path, total_steps=1, progress=False, report=False) as run:
        run.track(model=torch.nn.Sequential(torch.nn.Linear(2, 2)))
        for _ in run.steps():
            pass
    other = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with (
        Run(tmp_path, total_steps=2, progress=False, report=False) as run,
        pytest.raises(StateMismatch) as err,
    ):
        run.track(model=other)
    assert "model.1.weight missing from the checkpoint" in str(err.value)
    assert "model.1.bias missing from the checkpoint" in str(err.value)


def test_auto_skips_a_corrupt_newest_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    np = pytest.importorskip("numpy")
    weights = np.zeros(64)
    with Run(tmp_path, total_steps=4, save_every_steps=2, progress=False, report=False) as run:
        run.track(weights=weights)
        for step in run.steps():
            weights += step
    newest = tmp_path / "checkpoints" / "step-000004"
    payload = next(p for p in newest.iterdir() if p.name.startswith("tensors"))
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0xFF
    payload.write_bytes(bytes(data))
    restored = np.full(64, -1.0)
    with (
        caplog.at_level(logging.WARNING, logger="killsafe"),
        Run(tmp_path, total_steps=4, progress=False, report=False) as run,
    ):
        run.track(weights=restored)
        assert run.step == 2
        assert restored.tolist() == [1.0] * 64  # steps 0 and 1, in place
    assert "skipping corrupt checkpoint" in caplog.text
