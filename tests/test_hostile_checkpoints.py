"""A hostile or damaged newest checkpoint is skipped, never fatal, by every reader.

Each case damages the newest checkpoint of a real run directory (written by
a real Run) and checks the store, a resumed Run, the command line and the
dashboard: the damaged checkpoint is reported corrupt in one line and
skipped, the previous one is used, nothing is deleted, nothing hangs. The
command line runs in-process through its ``main`` (five commands a case);
one case also runs through the real ``python -m killsafe``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
import torch
from cli_helpers import cli, cli_in_process, cli_json_in_process, snapshot
from manifest_helpers import edit_manifest
from roundtrip_helpers import assert_same

import killsafe
from killsafe import format as fmt
from killsafe.errors import CorruptCheckpoint

STEPS = 40
EVERY = 10


class Counter:
    """A stateful object whose state says how many steps really ran."""

    def __init__(self) -> None:
        self.n = 0
        self.weights = torch.zeros(4)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "weights": self.weights.clone(), "big": 2**20000}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = state["n"]
        self.weights = state["weights"]


def make_run(directory: Path, compression: str | None = None) -> Path:
    """A finished run with checkpoints at steps 10..40; returns the newest checkpoint."""
    counter = Counter()
    with killsafe.Run(
        directory,
        total_steps=STEPS,
        save_every_steps=EVERY,
        keep_last=None,
        progress=False,
        report=False,  # no plot drawn after the exit while the tests compare snapshots
        compression=compression,
    ) as run:
        run.track(counter=counter)
        for _ in run.steps():
            counter.n += 1
            counter.weights += 1
    return newest(directory)


def newest(directory: Path) -> Path:
    return max((directory / "checkpoints").glob("step-*"))


def set_node(path: tuple[str, ...], node: dict[str, Any]) -> Callable[[Path, Path], None]:
    """Replace the tree node at dict keys ``path`` (under the tracked objects)."""

    def damage(checkpoint: Path, _outside: Path) -> None:
        def change(manifest: dict[str, Any]) -> None:
            parent = _find_counter(manifest["tree"])
            for key in path[:-1]:
                parent = parent["entries"][key]
            parent["entries"][path[-1]] = node

        edit_manifest(checkpoint, change)

    return damage


def _find_counter(tree: Any) -> dict[str, Any]:
    """The dict node holding the Counter's state (its keys "n" and "weights")."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if {"n", "weights"} <= set(node.get("entries") or {}):
                return node
            stack.extend(node.values())
    raise AssertionError("no counter state in the tree")


def set_field(**fields: Any) -> Callable[[Path, Path], None]:
    def damage(checkpoint: Path, _outside: Path) -> None:
        edit_manifest(checkpoint, lambda m: m.update(fields))

    return damage


def flip_step(checkpoint: Path, _outside: Path) -> None:
    """One bit: ``"step": 40`` becomes ``"step": 60`` (0x34 ^ 0x02 = '6'), checksum untouched."""
    path = checkpoint / fmt.MANIFEST_NAME
    raw = path.read_bytes()
    at = raw.index(b'"step": 40') + len(b'"step": ')
    path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x02]) + raw[at + 1 :])


def huge_raw_size(checkpoint: Path, _outside: Path) -> None:
    edit_manifest(checkpoint, lambda m: m["files"][fmt.TENSOR_FILE_ZSTD].update(raw_size=2**62))


def manifest_fifo(checkpoint: Path, _outside: Path) -> None:
    (checkpoint / fmt.MANIFEST_NAME).unlink()
    os.mkfifo(checkpoint / fmt.MANIFEST_NAME)


def manifest_to_dev_zero(checkpoint: Path, _outside: Path) -> None:
    (checkpoint / fmt.MANIFEST_NAME).unlink()
    (checkpoint / fmt.MANIFEST_NAME).symlink_to("/dev/zero")


def tensor_file_outside(checkpoint: Path, outside: Path) -> None:
    target = outside / fmt.TENSOR_FILE
    shutil.move(checkpoint / fmt.TENSOR_FILE, target)
    (checkpoint / fmt.TENSOR_FILE).symlink_to(target)


def directory_outside(checkpoint: Path, outside: Path) -> None:
    target = outside / checkpoint.name
    shutil.move(checkpoint, target)
    checkpoint.symlink_to(target, target_is_directory=True)


CASES: dict[str, tuple[Callable[[Path, Path], None], str | None]] = {
    "step-bit-flip": (flip_step, None),
    "created-10**400": (set_field(created=10**400), None),
    "float-bits-00": (set_node(("n",), {"type": "float", "bits": "00"}), None),
    "int-hex-zz": (set_node(("n",), {"type": "int", "hex": "zz"}), None),
    "items-5": (set_node(("n",), {"type": "list", "items": 5}), None),
    "shape-a": (
        set_node(
            ("weights",),
            {"type": "tensor", "dtype": "float32", "shape": ["a"], "stride": [1]},
        ),
        None,
    ),
    "shape-2**63-stride-0": (
        set_node(
            ("weights",),
            {
                "type": "tensor",
                "dtype": "float32",
                "shape": [2**63, 2**63],
                "stride": [0, 0],
                "entry": "x",
                "offset": 0,
            },
        ),
        None,
    ),
    "zstd-raw-size-2**62": (huge_raw_size, "zstd"),
    "manifest-fifo": (manifest_fifo, None),
    "manifest-link-to-dev-zero": (manifest_to_dev_zero, None),
    "tensor-file-link-outside": (tensor_file_outside, None),
    "directory-link-outside": (directory_outside, None),
}


