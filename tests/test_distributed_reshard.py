"""FSDP2 (DTensor) and DDP checkpoints of a ``Run`` resumed on other world sizes and layouts.

Two ranks train a model wrapped with ``fully_shard`` (its parameters and
Adam states are DTensors, sharded unevenly) and one wrapped with DDP,
each in a run of its own (``tests/distributed_reshard_worker.py``). Three
ranks resume both into FSDP2 models and the FSDP2 checkpoint into a DDP
one, through the collective resharding load, and the FSDP2 checkpoint
consolidated to one process into FSDP2 models (each rank slicing its
shards out of the whole tensors); one process alone resumes the FSDP2
checkpoint into a plain model. Every model and optimizer state
must equal the saved one. A model of other shapes is refused on every
rank, before any rank starts the collective.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import distributed_reshard_worker as worker  # noqa: E402
from distributed_helpers import run_job  # noqa: E402

from killsafe import Run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

WORKER = Path(worker.__file__)
LOADS = ("fsdp:fsdp", "ddp:fsdp", "one:fsdp", "fsdp:wide", "fsdp:ddp")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reshard")
    saved = run_job("save", 2, root / "save", str(root), worker=WORKER)
    from killsafe.distributed.runstate import consolidate

    (root / "one" / "checkpoints").mkdir(parents=True)
    checkpoint = "checkpoints/step-000003"
    consolidate(root / "fsdp" / checkpoint, root / "one" / checkpoint, weights=False)
    loaded = run_job("load", 3, root / "load", str(root), *LOADS, worker=WORKER)
    return {"root": root, "saved": saved.result(0), "loaded": [loaded.result(r) for r in range(3)]}


def test_the_fsdp2_checkpoint_holds_dtensor_shards(jobs: dict[str, Any]) -> None:
    checkpoint = jobs["root"] / "fsdp" / "checkpoints" / "step-000003"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    state = manifest["dcp"]["state"]
    rows_of_each_rank = [[[0, 0], [3, 4]], [[3, 0], [2, 4]]]  # 5 rows over 2 ranks
    assert state["model.0.weight"]["chunks"] == rows_of_each_rank
    assert state["optimizer.state.0.exp_avg"]["chunks"] == rows_of_each_rank
    ddp = json.loads(
        (jobs["root"] / "ddp" / "checkpoints" / "step-000003" / "manifest.json").read_text()
    )
    assert ddp["dcp"]["state"]["model.0.weight"]["chunks"] == [[[0, 0], [5, 4]]]


def test_an_fsdp2_state_saved_on_two_resumes_resharded_on_three(jobs: dict[str, Any]) -> None:
    saved = jobs["saved"]
    assert saved["fsdp"]["optimizer"]["0"]["exp_avg"]  # Adam has stepped: states to compare
    for result in jobs["loaded"]:
        assert result["fsdp:fsdp"] == saved["fsdp"]


def test_ddp_and_fsdp2_checkpoints_resume_in_each_others_layout(jobs: dict[str, Any]) -> None:
    saved = jobs["saved"]
    for result in jobs["loaded"]:
        assert result["ddp:fsdp"] == saved["ddp"]
        assert result["fsdp:ddp"] == saved["fsdp"]


def test_a_one_process_checkpoint_resumes_sharded_in_an_fsdp2_job(jobs: dict[str, Any]) -> None:
    for result in jobs["loaded"]:
        assert result["one:fsdp"] == jobs["saved"]["fsdp"]


def test_a_model_that_does_not_fit_is_named_on_every_rank_before_loading(
    jobs: dict[str, Any],
) -> None:
    for result in jobs["loaded"]:  # and the job went on to its next run: no rank hung
        refused = result["fsdp:wide"]
        assert refused["error"] == "StateMismatch"
        assert "model.0.weight shape (5, 4) in the checkpoint, (7, 4) now" in refused["message"]
        assert result["fsdp:ddp"]


def test_an_fsdp2_state_saved_on_two_resumes_on_one_process(
    jobs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    model, optimizer = worker.build("plain", 1, seed=1)
    with Run(jobs["root"] / "fsdp", total_steps=worker.STEPS, progress=False) as run:
        run.track(model=model, optimizer=optimizer)
        assert run.resumed_from is not None and run.resumed_from.world_size == 2
    assert worker.states(model, optimizer) == jobs["saved"]["fsdp"]
    assert "saved by 2 process(es), on 1" in caplog.text
