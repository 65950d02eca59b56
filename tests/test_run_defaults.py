"""What a run does when the script asks for nothing: it still saves."""

from __future__ import annotations

from pathlib import Path

from killsafe.run.config import RunConfig


def test_with_no_policy_a_run_saves_every_ten_minutes(tmp_path: Path) -> None:
    def policies(**kwargs: object) -> str:
        return repr(RunConfig.build(tmp_path, **kwargs).save_policy)  # type: ignore[arg-type]

    assert "EveryNSeconds(seconds=600.0)" in policies()
    assert "EveryNSeconds" not in policies(save_every_steps=5)
    assert "EveryNSeconds(seconds=60.0)" in policies(save_every_seconds=60)
    assert "EveryNSeconds" not in policies(save_on_exit=False)
