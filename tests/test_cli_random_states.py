"""Random generator states in ``inspect`` and ``diff``, and one checkpoint size everywhere,
through real runs (subprocesses) and the command line's ``main`` (in-process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli_in_process, cli_json_in_process

pytest.importorskip("torch")

_SCRIPT = """
import random, sys
import torch
import killsafe

run_dir, seed = sys.argv[1], int(sys.argv[2])
random.seed(seed)  # another seed each run: the python random state differs
with killsafe.Run(run_dir, save_on_exit=False) as run:
    state = {"w": torch.arange(6.0), "lr": 0.1, "gen": random.Random(seed)}
    run.track(state=state)
    run.save()
"""


def make_run(tmp_path: Path, name: str, seed: int) -> Path:
    run_dir = tmp_path / name
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(run_dir), str(seed)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    (ckpt,) = (run_dir / "checkpoints").glob("step-*")
    return ckpt


def test_inspect_shows_each_random_state_as_one_line(tmp_path: Path) -> None:
    ckpt = make_run(tmp_path, "a", 1)
    out = cli_in_process("inspect", ckpt)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert not [line for line in lines if "__rng__.python[" in line or "state.gen." in line]
    python = [line.split() for line in lines if line.startswith("__rng__.python ")]
    assert python == [["__rng__.python", "random", "state", "python,", "626", "ints"]]
    gen = next(line for line in lines if line.startswith("state.gen "))
    assert "random state" in gen and "random.Random, 626 ints" in gen
    assert len(lines) < 30  # was hundreds of lines of one tuple

    nodes = {node["path"]: node for node in cli_json_in_process("inspect", ckpt, "--json")["tree"]}
    assert nodes["__rng__.python"] == {
        "path": "__rng__.python",
        "type": "random state",
        "generator": "python",
        "ints": 626,
        "size": 0,
    }
    assert nodes["__rng__.torch"]["type"] == "random state"
    assert nodes["__rng__.torch"]["size"] > 0  # a uint8 tensor
    assert nodes["state.gen"]["generator"] == "random.Random"
    assert nodes["state.w"]["type"] == "tensor"  # other values as before
    assert not any(path.startswith("__rng__.python[") for path in nodes)


def test_diff_counts_tensors_plain_values_and_random_states_apart(tmp_path: Path) -> None:
    a, b = make_run(tmp_path, "a", 1), make_run(tmp_path, "b", 2)
    out = cli_in_process("diff", a, b)
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    assert last.startswith("changed: 0 of 1 tensors, 0 of 1 plain values, ")
    assert "4 of 4 generator states" in last  # python, numpy, torch and the tracked one
    shown = cli_json_in_process("diff", a, b, "--json")
    assert shown["changed"]["tensors"] == {"changed": 0, "total": 1}
    assert shown["changed"]["generator states"]["changed"] >= 3
    rows = {row["path"]: row for row in shown["values"]}
    assert rows["__rng__.python"]["part"] == "generator states"
    assert rows["__rng__.python"]["changed"] is True
    assert rows["state.w"] == {**rows["state.w"], "part": "tensors", "changed": False}

    same = cli_json_in_process("diff", a, a, "--json")["changed"]
    assert all(count["changed"] == 0 for count in same.values())


def _files_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.iterdir())


def test_one_size_and_unit_for_a_checkpoint_everywhere(tmp_path: Path) -> None:
    from killsafe.units import format_size

    ckpt = make_run(tmp_path, "a", 1)
    size = _files_bytes(ckpt)  # the tensor file and the manifest
    (listed,) = cli_json_in_process("list", ckpt.parent.parent, "--json")["checkpoints"]
    assert listed["size"] == size
    assert cli_json_in_process("inspect", ckpt, "--json")["size"] == size
    shown = format_size(size)
    assert shown.endswith(" KiB")
    assert shown in cli_in_process("list", ckpt.parent.parent).stdout
    assert f"size:     {shown} (" in cli_in_process("inspect", ckpt).stdout
    report = cli_in_process("report", ckpt.parent.parent)
    assert report.returncode == 0, report.stderr
    assert f"size={shown}" in (ckpt.parent.parent / "report.txt").read_text()


def test_a_checkpoint_of_plain_values_has_the_size_of_its_manifest(tmp_path: Path) -> None:
    from killsafe.store import CheckpointStore

    store = CheckpointStore(tmp_path / "plain")
    info = store.save({"epoch": 3, "note": "plain"}, step=3)
    manifest = info.path / "manifest.json"
    assert [p.name for p in info.path.iterdir()] == ["manifest.json"]
    assert info.size == manifest.stat().st_size > 0
    (listed,) = cli_json_in_process("list", tmp_path / "plain", "--json")["checkpoints"]
    assert listed["size"] == info.size
    assert "0 B" not in cli_in_process("list", tmp_path / "plain").stdout
