"""One rank of a DDP training under ``Run`` (see distributed_helpers.py).

``SCENARIO RANK WORLD PORT DIR RUNDIR [EVENT...]``; an event
``RANK:STEP:WHAT`` makes ``RANK`` send itself ``SIGTERM`` (``term``) or
``SIGKILL`` (``kill``), or call ``run.save("asked")`` (``save``), during step
``STEP``; ``failwrite`` and ``killwrite`` make the rank's file of the
checkpoint of step ``STEP`` fail to write, or the rank SIGKILL itself just
before writing it (its tree is staged, the other ranks are writing).
Scenario ``epochs`` (``epochs-alone`` on 1 process without a process group)
trains 2 epochs with ``run.batches()`` over a DataLoader with a shuffling
``DistributedSampler`` instead, keeping the (epoch, sample) pairs it saw.
Scenario ``paced`` trains ``PACED_STEPS`` steps of ``PACED_SECONDS`` each with
no save but the exit's, and counts the flag exchanges of its step boundaries.
``WORLD`` 1 with scenario ``alone`` runs without a process group; scenario
``train-incremental`` trains as ``train`` into an incremental store, and
``fresh`` starts over (``resume="never", clear=True``), ``from3`` resumes
from step 3's checkpoint. Scenario
``nodisk`` gives each rank a run directory of its own, ``RUNDIR/node-RANK``
(nodes without a shared disk), and the mirror ``$KILLSAFE_TEST_MIRROR`` when
set (``nodisk-incremental``: an incremental run); ``failupload`` makes the
rank's upload of step ``STEP``'s file fail, ``fullprobe`` its write of the
start's shared-directory probe (as on a full disk), ``failprune`` its retention
after step ``STEP``'s checkpoint. Each rank
writes what it saw to ``DIR/rank-N.json`` and exits with ``run.exit_code``
(1 with the error's name when the run raised).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import killsafe.distributed.objects as objects
import killsafe.distributed.writer as writer
from killsafe import Run
from killsafe.errors import KillsafeError, RankUnresponsive, SaveFailed

TOTAL_STEPS = 8
COLLECTIVE_TIMEOUT = float(os.environ.get("KILLSAFE_TEST_COLLECTIVE_TIMEOUT", "8"))
PACED_STEPS = 300
PACED_SECONDS = 0.005
seen_step: dict[str, int] = {}  # the run's step, still known when it raised


def break_write(step: int, what: str) -> None:
    """Make this rank's write of step ``step``'s checkpoint fail (``failwrite``) or kill it."""
    write = writer._write_rank_file

    def broken(path: Path, *args: Any) -> Any:
        if f"step-{step:06d}" not in path.parent.name:
            return write(path, *args)
        if what == "killwrite":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(28, "No space left on device (test)")

    writer._write_rank_file = broken  # type: ignore[assignment]


def break_upload(step: int) -> None:
    """Make this rank's upload of step ``step``'s checkpoint file fail."""
    upload = objects.upload_rank_file

    def broken(backend: Any, key: str, *args: Any) -> Any:
        if not key.startswith(f"step-{step:06d}"):
            return upload(backend, key, *args)
        raise SaveFailed(f"could not write {backend.url}{key}: 503 SlowDown (test)")

    objects.upload_rank_file = broken  # type: ignore[assignment]


def break_prune(step: int) -> None:
    """Make this rank's retention after the checkpoint of ``step`` fail (another holds the lock)."""
    from killsafe import CheckpointStore
    from killsafe.errors import StoreLocked

    original = CheckpointStore.prune

    def prune(store: CheckpointStore, **options: Any) -> Any:
        if any(info.step == step for info in store.list()):
            raise StoreLocked(f"{store.location} is locked by a test")
        return original(store, **options)

    CheckpointStore.prune = prune  # type: ignore[method-assign]


