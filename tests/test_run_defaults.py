"""What a run does when the script asks for nothing: it still saves, and says how."""

from __future__ import annotations

from pathlib import Path

import pytest

from killsafe.errors import ConfigError
from killsafe.policy import (
    Boundary,
    EveryEpochOrNSeconds,
    EveryNEpochs,
    EveryNSteps,
    OnImprovement,
    describe_save_policy,
)
from killsafe.run.config import RunConfig


def policies(tmp_path: Path, **kwargs: object) -> str:
    return repr(RunConfig.build(tmp_path, **kwargs).save_policy)  # type: ignore[arg-type]


def test_with_no_policy_a_run_saves_every_epoch_or_every_ten_minutes(tmp_path: Path) -> None:
    assert "EveryEpochOrNSeconds(seconds=600.0)" in policies(tmp_path)
    assert "EveryEpochOrNSeconds" not in policies(tmp_path, save_every_steps=5)
    assert "EveryEpochOrNSeconds" not in policies(tmp_path, save_every_epochs=2)
    assert "EveryEpochOrNSeconds" not in policies(tmp_path, save=EveryNSteps(3))
    assert "EveryNSeconds(seconds=60.0)" in policies(tmp_path, save_every_seconds=60)
    assert "EveryEpochOrNSeconds" not in policies(tmp_path, save_on_exit=False)
    assert "EveryNEpochs(n=2)" in policies(tmp_path, save_every_epochs=2)


def test_the_default_saves_at_epoch_ends_with_epochs_else_after_ten_minutes() -> None:
    default = EveryEpochOrNSeconds(600.0)
    assert default.should_save(Boundary(step=9, since_save=599.0)) is None
    assert default.should_save(Boundary(step=9, since_save=600.0)) == "periodic"
    # With run.epochs() the clock does not count; the end of each epoch does.
    assert default.should_save(Boundary(step=9, since_save=9999.0, epoch=1)) is None
    assert default.should_save(Boundary(step=9, epoch=2, epoch_end=True)) == "periodic"


def test_save_every_epochs_saves_at_every_nth_epoch_end_only() -> None:
    every_two = EveryNEpochs(2)
    ends = [every_two.should_save(Boundary(step=5 * e, epoch=e, epoch_end=True)) for e in (1, 2)]
    assert ends == [None, "periodic"]
    assert every_two.should_save(Boundary(step=10, epoch=2)) is None  # mid-epoch
    assert every_two.should_save(Boundary(step=10)) is None  # a flat loop
    with pytest.raises(ConfigError, match="positive integer"):
        EveryNEpochs(0)
    with pytest.raises(ConfigError, match="positive integer"):
        RunConfig.build("unused", save_every_epochs=-1)


@pytest.mark.parametrize(
    ("keywords", "epochs", "expected"),
    [
        ({}, True, "every epoch and on exit"),
        ({}, False, "every 10 min and on exit"),
        ({}, None, "every epoch with run.epochs(), else every 10 min and on exit"),
        (
            {"save_every_steps": 500, "save_every_seconds": "5m"},
            False,
            "every 500 steps, every 5 min and on exit",
        ),
        ({"save_every_epochs": 3}, True, "every 3 epochs and on exit"),
        ({"save_every_seconds": 90}, None, "every 1 min 30 s and on exit"),
        ({"save_every_seconds": "2h", "save_on_exit": False}, None, "every 2 h"),
        ({"save_on_exit": False}, None, "only on request"),
        ({"save": OnImprovement("val_loss")}, None, "when val_loss improves and on exit"),
    ],
)
def test_the_save_policy_is_described_in_one_line(
    tmp_path: Path, keywords: dict[str, object], epochs: bool | None, expected: str
) -> None:
    config = RunConfig.build(tmp_path, **keywords)  # type: ignore[arg-type]
    assert describe_save_policy(config.save_policy, epochs=epochs) == expected
