"""``killsafe run -- torchrun ...``: a crashed distributed job is restarted and resumes.

One rank of a 2-process DDP job launched by ``torchrun`` dies (SIGKILL) in
the first attempt; torchrun's agent ends the other rank and fails, and
``killsafe run`` starts the whole job again. It resumes from the last
checkpoint and ends with the weights of a job never interrupted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available() or shutil.which("torchrun") is None:
    pytest.skip("torchrun with gloo is not available", allow_module_level=True)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.distributed,
]

JOB = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    import torch.distributed as dist
    import killsafe

    run_dir, out, crash_marker = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    torch.manual_seed(100 + rank)
    with killsafe.Run(run_dir, total_steps=12, save_every_steps=3, collective_timeout=5,
                      progress=False, report=False, keyboard=False) as run:
        run.track(model=model, optimizer=optimizer)
        for step in run.steps():
            loss = model(torch.randn(8, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step == 7 and rank == 1 and crash_marker and not os.path.exists(crash_marker):
                open(crash_marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)  # a crash: no checkpoint, no clean-up
    with open(f"{out}.{rank}", "w") as file:
        json.dump([p.detach().tolist() for p in model.parameters()], file)
    sys.exit(run.exit_code)
    """
)


def torchrun(script: Path, run_dir: Path, out: Path, marker: str) -> list[str]:
    return [
        "torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "--max_restarts=0",
        "--monitor_interval=0.5",  # notice the dead rank soon
        str(script),
        str(run_dir),
        str(out),
        marker,
    ]


def test_a_torchrun_job_whose_rank_crashed_is_restarted_and_resumes(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env_timeout = 180
    whole = subprocess.run(
        torchrun(script, tmp_path / "whole-run", tmp_path / "whole", ""),
        capture_output=True,
        text=True,
        timeout=env_timeout,
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "killsafe", "run", "--backoff", "0", "--dir", str(run_dir)]
    command += ["--", *torchrun(script, run_dir, tmp_path / "resumed", str(tmp_path / "crashed"))]
    supervised = subprocess.run(command, capture_output=True, text=True, timeout=env_timeout)
    assert supervised.returncode == 0, supervised.stderr[-3000:]
    assert (tmp_path / "crashed").exists()  # the first attempt did crash
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished"
    assert [r["attempt"] for r in record["restarts"]] == [1]
    starts = [s["start_step"] for s in record["sessions"]]
    assert starts[0] == 0 and starts[1] in (3, 6), starts  # resumed, not started over
    for rank in range(2):
        resumed = json.loads(Path(f"{tmp_path / 'resumed'}.{rank}").read_text())
        assert resumed == json.loads(Path(f"{tmp_path / 'whole'}.{rank}").read_text())
