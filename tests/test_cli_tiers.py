"""``killsafe list`` on a run with a mirror: each checkpoint is local, mirrored or both.

In-process against ``memory://`` (a memory area lives in one process), and as
real processes against the session's SeaweedFS server.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_helpers import cli, cli_json
from mirror_helpers import wait_for_upload

import killsafe
from killsafe.cli import main


def mirrored_run(directory: Path, mirror: str) -> None:
    """50 steps saved every 10: the local store keeps 50, the mirror 30, 40 and 50.

    Saves are synchronous and each step after a save waits for its upload, so
    that no checkpoint is superseded in the upload queue by the next one.
    """
    rng = np.random.default_rng(0)
    with killsafe.Run(
        directory,
        total_steps=50,
        save_every_steps=10,
        keep_last=1,
        mirror=mirror,
        mirror_keep_last=3,
        async_save=False,
        progress=False,
        keyboard=False,
        report=False,
    ) as run:
        run.track(rng=rng, weights=np.zeros(8))
        for step in run.steps():
            if step % 10 == 0 and step:
                wait_for_upload(mirror, step)
            run.state["weights"] += rng.normal(size=8)


def save_local_only(directory: Path, step: int) -> None:
    """A checkpoint whose upload never happened (a session killed before it)."""
    with killsafe.CheckpointStore(directory / "checkpoints") as store:
        store.save({"weights": np.ones(8)}, step=step)


def list_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(["list", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def tiers(listed: Any) -> dict[int, str]:
    return {c["step"]: c["tier"] for c in listed["checkpoints"]}


def test_list_shows_the_tier_of_each_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"memory://tiers-{uuid.uuid4().hex[:8]}/exp"
    mirrored_run(tmp_path / "run", url)
    save_local_only(tmp_path / "run", 60)
    listed = list_json(capsys, str(tmp_path / "run"))
    assert listed["mirror"] == url
    assert tiers(listed) == {30: "mirrored", 40: "mirrored", 50: "both", 60: "local"}
    paths = {c["step"]: c["path"] for c in listed["checkpoints"]}
    assert paths[30] == f"{url}/step-000030" and paths[50].startswith(str(tmp_path))
    assert [c["step"] for c in listed["checkpoints"] if c["latest"]] == [60]

    assert main(["list", str(tmp_path / "run")]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[-2:] == ["tier", "marks"]
    assert [row.split()[0] for row in rows] == ["30", "40", "50", "60"]
    assert "mirrored" in rows[0] and "both" in rows[2] and "local" in rows[3]


def test_list_matches_copies_by_step_and_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"memory://tiers-{uuid.uuid4().hex[:8]}/exp"
    mirrored_run(tmp_path / "run", url)
    with killsafe.CheckpointStore(url) as remote:  # same step as a local one, another name
        remote.save({"weights": np.ones(8)}, step=50, name="exported")
    listed = list_json(capsys, str(tmp_path / "run"))
    rows = [(c["step"], c["name"], c["tier"]) for c in listed["checkpoints"]]
    assert (50, None, "both") in rows and (50, "exported", "mirrored") in rows


def test_a_mirror_in_a_directory_is_listed_as_one_in_a_bucket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror = tmp_path / "nfs" / "exp"  # a mounted network file system
    mirrored_run(tmp_path / "run", str(mirror))
    listed = list_json(capsys, str(tmp_path / "run"))
    assert listed["mirror"] == str(mirror)
    assert tiers(listed) == {30: "mirrored", 40: "mirrored", 50: "both"}


def test_a_run_directory_without_checkpoints_lists_its_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A job whose nodes share no disk: rank 0 keeps the run files, the mirror the rest.
    url = f"memory://tiers-{uuid.uuid4().hex[:8]}/exp"
    mirrored_run(tmp_path / "run", url)
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    assert tiers(list_json(capsys, str(tmp_path / "run"))) == {
        30: "mirrored",
        40: "mirrored",
        50: "mirrored",
    }


def test_a_run_without_mirror_lists_without_tiers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_local_only(tmp_path / "run", 10)
    (tmp_path / "run/run.json").write_text(json.dumps({"config": {"mirror": None}}))
    listed = list_json(capsys, str(tmp_path / "run"))
    assert listed["mirror"] is None and tiers(listed) == {10: None}
    assert main(["list", str(tmp_path / "run")]) == 0
    assert "tier" not in capsys.readouterr().out.splitlines()[0]


def test_a_garbled_run_json_lists_the_local_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_local_only(tmp_path / "run", 10)
    (tmp_path / "run/run.json").write_text("{not json")
    listed = list_json(capsys, str(tmp_path / "run"), "--metric", "loss")
    assert listed["mirror"] is None and tiers(listed) == {10: None}


def test_an_unreadable_mirror_is_one_line_and_the_local_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_local_only(tmp_path / "run", 10)
    (tmp_path / "run/run.json").write_text(json.dumps({"config": {"mirror": "memory:///nowhere"}}))
    assert main(["list", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split()[0] == "10"
    assert len(captured.err.strip().splitlines()) == 1
    assert "the mirror memory:///nowhere could not be read" in captured.err


def test_list_on_a_real_s3_mirror_as_processes(tmp_path: Path, s3_url: str) -> None:
    mirrored_run(tmp_path / "run", s3_url)
    save_local_only(tmp_path / "run", 60)
    with killsafe.CheckpointStore(s3_url) as remote:  # a slow upload skips superseded steps
        remote.save({"weights": np.ones(8)}, step=5)
        uploaded = [info.step for info in remote.list()]
    listed = cli_json("list", tmp_path / "run")
    expected = {step: "mirrored" for step in uploaded} | {50: "both", 60: "local"}
    assert tiers(listed) == expected and expected[5] == "mirrored"
    # The mirror URL itself lists the mirror (the run's files under run/ are no checkpoint).
    remote_listed = cli_json("list", s3_url)
    assert [c["step"] for c in remote_listed["checkpoints"]] == uploaded
    assert remote_listed["checkpoints"][-1]["latest"] and remote_listed["mirror"] is None
    out = cli("list", tmp_path / "run", "--verify")
    assert out.returncode == 0, out.stderr
    assert "both" in out.stdout and "mirrored" in out.stdout


@pytest.mark.parametrize("url", ["gcs://bucket/exp", "s3a://bucket/exp"])
def test_a_url_of_an_unknown_scheme_is_bad_input_not_a_missing_directory(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["list", url])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown storage scheme" in error and url in error


def test_a_file_url_is_its_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_local_only(tmp_path / "run", 10)
    listed = list_json(capsys, f"file://{tmp_path / 'run'}")
    assert [c["step"] for c in listed["checkpoints"]] == [10]


def test_a_mirror_of_an_unknown_scheme_in_run_json_is_ignored_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_local_only(tmp_path / "run", 10)
    (tmp_path / "run/run.json").write_text(json.dumps({"config": {"mirror": "gcs://b/exp"}}))
    assert main(["list", str(tmp_path / "run"), "--json"]) == 0
    captured = capsys.readouterr()
    assert [c["step"] for c in json.loads(captured.out)["checkpoints"]] == [10]
    assert captured.err.count("\n") == 1 and "gcs://b/exp" in captured.err