@pytest.fixture(params=sorted(CASES))
def damaged(request: Any, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(run directory, damaged checkpoint, the good one before it), files outside the store."""
    return damage_a_run(request.param, tmp_path)


def damage_a_run(case: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A finished run under ``tmp_path`` whose newest checkpoint has the damage ``case``."""
    damage, compression = CASES[case]
    run_dir = tmp_path / "run"
    bad = make_run(run_dir, compression)
    good = run_dir / "checkpoints" / f"step-{STEPS - EVERY:06d}"
    outside = tmp_path / "outside"
    outside.mkdir()
    damage(bad, outside)
    return run_dir, bad, good


def test_the_store_skips_it_and_uses_the_previous_one(damaged: tuple[Path, Path, Path]) -> None:
    run_dir, bad, good = damaged
    before = snapshot(run_dir.parent)
    store = killsafe.CheckpointStore(run_dir / "checkpoints")
    latest = store.latest()
    assert latest is not None and latest.path == good
    assert_same(store.load("latest"), store.load(good))
    assert good in [info.path for info in store.list()]
    with pytest.raises(CorruptCheckpoint) as caught:
        store.load(bad)
    assert "\n" not in str(caught.value)
    assert snapshot(run_dir.parent) == before


def test_a_resumed_run_starts_from_the_previous_one(damaged: tuple[Path, Path, Path]) -> None:
    run_dir, bad, good = damaged
    checkpoints = snapshot(run_dir / "checkpoints")
    counter = Counter()
    with killsafe.Run(
        run_dir, total_steps=STEPS, keep_last=None, save_on_exit=False, progress=False
    ) as run:
        run.track(counter=counter)
        assert run.resumed_from is not None and run.resumed_from.path == good
        assert counter.n == STEPS - EVERY
    assert snapshot(run_dir / "checkpoints") == checkpoints
    assert os.path.lexists(bad)


def test_the_command_line_reports_it_in_one_line(damaged: tuple[Path, Path, Path]) -> None:
    _check_the_command_line(*damaged, cli_in_process)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["manifest-fifo"])
def test_the_real_command_reports_it_in_one_line(case: str, tmp_path: Path) -> None:
    """The same checks through ``python -m killsafe`` (the case that could hang a reader)."""
    _check_the_command_line(*damage_a_run(case, tmp_path), cli)


def _check_the_command_line(
    run_dir: Path, bad: Path, good: Path, command: Callable[..., CompletedProcess[str]]
) -> None:
    before = snapshot(run_dir.parent)
    listed = command("list", run_dir, "--json")
    assert listed.returncode == 0, (listed.stdout, listed.stderr)
    rows = {row["path"]: row for row in json.loads(listed.stdout)["checkpoints"]}
    assert rows[str(good)]["latest"]
    if str(bad) in rows:
        assert rows[str(bad)]["corrupt"] and "\n" not in rows[str(bad)]["problem"]
    out = command("verify", run_dir)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert f"{bad}: CORRUPT: " in out.stdout
    assert f"{good}: ok" in out.stdout
    out = command("inspect", bad)  # reads the manifest only: a damaged one is one line
    assert out.returncode in (0, 1, 2) and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == (out.returncode != 0), out.stderr
    out = command("inspect", good)
    assert out.returncode == 0, out.stderr
    out = command("report", run_dir)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert snapshot(run_dir.parent) == before


def test_the_dashboard_lists_the_good_ones(damaged: tuple[Path, Path, Path]) -> None:
    testclient = pytest.importorskip("fastapi.testclient")
    from killsafe.server.app import create_app

    run_dir, _bad, good = damaged
    with testclient.TestClient(create_app(run_dir), base_url="http://127.0.0.1") as client:
        listed = client.get("/api/checkpoints")
        assert listed.status_code == 200, listed.text
        assert good.name in [row["id"] for row in listed.json()["checkpoints"]]
        status = client.get("/api/status")
        assert status.status_code == 200, status.text


def test_a_huge_int_saves_inspects_and_loads(tmp_path: Path) -> None:
    store = killsafe.CheckpointStore(tmp_path)
    info = store.save({"big": 2**20000, "small": -(2**70)}, step=1)
    assert store.load(1) == {"big": 2**20000, "small": -(2**70)}
    shown = cli_json_in_process("inspect", info.path)
    values = {row["path"]: row.get("value") for row in shown["tree"]}
    assert values["small"] == -(2**70)
    assert isinstance(values["big"], str) and values["big"].startswith("0x1000")
    out = cli_in_process("inspect", info.path)
    assert out.returncode == 0, out.stderr


def test_old_manifests_load_and_verify_says_they_have_no_checksum(tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "fixtures" / "resumable-0.1" / "store"
    shutil.copytree(fixture, tmp_path / "store")
    store = killsafe.CheckpointStore(tmp_path / "store")
    infos = store.list()
    assert infos and not any(info.manifest_checksum for info in infos)
    out = cli_in_process("verify", tmp_path / "store")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok (no manifest checksum") == len(infos), out.stdout
    fresh = store.save({"x": 1}, step=100)
    assert fresh.manifest_checksum
    out = cli_in_process("verify", fresh.path)
    assert out.stdout.strip() == f"{fresh.path}: ok", out.stdout
