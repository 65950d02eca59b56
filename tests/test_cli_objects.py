"""The command line on an object store: list, verify, inspect, diff and prune take s3:// URLs.

Run as real processes against the session's SeaweedFS server, configured as
users configure theirs: AWS_ENDPOINT_URL and the AWS_* keys.
"""

from __future__ import annotations

import numpy as np
from cli_helpers import assert_one_line_error, cli, cli_json

from killsafe import CheckpointStore, storage


def _fill(url: str) -> None:
    with CheckpointStore(url) as store:
        for step in (1, 2, 3):
            store.save(
                {"w": np.full(4, float(step)), "lr": 0.1 * step},
                step=step,
                metrics={"loss": 4 - step},
            )


def test_list_verify_inspect_diff_and_prune_take_urls(s3_url: str) -> None:
    _fill(s3_url)
    listed = cli_json("list", s3_url)
    assert [c["step"] for c in listed["checkpoints"]] == [1, 2, 3]
    assert listed["checkpoints"][-1]["path"] == f"{s3_url}/step-000003"
    assert listed["checkpoints"][-1]["latest"]
    out = cli("verify", s3_url)
    assert out.returncode == 0, out.stderr
    assert f"{s3_url}/step-000002: ok" in out.stdout
    inspected = cli_json("inspect", f"{s3_url}/step-000002")
    assert inspected["step"] == 2 and {n["path"] for n in inspected["tree"]} >= {"w", "lr"}
    diff = cli_json("diff", f"{s3_url}/step-000001", f"{s3_url}/step-000003")
    assert (diff["metrics"]["loss"]["a"], diff["metrics"]["loss"]["b"]) == (3, 1)
    values = {row["path"]: row for row in diff["values"]}
    assert values["w"]["max_abs_diff"] == 2.0  # read from the bucket and compared
    pruned = cli_json("prune", s3_url, "--keep-last", "1")
    assert [d["step"] for d in pruned["deleted"]] == [1, 2]
    assert [c["step"] for c in cli_json("list", s3_url)["checkpoints"]] == [3]


def test_verify_names_a_corrupt_checkpoint_on_s3(s3_url: str) -> None:
    _fill(s3_url)
    backend = storage.open(s3_url)
    key = next(i.key for i in backend.list("step-000002/") if i.key.endswith(".safetensors"))
    data = bytearray(storage.read_bytes(backend, key))
    data[-1] ^= 0xFF
    storage.write_bytes(backend, key, bytes(data))
    out = cli("verify", s3_url)
    assert out.returncode == 1
    assert "step-000002: CORRUPT" in out.stdout


def test_a_url_that_is_not_a_checkpoint_is_one_line_of_bad_input(s3_url: str) -> None:
    _fill(s3_url)
    assert_one_line_error(cli("inspect", f"{s3_url}/nothing"), 2, "not a checkpoint URL")
