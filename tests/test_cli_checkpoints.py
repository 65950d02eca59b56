"""``killsafe list / inspect / verify / prune / diff``.

Most commands run in-process through ``killsafe.cli.main`` (``cli_in_process``:
no interpreter start-up per command); the terminal, the lock held by another
process and the bare ``killsafe`` run as real ``python -m killsafe`` subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import (
    assert_one_line_error,
    cli,
    cli_in_process,
    cli_json_in_process,
    snapshot,
)

np = pytest.importorskip("numpy")
store_module = pytest.importorskip("killsafe.store")
FORMAT_VERSION = pytest.importorskip("killsafe.format").FORMAT_VERSION


def weights(seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {
        "model": {
            "weight": rng.standard_normal((4, 3)).astype(np.float32),
            "bias": np.zeros(3, dtype=np.float64),
        },
        "epoch": seed,
        "note": "hello",
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory with four checkpoints; step 200 has the best val_loss, 100 is named."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": {"best": ["val_loss", "min"]}}))
    store = store_module.CheckpointStore(run / "checkpoints")
    for step, val_loss, name in [
        (100, 0.9, "warmup"),
        (200, 0.3, None),
        (300, 0.5, None),
        (400, 0.6, None),
    ]:
        store.save(
            weights(step), step, metrics={"val_loss": val_loss, "acc": 1 - val_loss}, name=name
        )
    store.close()
    return run


def checkpoint(run_dir: Path, step: int) -> Path:
    (path,) = [p for p in (run_dir / "checkpoints").iterdir() if f"{step:06d}" in p.name]
    return path


def corrupt_tensor_file(ckpt: Path) -> Path:
    (tensor_file,) = [p for p in ckpt.iterdir() if p.name.startswith("tensors")]
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    return tensor_file


# --- list -------------------------------------------------------------------


def test_list_json_marks_latest_and_best(run_dir: Path) -> None:
    listed = cli_json_in_process("list", run_dir)
    rows = listed["checkpoints"]
    assert [r["step"] for r in rows] == [100, 200, 300, 400]
    assert [r["latest"] for r in rows] == [False, False, False, True]
    assert [r["best"] for r in rows] == [False, True, False, False]
    assert rows[0]["name"] == "warmup"
    assert rows[1]["metrics"]["val_loss"] == pytest.approx(0.3)
    assert all(r["size"] > 0 and r["created"] > 0 and not r["corrupt"] for r in rows)


def test_list_accepts_the_checkpoints_directory_and_a_metric(run_dir: Path) -> None:
    rows = cli_json_in_process("list", run_dir / "checkpoints", "--metric", "acc", "--mode", "max")[
        "checkpoints"
    ]
    assert [r["step"] for r in rows if r["best"]] == [200]


def test_list_plain_output_is_a_table(run_dir: Path) -> None:
    out = cli_in_process("list", run_dir)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["step", "name", "reason"]
    assert any(line.startswith("100") and "warmup" in line for line in lines)
    assert any(line.startswith("400") and line.rstrip().endswith("latest") for line in lines)
    assert any(line.startswith("200") and "best" in line for line in lines)


def test_list_on_a_terminal_is_a_rich_table(run_dir: Path) -> None:
    import pty

    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "killsafe", "list", str(run_dir)],
        stdout=follower,
        stderr=subprocess.PIPE,
        env=env,
    )
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    text = shown.decode()
    assert "\x1b[" in text  # styled by rich
    assert "warmup" in text and "latest" in text and "best" in text
    assert "\x1b[" not in cli("list", run_dir).stdout  # plain when piped


def test_list_marks_a_checkpoint_whose_manifest_is_garbled(run_dir: Path) -> None:
    (checkpoint(run_dir, 400) / "manifest.json").write_text("{not json")
    rows = cli_json_in_process("list", run_dir)["checkpoints"]
    bad = [r for r in rows if r["corrupt"]]
    assert len(bad) == 1 and "manifest" in bad[0]["problem"]
    assert [r["step"] for r in rows if r["latest"]] == [300]


def test_list_verify_finds_a_bad_checksum_and_exits_1(run_dir: Path) -> None:
    corrupt_tensor_file(checkpoint(run_dir, 300))
    assert cli_json_in_process("list", run_dir)["checkpoints"][2]["corrupt"] is False  # not checked
    rows = cli_json_in_process("list", run_dir, "--verify", expect=1)["checkpoints"]
    assert [r["step"] for r in rows if r["corrupt"]] == [300]


def test_list_of_an_empty_directory(tmp_path: Path) -> None:
    assert cli_json_in_process("list", tmp_path)["checkpoints"] == []
    out = cli_in_process("list", tmp_path)
    assert out.returncode == 0 and "no checkpoints" in out.stdout


# --- verify -------------------------------------------------------------------


def test_verify_passes_a_sound_run(run_dir: Path) -> None:
    result = cli_json_in_process("verify", run_dir)
    assert result["ok"] is True and result["checked"] == 4


def test_verify_names_each_bad_file_and_exits_1(run_dir: Path) -> None:
    bad = corrupt_tensor_file(checkpoint(run_dir, 200))
    out = cli_in_process("verify", run_dir)
    assert out.returncode == 1
    assert bad.name in out.stdout and str(checkpoint(run_dir, 200)) in out.stdout
    assert "1 of 4" in out.stderr
    result = cli_json_in_process("verify", checkpoint(run_dir, 200), expect=1)
    assert result["ok"] is False and bad.name in result["checkpoints"][0]["problem"]
    assert cli_json_in_process("verify", checkpoint(run_dir, 300))["ok"] is True


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["list", "verify", "inspect", "prune"])
def test_a_missing_path_is_bad_input(command: str, tmp_path: Path) -> None:
    extra = ["--keep-last", "1"] if command == "prune" else []
    out = cli_in_process(command, tmp_path / "nowhere", *extra)
    assert_one_line_error(out, 2, "does not exist")


@pytest.mark.parametrize("command", ["list", "prune"])
def test_a_file_where_a_directory_is_expected_is_bad_input(command: str, tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    extra = ["--keep-last", "1"] if command == "prune" else []
    assert_one_line_error(cli_in_process(command, a_file, *extra), 2, "is a file")


def test_a_corrupt_manifest_is_bad_input_for_inspect(run_dir: Path) -> None:
    ckpt = checkpoint(run_dir, 100)
    (ckpt / "manifest.json").write_text("[1, 2")
    assert_one_line_error(cli_in_process("inspect", ckpt), 2, "manifest")
    assert_one_line_error(cli_in_process("verify", ckpt), 2, "manifest")


def test_a_newer_format_is_bad_input(run_dir: Path) -> None:
    ckpt = checkpoint(run_dir, 100)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["format_version"] = 999
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(cli_in_process("inspect", ckpt), 2, "999")
    assert_one_line_error(cli_in_process("diff", ckpt, checkpoint(run_dir, 200)), 2, "999")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["list"], "the following arguments are required: DIR"),
        (["list", ".", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["list", ".", "--mode", "median"], "invalid choice: 'median'"),
        (["diff", "a"], "required: B"),
        (["verify", ".", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv: list[str], message: str) -> None:
    assert_one_line_error(cli_in_process(*argv), 2, message, "--help")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--keep-last", "0"], "--keep-last must be 1 or more, got 0"),
        (["--keep-last", "2", "--keep-best", "0"], "--keep-best must be 1 or more, got 0"),
        (["--keep-last", "2", "--delete", "nosuch"], "no checkpoint named 'nosuch'"),
        ([], "prune needs --keep-last N, --delete REF or both"),
        (["--keep-best", "1", "--delete", "300"], "--keep-best needs --keep-last N"),
    ],
)
def test_bad_prune_values_are_one_line_and_delete_nothing(
    run_dir: Path, flags: list[str], message: str
) -> None:
    before = snapshot(run_dir)
    assert_one_line_error(cli_in_process("prune", run_dir, *flags), 2, message)
    assert snapshot(run_dir) == before


def test_a_missing_checkpoint_for_diff_is_bad_input(run_dir: Path, tmp_path: Path) -> None:
    out = cli_in_process("diff", checkpoint(run_dir, 100), tmp_path / "nowhere")
    assert_one_line_error(out, 2, "nowhere does not exist")
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert_one_line_error(cli_in_process("inspect", a_file), 2, "is a file")
    assert_one_line_error(cli_in_process("verify", a_file), 2, "is a file")


def test_no_command_prints_help_and_exits_2() -> None:
    out = cli()
    assert out.returncode == 2 and "COMMAND" in out.stderr


# --- read-only commands modify nothing -------------------------------------------


def test_read_only_commands_modify_nothing(run_dir: Path) -> None:
    corrupt_tensor_file(checkpoint(run_dir, 300))
    # A save in progress (or a dead writer's leftover): only a writer may sweep it.
    in_flight = run_dir / "checkpoints" / ".tmp-step-000500-abc"
    in_flight.mkdir()
    (in_flight / "tensors.safetensors").write_bytes(b"partial")
    (run_dir / "checkpoints" / ".lock").unlink(missing_ok=True)
    before = snapshot(run_dir)
    a, b = checkpoint(run_dir, 100), checkpoint(run_dir, 200)
    for argv in (
        ["list", run_dir],
        ["list", run_dir, "--verify", "--json"],
        ["verify", run_dir],
        ["inspect", a, "--json"],
        ["diff", a, b],
        ["prune", run_dir, "--keep-last", "1", "--dry-run"],
        ["verify", checkpoint(run_dir, 300), "--json"],
        ["list", run_dir / "checkpoints", "--json"],
        ["report", run_dir],
    ):
        out = cli_in_process(*argv)
        assert out.returncode in (0, 1), (argv, out.stderr)
        assert snapshot(run_dir) == before, argv


# --- prune ------------------------------------------------------------------------


def steps_on_disk(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def test_prune_keeps_the_newest_the_best_and_named_ones(run_dir: Path) -> None:
    planned = cli_json_in_process("prune", run_dir, "--keep-last", "1", "--dry-run")
    assert planned["dry_run"] is True
    assert [c["step"] for c in planned["deleted"]] == [300]
    assert steps_on_disk(run_dir) == [100, 200, 300, 400]

    done = cli_json_in_process("prune", run_dir, "--keep-last", "1")
    assert [c["step"] for c in done["deleted"]] == [300]
    assert steps_on_disk(run_dir) == [100, 200, 400]


def marks(rows: list[dict[str, object]]) -> dict[object, tuple[object, object]]:
    return {row["step"]: (row["latest"], row["best"]) for row in rows}


def test_prune_marks_the_latest_and_best_it_keeps_as_list_does(run_dir: Path) -> None:
    planned = cli_json_in_process("prune", run_dir, "--keep-last", "1", "--dry-run")
    listed = cli_json_in_process("list", run_dir)["checkpoints"]
    assert marks(planned["kept"]) == {400: (True, False), 200: (False, True), 100: (False, False)}
    assert marks(planned["kept"]) == {k: v for k, v in marks(listed).items() if k != 300}

    done = cli_json_in_process("prune", run_dir, "--keep-last", "1")
    assert marks(done["kept"]) == marks(cli_json_in_process("list", run_dir)["checkpoints"])


def test_prune_delete_needs_no_keep_last(run_dir: Path) -> None:
    planned = cli_json_in_process("prune", run_dir, "--delete", "300", "--dry-run")
    assert [c["step"] for c in planned["deleted"]] == [300]
    assert steps_on_disk(run_dir) == [100, 200, 300, 400]

    # Without --keep-last no retention runs: only the named checkpoint goes.
    done = cli_json_in_process("prune", run_dir, "--delete", "300")
    assert [c["step"] for c in done["deleted"]] == [300]
    assert steps_on_disk(run_dir) == [100, 200, 400]


def test_prune_deletes_a_named_checkpoint_only_when_asked_by_name(run_dir: Path) -> None:
    out = cli_in_process("prune", run_dir, "--keep-last", "4", "--delete", "warmup")
    assert out.returncode == 0, out.stderr
    assert "step 100" in out.stdout
    assert steps_on_disk(run_dir) == [200, 300, 400]


def test_prune_keep_best_by_a_given_metric(run_dir: Path) -> None:
    (run_dir / "run.json").write_text("{}")
    done = cli_json_in_process(
        "prune", run_dir, "--keep-last", "1", "--keep-best", "1", "--metric", "acc", "--mode", "max"
    )
    assert sorted(c["step"] for c in done["deleted"]) == [300]
    assert steps_on_disk(run_dir) == [100, 200, 400]


def test_prune_keep_best_without_a_metric_is_bad_input(run_dir: Path) -> None:
    (run_dir / "run.json").write_text("{}")
    out = cli_in_process("prune", run_dir, "--keep-last", "1", "--keep-best", "2")
    assert_one_line_error(out, 2, "--metric")
    assert steps_on_disk(run_dir) == [100, 200, 300, 400]


# --- inspect --------------------------------------------------------------------------


def test_inspect_json_describes_the_tree_from_the_manifest(run_dir: Path) -> None:
    ckpt = checkpoint(run_dir, 200)
    shown = cli_json_in_process("inspect", ckpt)
    assert (shown["step"], shown["name"], shown["format_version"]) == (200, None, FORMAT_VERSION)
    assert shown["metrics"]["val_loss"] == pytest.approx(0.3)
    nodes = {node["path"]: node for node in shown["tree"]}
    weight = nodes["model.weight"]
    assert (weight["type"], weight["dtype"], weight["shape"], weight["size"]) == (
        "ndarray",
        "<f4",
        [4, 3],
        48,
    )
    assert nodes["model.bias"]["size"] == 24
    assert nodes["epoch"] == {"path": "epoch", "type": "int", "value": 200}
    assert nodes["note"]["value"] == "hello"
    assert nodes["model"]["length"] == 2


def test_inspect_text_lists_metadata_and_every_path(run_dir: Path) -> None:
    out = cli_in_process("inspect", checkpoint(run_dir, 100))
    assert out.returncode == 0, out.stderr
    assert "name:     warmup" in out.stdout
    line = next(line for line in out.stdout.splitlines() if line.startswith("model.weight"))
    assert line.split()[1:4] == ["ndarray", "<f4", "[4,"]


def test_inspect_of_a_run_directory_says_to_pick_a_checkpoint(run_dir: Path) -> None:
    assert_one_line_error(cli_in_process("inspect", run_dir), 2, "killsafe list")


# --- diff -----------------------------------------------------------------------------


def test_diff_json_reports_metrics_keys_and_tensor_changes(run_dir: Path) -> None:
    store = store_module.CheckpointStore(run_dir / "checkpoints")
    changed = weights(200)
    changed["model"]["bias"] = changed["model"]["bias"] + np.array([0.0, 2.5, -4.0])  # type: ignore[index]
    changed["extra"] = [1, 2]
    del changed["note"]
    store.save(changed, 500, metrics={"val_loss": 0.25})
    store.close()

    result = cli_json_in_process("diff", checkpoint(run_dir, 200), checkpoint(run_dir, 500))
    assert result["fields"]["step"] == {"a": 200, "b": 500}
    assert result["metrics"]["val_loss"]["delta"] == pytest.approx(-0.05)
    assert result["metrics"]["acc"]["only_in"] == "a"
    assert result["only_in_a"] == ["note"]
    assert set(result["only_in_b"]) == {"extra", "extra[0]", "extra[1]"}
    values = {row["path"]: row for row in result["values"]}
    assert values["model.weight"]["changed"] is False
    assert values["model.weight"]["max_abs_diff"] == 0.0
    assert values["model.bias"]["changed"] is True
    assert values["model.bias"]["max_abs_diff"] == pytest.approx(4.0)
    assert values["epoch"]["changed"] is False


def test_diff_text_names_what_changed(run_dir: Path) -> None:
    out = cli_in_process("diff", checkpoint(run_dir, 100), checkpoint(run_dir, 200))
    assert out.returncode == 0, out.stderr
    assert "step: 100 -> 200" in out.stdout
    assert "val_loss: 0.9 -> 0.3 (-0.6)" in out.stdout
    weight = next(line for line in out.stdout.splitlines() if line.startswith("model.weight"))
    assert "changed, max abs diff" in weight
    assert "epoch" in out.stdout and "100 -> 200" in out.stdout


def test_diff_of_torch_tensors_one_pair_at_a_time(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    store = store_module.CheckpointStore(tmp_path)
    a = {"w": torch.zeros(3, 2, dtype=torch.bfloat16), "m": torch.tensor([float("nan"), 1.0])}
    b = {"w": a["w"].clone(), "m": torch.tensor([float("nan"), -2.0])}
    b["w"][1, 1] = 3.0
    store.save(a, 1)
    store.save(b, 2)
    store.close()
    result = cli_json_in_process("diff", tmp_path / "step-000001", tmp_path / "step-000002")
    values = {row["path"]: row for row in result["values"]}
    assert values["w"]["dtype"] == "bfloat16"
    assert values["w"]["max_abs_diff"] == pytest.approx(3.0)
    assert values["m"]["max_abs_diff"] == pytest.approx(3.0)  # the NaNs match: no change there


def test_diff_of_different_shapes_says_so_without_loading(run_dir: Path, tmp_path: Path) -> None:
    store = store_module.CheckpointStore(tmp_path / "other")
    state = weights(1)
    state["model"]["weight"] = np.zeros((2, 2), dtype=np.float32)  # type: ignore[index]
    store.save(state, 7)
    store.close()
    result = cli_json_in_process(
        "diff", checkpoint(run_dir, 100), tmp_path / "other" / "step-000007"
    )
    row = {r["path"]: r for r in result["values"]}["model.weight"]
    assert (row["changed"], row["shape"], row["shape_b"]) == (True, [4, 3], [2, 2])


def test_diff_compares_tensors_under_any_key(tmp_path: Path) -> None:
    # A torch state_dict has dotted keys ("0.weight"); optimizer states have int keys.
    torch = pytest.importorskip("torch")
    model_a = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    model_b = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    model_b.load_state_dict(model_a.state_dict())
    with torch.no_grad():
        model_b[2].bias += 0.75
    store = store_module.CheckpointStore(tmp_path)
    for step, model in ((1, model_a), (2, model_b)):
        arrays = [np.arange(4.0) * step, np.ones(2)]
        store.save({"model": model, "moments": {0: arrays[0]}, "list": arrays}, step)
    store.close()
    result = cli_json_in_process("diff", tmp_path / "step-000001", tmp_path / "step-000002")
    values = {row["path"]: row for row in result["values"]}
    assert values["model.2.bias"]["max_abs_diff"] == pytest.approx(0.75)
    assert values["model.0.weight"] == {**values["model.0.weight"], "changed": False}
    assert values["moments[0]"]["max_abs_diff"] == pytest.approx(3.0)
    assert values["list[0]"]["max_abs_diff"] == pytest.approx(3.0)
    assert values["list[1]"]["changed"] is False
    assert all(row["changed"] is not None for row in values.values())


def test_prune_keeps_the_newest_verified_when_the_newest_is_corrupt(run_dir: Path) -> None:
    corrupt_tensor_file(checkpoint(run_dir, 400))
    # keep-last 1 keeps 400 (corrupt), the best 200 and the named 100; 300 is the
    # newest checkpoint that verifies, the one a resume would use: never pruned.
    done = cli_json_in_process("prune", run_dir, "--keep-last", "1")
    assert done["deleted"] == []
    assert steps_on_disk(run_dir) == [100, 200, 300, 400]


def test_prune_while_a_run_writes_the_store_is_bad_input(run_dir: Path) -> None:
    writer = store_module.CheckpointStore(run_dir / "checkpoints")
    writer.save(weights(500), 500)  # holds the write lock from here until close()
    try:
        out = cli("prune", run_dir, "--keep-last", "1")
        assert_one_line_error(out, 2, "being written by pid")
        assert steps_on_disk(run_dir) == [100, 200, 300, 400, 500]
    finally:
        writer.close()


def test_inspect_reads_no_tensor_data(run_dir: Path) -> None:
    ckpt = checkpoint(run_dir, 300)
    for data in [p for p in ckpt.iterdir() if p.name.startswith("tensors")]:
        data.unlink()  # inspect must not need it
    nodes = {node["path"]: node for node in cli_json_in_process("inspect", ckpt)["tree"]}
    assert (nodes["model.weight"]["shape"], nodes["model.weight"]["dtype"]) == ([4, 3], "<f4")
