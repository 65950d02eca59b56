"""A ``Run`` training on a GPU stops and resumes bit-exactly.

The CUDA paths: parameters and Adam state staged through pinned host memory
by background saves, the CUDA generator saved and restored, and a run in an
NCCL job (its decisions agreed on a side gloo group) or in a gloo job whose
ranks share one GPU. Each job is stopped by SIGTERM to rank 0 and resumed;
it must end bit-identical to one never interrupted. Skipped without CUDA.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() and os.environ.get("KILLSAFE_TEST_DEVICE") != "cpu":
    pytest.skip("needs a CUDA device", allow_module_level=True)

from distributed_helpers import run_job  # noqa: E402

from killsafe import CheckpointStore  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

WORKER = Path(__file__).resolve().parent / "cuda_worker.py"
STOPPED = 75


def nccl_usable() -> bool:
    dist = torch.distributed
    return torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()


SCENARIOS = [
    pytest.param("alone", 1, id="one-process"),
    pytest.param(
        "nccl",
        1,
        id="nccl",
        marks=pytest.mark.skipif(not nccl_usable(), reason="needs NCCL on a GPU"),
    ),
    pytest.param("gloo", 2, id="gloo-ranks-sharing-a-gpu"),
]


@pytest.mark.parametrize(("scenario", "world"), SCENARIOS)
def test_stopped_and_resumed_on_the_gpu_ends_bit_identical(
    tmp_path: Path, scenario: str, world: int
) -> None:
    whole = run_job(scenario, world, tmp_path / "whole", str(tmp_path / "whole-run"), worker=WORKER)
    run_dir = str(tmp_path / "run")
    stopped = run_job(
        scenario, world, tmp_path / "stopped", run_dir, "4", expect=STOPPED, worker=WORKER
    )
    resumed = run_job(scenario, world, tmp_path / "resumed", run_dir, worker=WORKER)
    for rank in range(world):
        assert stopped.result(rank)["step"] < whole.result(rank)["step"] == 10
        assert resumed.result(rank) == whole.result(rank)  # weights, Adam state, CUDA generator
    latest = CheckpointStore(tmp_path / "run" / "checkpoints").latest(verify=True)
    assert latest is not None and latest.step == 10