def fill_disk_at_probe() -> None:
    """Make this rank's write of the shared-directory probe fail as on a full disk."""
    original = Path.write_text

    def write_text(path: Path, *args: Any, **kwargs: Any) -> int:
        if path.name.startswith(".killsafe-shared-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, *args, **kwargs)

    Path.write_text = write_text  # type: ignore[method-assign]


def count_flag_exchanges(counted: dict[str, int]) -> None:
    """Count this rank's ``max_async`` calls (the step boundary's flag exchanges)."""
    from killsafe.distributed.process_group import TorchCoordinator

    original = TorchCoordinator.max_async

    def counting(coordinator: Any, values: tuple[int, ...]) -> Any:
        counted["exchanges"] = counted.get("exchanges", 0) + 1
        return original(coordinator, values)

    TorchCoordinator.max_async = counting  # type: ignore[method-assign]


def train(
    rank: int,
    run_dir: Path,
    events: dict[tuple[int, int], str],
    *,
    paced: bool = False,
    incremental: bool = False,
    mirror: str | None = None,
    clear: bool = False,
    resume: str | None = None,
) -> dict[str, Any]:
    counted: dict[str, int] = {}
    if paced:
        count_flag_exchanges(counted)
    total, every = (PACED_STEPS, 10**6) if paced else (TOTAL_STEPS, 3)
    torch.manual_seed(0)  # the same initial weights on every rank
    model: torch.nn.Module = torch.nn.Linear(4, 2)
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    torch.manual_seed(100 + rank)  # each rank its own data stream
    result: dict[str, Any] = {}
    with Run(
        run_dir,
        total_steps=total,
        save_every_steps=every,
        collective_timeout=COLLECTIVE_TIMEOUT,
        incremental=incremental,
        mirror=mirror,
        resume=resume or ("never" if clear else "auto"),
        clear=clear,
    ) as run:
        run.track(model=model, optimizer=optimizer, seen=[])
        result["restored"] = [p.detach().tolist() for p in model.parameters()]
        for step in run.steps():
            x = torch.randn(8, 4)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.state["seen"].append(round(float(x.sum()), 6))
            seen_step["step"] = run.step + 1
            if paced:
                time.sleep(PACED_SECONDS)
            what = events.get((rank, step))
            if what == "save":
                run.save("asked")
            elif what is not None and what.endswith(("write", "upload", "prune", "probe")):
                pass  # armed before the run
            elif what is not None:
                os.kill(os.getpid(), signal.SIGTERM if what == "term" else signal.SIGKILL)
    result.update(
        step=run.step,
        exit_code=run.exit_code,
        exit_reason=run.exit_reason,
        weights=[p.detach().tolist() for p in model.parameters()],
        seen=run.state["seen"],
        next_random=torch.rand(1).item(),
        **counted,
    )
    return result


def train_epochs(
    rank: int, world: int, run_dir: Path, events: dict[tuple[int, int], str]
) -> dict[str, Any]:
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Linear(1, 1)
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dataset = TensorDataset(torch.arange(24))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=7)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)
    with Run(run_dir, collective_timeout=COLLECTIVE_TIMEOUT) as run:
        run.track(model=model, optimizer=optimizer, seen=[])
        for epoch in run.epochs(2):
            for (batch,) in run.batches(loader):
                loss = model(batch.float().unsqueeze(1)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                run.state["seen"].extend([epoch, int(i)] for i in batch)
                if events.get((rank, run.step)) == "term":
                    os.kill(os.getpid(), signal.SIGTERM)
    return {"step": run.step, "exit_code": run.exit_code, "seen": run.state["seen"]}


def main() -> None:
    name, rank, world, port, workdir, run_dir, *args = sys.argv[1:]
    rank_, world_ = int(rank), int(world)
    if not name.endswith("alone"):
        store = dist.TCPStore("127.0.0.1", int(port), None, False, timeout=timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank_, world_size=world_)
    events = {}
    for arg in args:
        who, step, what = arg.split(":")
        events[(int(who), int(step))] = what
    for (who, step), what in events.items():
        if who == rank_ and what in ("failwrite", "killwrite"):
            break_write(step, what)
        if who == rank_ and what == "failupload":
            break_upload(step)
        if who == rank_ and what == "fullprobe":
            fill_disk_at_probe()
        if who == rank_ and what == "failprune":
            break_prune(step)
    code = 1
    try:
        if name.startswith("epochs"):
            result = train_epochs(rank_, world_, Path(run_dir), events)
        elif name.startswith("nodisk"):
            mirror = os.environ.get("KILLSAFE_TEST_MIRROR")
            node = Path(run_dir, f"node-{rank_}")
            result = train(
                rank_, node, events, mirror=mirror, incremental=name.endswith("incremental")
            )
        else:
            result = train(
                rank_,
                Path(run_dir),
                events,
                paced=name == "paced",
                incremental=name.endswith("incremental"),
                clear=name == "fresh",
                resume="3" if name == "from3" else None,
            )
        code = result["exit_code"]
    except KillsafeError as exc:
        result = {"error": type(exc).__name__, "message": str(exc), **seen_step}
        if isinstance(exc, RankUnresponsive):
            result.update(ranks=list(exc.ranks), hosts=list(exc.hosts))
    Path(workdir, f"rank-{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no teardown collectives with ranks that may be gone


if __name__ == "__main__":
    main()
