"""Pre-flight checks: each one passes on good input and fails for the right reason."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from killsafe.errors import ConfigError
from killsafe.preflight import (
    Preflight,
    PreflightResult,
    add_cli_arguments,
    compare_trees,
    estimate_state_size,
    parse_size,
    run_cli,
    version_satisfies,
)
from killsafe.progress import format_size


def row(result: PreflightResult, name: str) -> Any:
    matches = [r for r in result.rows if r.name == name]
    assert len(matches) == 1, [r.name for r in result.rows]
    return matches[0]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def balanced(n: int) -> list[dict[str, Any]]:
    return [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


def test_a_good_setup_is_a_go(tmp_path: Path) -> None:
    data = tmp_path / "train.bin"
    data.write_bytes(b"\x00" * 100)
    result = Preflight(
        tmp_path / "run",
        state={"step": 3, "weights": b"\x01" * 1000},
        requires=["pytest>=7", "rich"],
        data=[data],
        jsonl=[{"path": write_jsonl(tmp_path / "d.jsonl", balanced(10)), "required": ["text"]}],
        round_trip=False,
    ).run()
    assert result.ok, result.format_table()
    assert [r.name for r in result.rows] == [
        "directory writable",
        "free disk",
        "existing checkpoints",
        "package pytest>=7",
        "package rich",
        f"data {data}",
        f"jsonl {tmp_path / 'd.jsonl'}",
    ]
    assert row(result, "directory writable").detail.endswith(
        "will be created (in " + str(tmp_path) + ")"
    )
    assert not (tmp_path / "run").exists()  # checking does not create the directory
    table = result.format_table()
    assert table.splitlines()[-1] == "GO: 7 checks, none failed"
    assert table.splitlines()[1].split() == ["CHECK", "RESULT", "DETAIL"]


def test_directory_under_a_file_is_not_writable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = Preflight(tmp_path / "file" / "run").run()
    check = row(result, "directory writable")
    assert not check.ok and "is not a directory" in check.detail
    assert not result.ok
    assert result.format_table().splitlines()[-1] == (
        "NO-GO: 1 of 3 checks failed (directory writable)"
    )


def test_directory_on_a_read_only_filesystem_is_not_writable() -> None:
    check = row(Preflight("/sys/killsafe-preflight-test").run(), "directory writable")
    assert check.status == "fail" and "cannot write in /sys" in check.detail


def test_free_disk_fails_for_an_absurd_state_size(tmp_path: Path) -> None:
    result = Preflight(tmp_path, state_size=10**18, keep_last=3).run()
    check = row(result, "free disk")
    assert check.status == "fail"
    assert check.detail.startswith("need ") and "(5 checkpoints of ~" in check.detail
    assert "free on" in check.detail
    assert "lower keep_last" in check.detail


def test_free_disk_passes_for_a_small_state_and_uses_the_estimate(tmp_path: Path) -> None:
    check = row(Preflight(tmp_path, state={"blob": b"x" * 2**20}, keep_last=1).run(), "free disk")
    assert check.status == "ok"
    assert "3 checkpoints of ~1.1 MiB" in check.detail


def test_free_disk_is_skipped_without_a_state(tmp_path: Path) -> None:
    assert row(Preflight(tmp_path).run(), "free disk").status == "skip"


def test_existing_checkpoints_are_pointed_out_but_do_not_fail(tmp_path: Path) -> None:
    from killsafe.store import CheckpointStore

    with CheckpointStore(tmp_path / "checkpoints") as store:
        for step in (100, 200):
            store.save({"step": step}, step=step, reason="periodic")
    result = Preflight(tmp_path).run()
    check = row(result, "existing checkpoints")
    assert check.status == "warn" and check.ok and result.ok
    assert "2 found, latest step 200 (" in check.detail
    assert "resume='auto'" in check.detail
    # Without a state, the newest checkpoint sizes the free disk check.
    size = CheckpointStore(tmp_path / "checkpoints").latest().size
    assert f"(5 checkpoints of ~{format_size(size)})" in row(result, "free disk").detail


def test_a_missing_package_fails_with_the_pip_line(tmp_path: Path) -> None:
    name = "killsafe-surely-not-installed-pkg"
    check = row(Preflight(tmp_path, requires=[f"{name}>=1.0"]).run(), f"package {name}>=1.0")
    assert check.status == "fail"
    assert check.detail == f"not installed; run: pip install '{name}>=1.0'"


def test_a_package_below_the_required_version_fails(tmp_path: Path) -> None:
    import importlib.metadata

    installed = importlib.metadata.version("pytest")
    check = row(Preflight(tmp_path, requires=["pytest >= 999.1"]).run(), "package pytest>=999.1")
    assert check.status == "fail"
    assert check.detail.startswith(f"installed {installed}, need >=999.1")


def test_a_package_whose_import_name_differs_is_found(tmp_path: Path) -> None:
    # The distribution "PyYAML" is imported as "yaml"; skip if it is absent here.
    if importlib.util.find_spec("yaml") is None:
        pytest.skip("PyYAML is not installed")
    assert row(Preflight(tmp_path, requires=["PyYAML"]).run(), "package PyYAML").ok


def test_a_malformed_requirement_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="NAME>=VERSION"):
        Preflight(tmp_path, requires=["torch >> 2"])


@pytest.mark.parametrize(
    ("installed", "op", "wanted", "expected"),
    [
        ("2.13.0+cpu", ">=", "2.0", True),
        ("1.9.1", ">=", "2.0", False),
        ("2.0", "==", "2.0.0", True),
        ("2.1", "~=", "2.0", True),
        ("3.0", "~=", "2.0", False),
        ("1.26.4", "<", "2", True),
        ("1.26.4", "!=", "1.26.4", False),
    ],
)
def test_version_comparison(installed: str, op: str, wanted: str, expected: bool) -> None:
    assert version_satisfies(installed, op, wanted) is expected


def test_data_files_must_exist_and_not_be_empty(tmp_path: Path) -> None:
    (tmp_path / "empty.bin").touch()
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    paths = [tmp_path / n for n in ("missing.bin", "empty.bin", "emptydir", "full")]
    result = Preflight(tmp_path, data=paths).run()
    details = {p.name: row(result, f"data {p}") for p in paths}
    assert details["missing.bin"].detail.endswith("does not exist")
    assert details["empty.bin"].detail.endswith("is empty (0 bytes)")
    assert details["emptydir"].detail.endswith("is an empty directory")
    assert details["full"].ok and details["full"].detail == "directory with 1 entries"


def jsonl_row(tmp_path: Path, records_or_text: Any, **spec: Any) -> Any:
    path = tmp_path / "data.jsonl"
    if isinstance(records_or_text, str):
        path.write_text(records_or_text)
    else:
        write_jsonl(path, records_or_text)
    return row(Preflight(tmp_path, jsonl=[{"path": path, **spec}]).run(), f"jsonl {path}")


def test_jsonl_that_does_not_parse_names_the_line(tmp_path: Path) -> None:
    check = jsonl_row(tmp_path, '{"a": 1}\n\n{"a": 2}\n{"a": \n')
    assert check.status == "fail" and check.detail.startswith("line 4: not valid JSON")
    check = jsonl_row(tmp_path, '{"a": 1}\n[1, 2]\n')
    assert check.detail == "line 2: a JSON list, not an object"


def test_jsonl_required_fields(tmp_path: Path) -> None:
    records = [*balanced(5), {"text": "no label"}]
    check = jsonl_row(tmp_path, records, required=["text", "label"])
    assert check.status == "fail" and check.detail == "line 6: missing field label"


def test_jsonl_min_count(tmp_path: Path) -> None:
    check = jsonl_row(tmp_path, balanced(40), min_count=100)
    assert check.status == "fail" and check.detail == "40 records, need at least 100"
    assert jsonl_row(tmp_path, balanced(100), min_count=100).ok
    assert jsonl_row(tmp_path, "").detail.endswith("holds no records")


def test_jsonl_class_balance(tmp_path: Path) -> None:
    skewed = [{"label": "pos"}] * 80 + [{"label": "neg"}] * 20
    check = jsonl_row(tmp_path, skewed, balance="label", max_ratio=3.0)
    assert check.status == "fail"
    assert check.detail == "100 records; label: pos=80 neg=20, ratio 4.00 > 3.00 allowed"
    check = jsonl_row(tmp_path, skewed, balance="label", max_ratio=5.0)
    assert check.ok and check.detail.endswith("ratio 4.00")
    one_class = [{"label": 1}] * 10
    check = jsonl_row(tmp_path, one_class, balance="label")
    assert check.status == "fail" and check.detail.endswith("only one class of label")


def test_jsonl_spec_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keys must be"):
        Preflight(tmp_path, jsonl=[{"path": "x", "minimum": 3}])
    with pytest.raises(ConfigError, match="max_ratio"):
        Preflight(tmp_path, jsonl=[{"path": "x", "balance": "y", "max_ratio": 0.5}])


def test_user_checks_pass_and_fail_by_their_return_value(tmp_path: Path) -> None:
    def raises() -> None:
        raise RuntimeError("CUDA out of memory while building the model")

    preflight = Preflight(tmp_path, checks=[("returns none", lambda: None)])
    preflight.add("returns true", lambda: True)
    preflight.add("returns false", lambda: False)
    preflight.add("returns a reason", lambda: "batch 0 has 3 samples,\nexpected 32")
    preflight.add("raises", raises)
    preflight.add("returns junk", lambda: 42)
    result = preflight.run()
    outcomes = {r.name: (r.status, r.detail) for r in result.rows[3:]}
    assert outcomes == {
        "returns none": ("ok", "passed"),
        "returns true": ("ok", "passed"),
        "returns false": ("fail", "returned False"),
        "returns a reason": ("fail", "batch 0 has 3 samples, expected 32"),
        "raises": ("fail", "RuntimeError: CUDA out of memory while building the model"),
        "returns junk": ("fail", "returned 42; return None/True to pass"),
    }
    assert not result.ok and len(result.failed) == 4
    with pytest.raises(ConfigError, match="not callable"):
        preflight.add("bad", "not a function")  # type: ignore[arg-type]


def test_result_as_json(tmp_path: Path) -> None:
    data = Preflight(tmp_path, state_size=10**18).run().to_json()
    assert data["ok"] is False
    assert data["rows"][1]["name"] == "free disk" and data["rows"][1]["ok"] is False
    json.dumps(data)


def test_estimate_state_size_counts_tensors_arrays_and_stateful_objects() -> None:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    model = torch.nn.Linear(100, 10)  # 1010 float32 parameters
    state = {"model": model, "buffer": np.zeros((256, 256), dtype=np.float64), "step": 5}
    size = estimate_state_size(state)
    payload = 1010 * 4 + 256 * 256 * 8
    assert payload < size < payload + 2 * 64 * 1024


def test_compare_trees_finds_every_kind_of_difference() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    base = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": np.arange(4, dtype=np.int64),
        "pair": (1, 2),
        "lr": 0.0,
        "nan": math.nan,
        "name": "x",
    }
    same = {
        "w": base["w"].clone(),
        "a": base["a"].copy(),
        "pair": (1, 2),
        "lr": 0.0,
        "nan": math.nan,
        "name": "x",
    }
    assert compare_trees(base, same) == []  # NaN equals itself bit for bit
    storage = torch.arange(10, dtype=torch.bfloat16)
    assert compare_trees({"s": storage[2:5]}, {"s": storage[2:5].clone()}) == []
    assert compare_trees({"s": storage[2:5]}, {"s": storage[3:6].clone()}) == [
        "state['s']: values differ"
    ]
    assert compare_trees({"e": storage[:0]}, {"e": storage[5:5]}) == []

    changed = dict(same)
    changed["w"] = base["w"].clone()
    changed["w"][1, 2] = torch.nextafter(changed["w"][1, 2], torch.tensor(100.0))
    changed["a"] = base["a"].astype(np.int32)
    changed["pair"] = [1, 2]
    changed["lr"] = -0.0
    del changed["name"]
    problems = compare_trees(base, changed)
    assert "state['w']: values differ" in problems
    assert "state['a']: int64[4] became int32[4]" in problems
    assert "state['pair']: tuple became list" in problems
    assert "state['lr']: 0.0 became -0.0" in problems
    assert any(p.startswith("state: keys differ (missing ['name']") for p in problems)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("512", 512), ("2k", 2048), ("20MB", 20 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("2G", 2**31)],
)
def test_parse_size(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


def test_parse_size_refuses_nonsense() -> None:
    with pytest.raises(ConfigError, match="not understood"):
        parse_size("lots")


HAS_STORE = importlib.util.find_spec("killsafe.store") is not None


@pytest.mark.skipif(not HAS_STORE, reason="the checkpoint store has not landed in this tree")
def test_round_trip_of_a_real_state_passes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    check = row(
        Preflight(tmp_path, state={"model": model, "optimizer": optimizer, "epoch": 1}).run(),
        "save/load round trip",
    )
    assert check.status == "ok", check.detail
    assert "bit for bit, restored into 2 object(s)" in check.detail


@pytest.mark.skipif(not HAS_STORE, reason="the checkpoint store has not landed in this tree")
def test_round_trip_of_an_unsaveable_state_fails_with_the_path(tmp_path: Path) -> None:
    check = row(
        Preflight(tmp_path, state={"config": {"callback": print}}).run(), "save/load round trip"
    )
    assert check.status == "fail"
    assert "callback" in check.detail


class Schedule:
    """A Stateful whose ``load_state_dict`` has a bug: it turns the milestones into a list."""

    def __init__(self) -> None:
        self.milestones = (10, 20)
        self.epoch = 3

    def state_dict(self) -> dict[str, Any]:
        return {"milestones": self.milestones, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.milestones = list(state["milestones"])
        self.epoch = state["epoch"]


class Loader:
    """A Stateful that cannot take its own state back."""

    def state_dict(self) -> dict[str, Any]:
        return {"position": 5}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise KeyError("offset")


@pytest.mark.skipif(not HAS_STORE, reason="the checkpoint store has not landed in this tree")
def test_round_trip_restores_into_the_objects_and_catches_what_does_not_come_back(
    tmp_path: Path,
) -> None:
    check = row(Preflight(tmp_path, state={"schedule": Schedule()}).run(), "save/load round trip")
    assert check.status == "fail"
    assert check.detail == (
        "state after restore differs: state['schedule']['milestones']: tuple became list"
    )
    check = row(Preflight(tmp_path, state={"loader": Loader()}).run(), "save/load round trip")
    assert check.status == "fail"
    assert check.detail.startswith("saved and loaded, but not restored: ")
    assert "loader: 'offset'" in check.detail


def cli_args(*argv: str) -> argparse.Namespace:
    return add_cli_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_go_no_go_and_bad_input(tmp_path: Path, capsys: Any) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", balanced(20))
    go = cli_args(
        "--dir", str(tmp_path / "run"), "--require", "pytest>=7", "--state-size", "1MiB",
        "--jsonl", str(data), "--field", "text", "--field", "label", "--min-count", "10",
        "--balance", "label",
    )  # fmt: skip
    assert run_cli(go) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("GO: ")
    assert "20 records; label: neg=10 pos=10, ratio 1.00" in out

    no_go = cli_args("--dir", str(tmp_path), "--jsonl", str(data), "--min-count", "1000", "--json")
    assert run_cli(no_go) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert [r["name"] for r in result["rows"] if not r["ok"]] == [f"jsonl {data}"]

    assert run_cli(cli_args("--state-size", "huge")) == 2
    assert "not understood" in capsys.readouterr().err
    assert run_cli(cli_args("--field", "text")) == 2
    assert "--jsonl" in capsys.readouterr().err
    assert run_cli(cli_args("--require", "torch>>2")) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_free_disk_no_go(tmp_path: Path, capsys: Any) -> None:
    total = shutil.disk_usage(tmp_path).total
    args = cli_args("--dir", str(tmp_path), "--state-size", str(total), "--keep-last", "1")
    assert run_cli(args) == 1
    assert "free disk" in capsys.readouterr().out.splitlines()[-1]


def test_cli_on_an_existing_run_says_it_exists_and_what_it_holds(tmp_path: Path) -> None:
    make_run = (
        "import killsafe\n"
        "with killsafe.Run('runs/exp', total_steps=3, save_every_steps=1, progress=False) as run:\n"
        "    for _ in run.steps():\n"
        "        pass\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", make_run], cwd=tmp_path, env=env, check=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")

    def writable(directory: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "killsafe", "preflight", "--dir", directory],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        (line,) = [row for row in done.stdout.splitlines() if row.startswith("directory writable")]
        return line.split(None, 3)[3]

    assert writable("runs/exp") == "runs/exp exists: a run with 3 checkpoints"
    assert writable(str(tmp_path / "runs" / "exp")).endswith("exists: a run with 3 checkpoints")
    assert writable("empty") == "empty exists: empty"
    assert writable("other") == "other exists: 1 entry, no run"
    assert writable("runs/new") == f"runs/new will be created (in {tmp_path / 'runs'})"
